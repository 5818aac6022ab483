//! The review page a node serves to reviewers: the open items of the review queue with their
//! candidates, a button per candidate and a field for a value of one's own, and the closed items.
//!
//! Routes (all behind the access token):
//! - `GET /` the queue; `GET /?token=TOKEN` logs a browser in (sets the session cookie) and
//!   redirects to `/`.
//! - `GET /login`, `POST /login` (form field `token`), `POST /logout`.
//! - `POST /items/{id}/resolve` with form fields `csrf` and `pick=N` or `value=TEXT`.
//!
//! Scripts may send `Authorization: Bearer TOKEN` instead of the cookie. Resolutions go through
//! [`crate::node::review::resolve`], a local write that replicates; this module only presents it.

mod auth;
mod html;

use std::sync::Arc;

use accord_engine::ReviewItemId;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio_postgres::Client;

use crate::node::init;
use crate::node::review::{self, Choice, ReviewEntry};
use auth::Keys;
use html::Notice;

/// What the page needs: the node's database and the reviewers' access token.
#[derive(Clone)]
pub struct ReviewPage {
    pub dsn: String,
    pub token: String,
}

/// Without the token and the DSN's password, so that logging a configuration leaks neither.
impl std::fmt::Debug for ReviewPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReviewPage")
            .field("dsn", &crate::pg_connection::redact(&self.dsn))
            .field("token", &"***")
            .finish()
    }
}

/// How many closed items the history shows.
const HISTORY_LIMIT: usize = 100;

struct Shared {
    dsn: String,
    keys: Keys,
}

type AppState = State<Arc<Shared>>;

/// The page's routes, to be served on the review address.
pub fn router(page: ReviewPage) -> axum::Router {
    if page.token.is_empty() {
        tracing::warn!("the review page has an empty access token configured: it refuses every request");
    }
    let shared = Arc::new(Shared {
        keys: Keys::new(&page.token),
        dsn: page.dsn,
    });
    axum::Router::new()
        .route("/", get(index))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/items/{id}/resolve", post(resolve))
        .fallback(not_found)
        .layer(axum::middleware::map_response(harden))
        .with_state(shared)
}

/// Headers for every response: no caching of pages that hold the queue and the CSRF token, no
/// framing (clickjacking of the resolve buttons), no script, forms only to this page, and no
/// `Referer` that could carry a `?token=` URL to another site. Not `no-referrer`: under it browsers
/// send `Origin: null` with forms, and the same-origin check would refuse the page's own forms.
async fn harden(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

fn unauthorized(message: Option<&str>) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"accord review\"")],
        Html(html::login(message)),
    )
        .into_response()
}

fn failure(status: StatusCode, message: &str) -> Response {
    (status, Html(html::failure(message))).into_response()
}

fn forbidden(message: &str) -> Response {
    failure(StatusCode::FORBIDDEN, message)
}

fn start_session(keys: &Keys) -> Response {
    match HeaderValue::from_str(&keys.session_cookie()) {
        Ok(cookie) => {
            let mut response = Redirect::to("/").into_response();
            response.headers_mut().insert(header::SET_COOKIE, cookie);
            response
        }
        // Hex and fixed attributes only; an error page rather than a panic all the same.
        Err(_) => failure(StatusCode::INTERNAL_SERVER_ERROR, "cannot build the session cookie"),
    }
}

#[derive(Debug, Deserialize)]
struct IndexQuery {
    token: Option<String>,
    done: Option<String>,
}

async fn index(State(s): AppState, headers: HeaderMap, query: Result<Query<IndexQuery>, QueryRejection>) -> Response {
    let query = query.map(|Query(q)| q).ok();
    if let Some(token) = query.as_ref().and_then(|q| q.token.as_deref()) {
        return if s.keys.token_matches(token) {
            start_session(&s.keys)
        } else {
            unauthorized(Some("That is not the access token."))
        };
    }
    if !s.keys.authenticated(&headers) {
        return unauthorized(None);
    }
    let db = match connect(&s.dsn).await {
        Ok(db) => db,
        Err(response) => return response,
    };
    // After a resolution's redirect; said only when it is true, as anyone can type the address.
    let done = query
        .and_then(|q| q.done)
        .and_then(|id| id.parse::<ReviewItemId>().ok());
    let notice = match done {
        Some(id) => match review::show(&db, id).await {
            Ok(e) if e.status == "resolved" => Some(Notice::Done(format!(
                "Item {id} is resolved; the resolution replicates to every node."
            ))),
            _ => None,
        },
        None => None,
    };
    render_queue(&s, &db, StatusCode::OK, notice).await
}

async fn login_page(State(s): AppState, headers: HeaderMap) -> Response {
    if s.keys.authenticated(&headers) {
        Redirect::to("/").into_response()
    } else {
        unauthorized(None)
    }
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: Option<String>,
}

async fn login(State(s): AppState, headers: HeaderMap, form: Result<Form<LoginForm>, FormRejection>) -> Response {
    if !auth::same_origin(&headers) {
        return forbidden("This form was sent from another site.");
    }
    match form {
        Ok(Form(LoginForm { token: Some(token) })) if s.keys.token_matches(&token) => start_session(&s.keys),
        _ => unauthorized(Some("That is not the access token.")),
    }
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(State(s): AppState, headers: HeaderMap, form: Result<Form<CsrfForm>, FormRejection>) -> Response {
    if !s.keys.authenticated(&headers) {
        return unauthorized(None);
    }
    let csrf = form.ok().and_then(|Form(f)| f.csrf);
    if !auth::same_origin(&headers) || !s.keys.csrf_matches(csrf.as_deref()) {
        return forbidden("This request did not come from the review page.");
    }
    let mut response = Redirect::to("/").into_response();
    response.headers_mut().insert(header::SET_COOKIE, auth::clear_cookie());
    response
}

#[derive(Debug, Deserialize)]
struct ResolveForm {
    csrf: Option<String>,
    pick: Option<String>,
    value: Option<String>,
}

async fn resolve(
    State(s): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Result<Form<ResolveForm>, FormRejection>,
) -> Response {
    if !s.keys.authenticated(&headers) {
        return unauthorized(None);
    }
    if !auth::same_origin(&headers) {
        return forbidden("This form was sent from another site; nothing was changed.");
    }
    // A body that is not a form cannot carry the CSRF token either.
    let form = form.ok().map(|Form(f)| f);
    if !s.keys.csrf_matches(form.as_ref().and_then(|f| f.csrf.as_deref())) {
        return forbidden(
            "This form lacks the review page's CSRF token; nothing was changed. Reload the page and try again.",
        );
    }
    let Some(form) = form else {
        return forbidden("This request is not a form of the review page; nothing was changed.");
    };
    let Ok(id) = id.parse::<ReviewItemId>() else {
        return failure(StatusCode::NOT_FOUND, "There is no such review item.");
    };
    let mut db = match connect(&s.dsn).await {
        Ok(db) => db,
        Err(response) => return response,
    };
    match try_resolve(&mut db, id, form).await {
        Ok(()) => Redirect::to(&format!("/?done={id}")).into_response(),
        Err((status, message)) => render_queue(&s, &db, status, Some(Notice::Error(message))).await,
    }
}

/// Resolves item `id` as the form says, or says why not (and then nothing was written).
async fn try_resolve(db: &mut Client, id: ReviewItemId, form: ResolveForm) -> Result<(), (StatusCode, String)> {
    let unprocessable = |message: String| (StatusCode::UNPROCESSABLE_ENTITY, message);
    let choice = match (form.pick, form.value) {
        (Some(pick), _) => Choice::Pick(
            pick.trim()
                .parse()
                .map_err(|_| unprocessable(format!("{pick:?} is not a candidate number.")))?,
        ),
        (None, Some(value)) => Choice::Value(value),
        (None, None) => return Err(unprocessable("Choose a candidate or give a value of your own.".into())),
    };
    // `resolve` refuses these too; asking first gives them their own status codes.
    match review::show(db, id).await {
        Ok(entry) if entry.status != "open" => {
            return Err((
                StatusCode::CONFLICT,
                format!("Review item {id} is already {}; nothing was changed.", entry.status),
            ))
        }
        Ok(_) => {}
        Err(error) => return Err((StatusCode::NOT_FOUND, format!("{error:#}"))),
    }
    let policy = init::load_policy(db)
        .await
        .map_err(|error| (StatusCode::INTERNAL_SERVER_ERROR, format!("{error:#}")))?;
    match review::resolve(db, &policy, id, choice).await {
        Ok(_) => Ok(()),
        Err(error) => {
            // Closed meanwhile by another reviewer or by an incoming write?
            let closed = review::show(db, id).await.is_ok_and(|e| e.status != "open");
            let status = if closed {
                StatusCode::CONFLICT
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            Err((status, format!("{error:#}; nothing was changed.")))
        }
    }
}

async fn not_found(State(s): AppState, headers: HeaderMap) -> Response {
    if !s.keys.authenticated(&headers) {
        return unauthorized(None);
    }
    failure(StatusCode::NOT_FOUND, "There is no such page.")
}

/// A connection to the node's database, or the page that says it is unavailable. Neither the page
/// nor the log names the DSN: it may carry a password.
async fn connect(dsn: &str) -> Result<Client, Response> {
    crate::pg_connection::connect(dsn).await.map_err(|error| {
        tracing::warn!(cause = %error.root_cause(), "the review page cannot connect to the node's database");
        failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "The node's database is unavailable; see the node's log.",
        )
    })
}

async fn render_queue(s: &Shared, db: &Client, status: StatusCode, notice: Option<Notice>) -> Response {
    match load_queue(db).await {
        Ok((node, open, closed, closed_total)) => {
            let page = html::queue(&html::Queue {
                node,
                csrf: &s.keys.csrf_token(),
                open: &open,
                closed: &closed,
                closed_total,
                notice,
            });
            (status, Html(page)).into_response()
        }
        Err(error) => {
            tracing::warn!(cause = %error.root_cause(), "the review page cannot read the review queue");
            failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "The review queue cannot be read; see the node's log.",
            )
        }
    }
}

type Closed = Vec<(ReviewEntry, Option<String>)>;

async fn load_queue(db: &Client) -> anyhow::Result<(Option<i32>, Vec<ReviewEntry>, Closed, usize)> {
    let node = db
        .query_opt("SELECT node_id FROM accord.node", &[])
        .await?
        .map(|row| row.get::<_, i32>(0));
    let open = review::list(db, Some("open")).await?;
    let mut closed = review::list(db, Some("resolved")).await?;
    closed.extend(review::list(db, Some("superseded")).await?);
    // When each closed (`ReviewEntry` does not carry it): a sortable form and a shown form.
    let times: std::collections::BTreeMap<String, (String, String)> = db
        .query(
            "SELECT id, coalesce(to_char(closed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), ''),
                    coalesce(to_char(closed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'), '')
             FROM accord.review_items WHERE status <> 'open'",
            &[],
        )
        .await?
        .into_iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    let total = closed.len();
    let mut keyed: Vec<(String, ReviewEntry, Option<String>)> = closed
        .into_iter()
        .map(|e| match times.get(&e.id.to_string()) {
            Some((sort, shown)) if !sort.is_empty() => (sort.clone(), e, Some(shown.clone())),
            _ => (String::new(), e, None),
        })
        .collect();
    keyed.sort_by(|(a, ea, _), (b, eb, _)| b.cmp(a).then(eb.id.cmp(&ea.id)));
    let mut closed: Closed = keyed.into_iter().map(|(_, e, shown)| (e, shown)).collect();
    closed.truncate(HISTORY_LIMIT);
    Ok((node, open, closed, total))
}

#[cfg(test)]
mod tests {
    use super::ReviewPage;

    #[test]
    fn debug_output_hides_the_token_and_the_password() {
        let page = ReviewPage {
            dsn: "host=db user=accord password=pa55word dbname=shop".into(),
            token: "s3cr3t-t0ken".into(),
        };
        let shown = format!("{page:?}");
        assert!(
            !shown.contains("pa55word") && !shown.contains("s3cr3t-t0ken"),
            "{shown}"
        );
    }
}
