//! The review page a node serves to reviewers.

/// What the page needs: the node's database and the reviewers' access token.
#[derive(Debug, Clone)]
pub struct ReviewPage {
    pub dsn: String,
    pub token: String,
}

/// The page's routes, to be served on the review address.
pub fn router(_page: ReviewPage) -> axum::Router {
    axum::Router::new()
}
