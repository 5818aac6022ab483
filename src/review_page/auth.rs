//! Who may use the page: the access token, the session cookie derived from it, the CSRF form
//! token, and the same-origin check of state-changing requests.
//!
//! Every secret comparison goes through `blake3::Hash`, whose equality is constant-time, so the
//! time a refusal takes says nothing about how much of a guess was right.

use axum::http::{header, HeaderMap, HeaderValue};

/// The cookie that holds a browser's session.
pub const COOKIE: &str = "accord_review";

/// Secrets derived from the configured token with a key that lives only in this process: a leaked
/// cookie or form token does not reveal the access token, and all sessions end when the node
/// restarts.
pub struct Keys {
    key: [u8; 32],
    /// `None` when the configured token is empty: then nothing is accepted, rather than everything.
    token: Option<blake3::Hash>,
    session: blake3::Hash,
    csrf: blake3::Hash,
}

impl Keys {
    pub fn new(token: &str) -> Keys {
        let key: [u8; 32] = rand::random();
        let derive = |purpose: &[u8]| {
            let mut h = blake3::Hasher::new_keyed(&key);
            h.update(purpose);
            h.update(&[0]);
            h.update(token.as_bytes());
            h.finalize()
        };
        Keys {
            token: (!token.is_empty()).then(|| blake3::keyed_hash(&key, token.as_bytes())),
            session: derive(b"accord review session"),
            csrf: derive(b"accord review csrf"),
            key,
        }
    }

    /// Whether `candidate` is the access token.
    pub fn token_matches(&self, candidate: &str) -> bool {
        // Hashing first makes the comparison independent of the candidate's length too.
        self.token
            .is_some_and(|token| token == blake3::keyed_hash(&self.key, candidate.as_bytes()))
    }

    /// A `Set-Cookie` value that opens a session.
    pub fn session_cookie(&self) -> String {
        format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", self.session.to_hex())
    }

    /// The hidden form field every state-changing form carries.
    pub fn csrf_token(&self) -> String {
        self.csrf.to_hex().to_string()
    }

    pub fn csrf_matches(&self, candidate: Option<&str>) -> bool {
        self.token.is_some() && hex_matches(candidate, &self.csrf)
    }

    /// Whether the request carries a valid session cookie or `Authorization: Bearer TOKEN`.
    pub fn authenticated(&self, headers: &HeaderMap) -> bool {
        if self.token.is_none() {
            return false;
        }
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer "))
            .any(|t| self.token_matches(t.trim()));
        bearer || cookies(headers, COOKIE).any(|v| hex_matches(Some(v), &self.session))
    }
}

/// A `Set-Cookie` value that ends a session.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("accord_review=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

fn hex_matches(candidate: Option<&str>, expected: &blake3::Hash) -> bool {
    candidate
        .and_then(|c| blake3::Hash::from_hex(c.trim()).ok())
        .is_some_and(|c| c == *expected)
}

/// The values of the cookies named `name`, from every `Cookie` header.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n == name).then_some(v)
        })
}

/// Whether a state-changing request may come from this page: refused when the browser says it was
/// sent from another site (`Origin` not matching `Host`, or `Sec-Fetch-Site`). Clients that send
/// neither header (scripts, old browsers) pass here and still need the CSRF token.
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return false;
        }
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let (Ok(origin), Some(host)) = (origin.to_str(), headers.get(header::HOST).and_then(|h| h.to_str().ok())) else {
        return false;
    };
    let (scheme, authority) = match origin.split_once("://") {
        Some((scheme @ ("http" | "https"), authority)) => (scheme, authority),
        // Also `null`, which sandboxed frames and some redirects send.
        _ => return false,
    };
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    let normal = |a: &str| {
        let a = a.trim_end_matches('/').to_ascii_lowercase();
        match a.strip_suffix(default_port) {
            Some(bare) => bare.to_owned(),
            None => a,
        }
    };
    normal(authority) == normal(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).expect("test header"));
        }
        h
    }

    #[test]
    fn the_token_the_cookie_and_the_bearer_header_open_the_page() {
        let keys = Keys::new("s3cret");
        assert!(keys.token_matches("s3cret"));
        assert!(!keys.token_matches("s3cre"));
        assert!(!keys.token_matches(""));
        let cookie = keys.session_cookie();
        let value = cookie.split(';').next().expect("a name=value pair");
        assert!(keys.authenticated(&headers(&[("cookie", &format!("a=b; {value}"))])));
        assert!(!keys.authenticated(&headers(&[("cookie", "accord_review=00")])));
        assert!(keys.authenticated(&headers(&[("authorization", "Bearer s3cret")])));
        assert!(!keys.authenticated(&headers(&[("authorization", "Bearer nope")])));
        assert!(!keys.authenticated(&headers(&[])));
        assert!(!cookie.contains("s3cret"), "the cookie must not carry the token");
    }

    #[test]
    fn an_empty_configured_token_opens_nothing() {
        let keys = Keys::new("");
        assert!(!keys.token_matches(""));
        assert!(!keys.authenticated(&headers(&[("authorization", "Bearer ")])));
        assert!(!keys.csrf_matches(Some(&keys.csrf_token())));
    }

    #[test]
    fn csrf_tokens_belong_to_one_process() {
        let (a, b) = (Keys::new("t"), Keys::new("t"));
        assert!(a.csrf_matches(Some(&a.csrf_token())));
        assert!(!a.csrf_matches(Some(&b.csrf_token())));
        assert!(!a.csrf_matches(None));
        assert!(!a.csrf_matches(Some("not hex")));
    }

    #[test]
    fn foreign_origins_are_refused() {
        let host = ("host", "127.0.0.1:8080");
        assert!(same_origin(&headers(&[host])));
        assert!(same_origin(&headers(&[host, ("origin", "http://127.0.0.1:8080")])));
        assert!(!same_origin(&headers(&[host, ("origin", "http://evil.example")])));
        assert!(!same_origin(&headers(&[host, ("origin", "null")])));
        assert!(!same_origin(&headers(&[("origin", "http://127.0.0.1:8080")])));
        assert!(same_origin(&headers(&[
            ("host", "review.example"),
            ("origin", "https://review.example:443")
        ])));
        assert!(!same_origin(&headers(&[host, ("sec-fetch-site", "cross-site")])));
        assert!(same_origin(&headers(&[host, ("sec-fetch-site", "same-origin")])));
    }
}
