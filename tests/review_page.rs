//! The review queue as reviewers work it: the page a node serves (a real browser resolves an item
//! through it; requests without the token or forged from another site are refused and change
//! nothing) and the `accord review` commands.

mod support;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use accord::node::review::{list, ReviewEntry};
use accord::review_page::{router, ReviewPage};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use support::cli::accord;
use support::nodes::{TestCluster, DB, SHOP};

const TABLES: &[&str] = &["shop.products", "shop.users"];
const TOKEN: &str = "t0ken-for-the-review-page-tests";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// `n` nodes holding one open review item: each node, cut off from the others, wrote its own price
/// of product 1, then the network healed.
async fn cluster_with_open_item(n: usize) -> (TestCluster, ReviewEntry) {
    let cluster = TestCluster::start(n, SHOP).await;
    cluster
        .client(0)
        .await
        .execute(
            "INSERT INTO shop.products (id, name, price) VALUES (1, 'lamp', 10.00)",
            &[],
        )
        .await
        .expect("the product inserts");
    cluster.converge(TABLES, Duration::from_secs(30)).await;
    cluster.partition_all().await;
    for node in 0..n {
        cluster
            .client(node)
            .await
            .execute(
                "UPDATE shop.products SET price = $1::text::numeric WHERE id = 1",
                &[&format!("{}.00", 11 + node)],
            )
            .await
            .expect("the price updates");
    }
    cluster.heal_all().await;
    cluster.converge(TABLES, Duration::from_secs(30)).await;
    let open = list(&cluster.client(0).await, Some("open"))
        .await
        .expect("the queue reads");
    assert_eq!(open.len(), 1, "one open item expected: {open:#?}");
    let item = open.into_iter().next().expect("checked above");
    assert_eq!(item.item.candidates().len(), n);
    (cluster, item)
}

/// Serves node `i`'s review page on a free loopback port, as the node does on its review address.
async fn serve(cluster: &TestCluster, i: usize) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("the bound address");
    let app = router(ReviewPage {
        dsn: cluster.pg[i].dsn(DB),
        token: TOKEN.into(),
    });
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("the review page serves");
    });
    addr
}

/// (status, closed_value, price) of the item and product 1 on node `i`.
async fn state_on(cluster: &TestCluster, i: usize, item: &ReviewEntry) -> (String, Option<String>, String) {
    let row = cluster
        .client(i)
        .await
        .query_one(
            "SELECT status, closed_value, (SELECT price::text FROM shop.products WHERE id = 1)
             FROM accord.review_items WHERE id = $1",
            &[&item.id.to_string()],
        )
        .await
        .unwrap_or_else(|e| panic!("node {i} lacks item {}: {e}", item.id));
    (row.get(0), row.get(1), row.get(2))
}

/// Waits until every node holds the item resolved with `value`, and `value` as the price.
async fn wait_resolved_everywhere(cluster: &TestCluster, item: &ReviewEntry, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut states = Vec::new();
        for i in 0..cluster.pg.len() {
            states.push(state_on(cluster, i, item).await);
        }
        let want = ("resolved".to_owned(), Some(value.to_owned()), value.to_owned());
        if states.iter().all(|s| *s == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the resolution did not reach every node: want {want:?}, have {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The price of product 1 on node 0, asserting that the item is still open there.
async fn still_open(cluster: &TestCluster, item: &ReviewEntry) -> String {
    let (status, closed_value, price) = state_on(cluster, 0, item).await;
    assert_eq!(
        (status.as_str(), closed_value),
        ("open", None),
        "the item must stay open"
    );
    price
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port on loopback")
}

/// chromedriver, in a process group of its own so that it and the Chromium it starts die with
/// the test, also when the test panics.
struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    async fn start() -> Chromedriver {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(binary).is_file(),
                "{binary} is missing: this test drives headless Chromium; run the tests with \
                 `scripts/test` (it installs what is missing), or `apt-get install -y chromium chromium-driver`"
            );
        }
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let driver = Chromedriver { child, port };
        let http = Http::new(format!("http://127.0.0.1:{port}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((StatusCode::OK, _, _)) = http.try_get("/status", &[]).await {
                return driver;
            }
            assert!(Instant::now() < deadline, "chromedriver does not answer on port {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browser processes it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small HTTP/1 client on hyper.
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

type Reply = (StatusCode, HeaderMap, String);

impl Http {
    fn new(base: String) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base,
        }
    }

    async fn try_send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Result<Reply, String> {
        let mut request = Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if !body.is_empty() {
            request = request.header("content-type", "application/x-www-form-urlencoded");
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| e.to_string())?;
        let response = self.client.request(request).await.map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn try_get(&self, path: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
        self.try_send("GET", path, headers, "").await
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let reply = self
            .try_get(path, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert!(!reply.2.contains(TOKEN), "GET {path} echoes the token");
        reply
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        let reply = self
            .try_send("POST", path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert!(!reply.2.contains(TOKEN), "POST {path} echoes the token");
        reply
    }
}

/// The value of the first `name="csrf"` hidden field of a page.
fn csrf_of(page: &str) -> String {
    let start = page
        .find("name=\"csrf\" value=\"")
        .map(|i| i + "name=\"csrf\" value=\"".len())
        .unwrap_or_else(|| panic!("the page has no CSRF field:\n{page}"));
    page[start..].split('"').next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reviewer_resolves_an_item_in_a_browser_and_every_node_follows() {
    use fantoccini::{ClientBuilder, Locator};

    let started = Instant::now();
    // First, so that a machine without the browser fails at once and says what to install.
    let driver = Chromedriver::start().await;
    let (cluster, item) = cluster_with_open_item(3).await;
    let addr = serve(&cluster, 0).await;
    let picked = item.item.candidates()[0].value.to_string();

    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        }),
    );
    // Plain HTTP on loopback: no TLS, so no process-wide rustls crypto provider to choose.
    let browser = ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session");

    let base = format!("http://{addr}");
    browser.goto(&format!("{base}/")).await.expect("the page loads");
    browser
        .find(Locator::Css("form#login"))
        .await
        .expect("without the token the browser gets the login form");
    browser
        .goto(&format!("{base}/?token={TOKEN}"))
        .await
        .expect("the login URL loads");
    assert_eq!(
        browser.current_url().await.expect("a URL").as_str(),
        format!("{base}/"),
        "the login redirects to the queue, leaving the token out of the address"
    );
    let section = format!("section#item-{}", item.id);
    let shown = browser
        .find(Locator::Css(&section))
        .await
        .expect("the open item is listed")
        .text()
        .await
        .expect("its text");
    for c in item.item.candidates() {
        assert!(
            shown.contains(&c.value.to_string()),
            "candidate {} missing:\n{shown}",
            c.value
        );
        assert!(shown.contains(&format!("{}", c.stamp.node)));
    }
    assert!(
        shown.contains("shop.products") && shown.contains("price") && shown.contains("UTC"),
        "{shown}"
    );

    browser
        .find(Locator::Css(&format!(
            "{section} form.pick button[name=pick][value=\"1\"]"
        )))
        .await
        .expect("candidate 1 has a resolve button")
        .click()
        .await
        .expect("the button clicks");
    let closed = match browser
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(&format!("#history tr#closed-{}", item.id)))
        .await
    {
        Ok(row) => row.text().await.expect("its text"),
        Err(e) => panic!(
            "the item does not show in the resolved history ({e}); the page:\n{}",
            browser.source().await.unwrap_or_default()
        ),
    };
    assert!(closed.contains("resolved") && closed.contains(&picked), "{closed}");
    let done = browser
        .find(Locator::Css("#done"))
        .await
        .expect("the page says what was done");
    assert!(done.text().await.expect("its text").contains(&item.id.to_string()));
    assert!(
        browser.find(Locator::Css(&section)).await.is_err(),
        "the item is no longer open"
    );
    browser.close().await.expect("the browser session closes");
    drop(driver);

    wait_resolved_everywhere(&cluster, &item, &picked).await;
    cluster.stop_all().await;
    eprintln!("browser test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_refuses_strangers_and_forged_resolutions() {
    let started = Instant::now();
    let (cluster, item) = cluster_with_open_item(2).await;
    let addr = serve(&cluster, 0).await;
    let http = Http::new(format!("http://{addr}"));
    let bearer = format!("Bearer {TOKEN}");
    let price_before = still_open(&cluster, &item).await;

    // Without the token, or with a wrong one: the login page, nothing else.
    for (path, headers) in [
        ("/", vec![]),
        ("/", vec![("authorization", "Bearer wrong")]),
        ("/", vec![("cookie", "accord_review=0000")]),
        ("/?token=wrong", vec![]),
        ("/nowhere", vec![]),
    ] {
        let (status, _, body) = http.get(path, &headers).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "GET {path} with {headers:?}");
        assert!(body.contains("form method=\"post\" action=\"/login\""), "{body}");
        assert!(!body.contains(&item.id.to_string()), "the queue leaks to a stranger");
    }
    let (status, _, _) = http.post("/login", &[], "token=wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A script with the token.
    let (status, _, page) = http.get("/", &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(&format!("id=\"item-{}\"", item.id)), "{page}");
    let csrf = csrf_of(&page);

    // A browser logging in: an HttpOnly, SameSite=Strict session cookie that is not the token.
    let (status, headers, _) = http.get(&format!("/?token={TOKEN}"), &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers.get("location"), Some(&HeaderValue::from_static("/")));
    let set_cookie = headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie");
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    assert!(!set_cookie.contains(TOKEN));
    let cookie = set_cookie.split(';').next().expect("name=value").to_owned();
    let (status, _, page) = http.get("/", &[("cookie", cookie.as_str())]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(csrf_of(&page), csrf, "the form token belongs to the session");
    let (status, headers, _) = http.post("/login", &[], &format!("token={TOKEN}")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(headers.contains_key("set-cookie"));

    let resolve = format!("/items/{}/resolve", item.id);
    let own = format!("http://{addr}");
    // Forged resolutions: no session, no CSRF token, a wrong one, another site's origin.
    let cases = [
        (
            "no session",
            vec![],
            format!("csrf={csrf}&pick=1"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "no CSRF token",
            vec![("cookie", cookie.as_str())],
            "pick=1".into(),
            StatusCode::FORBIDDEN,
        ),
        (
            "a wrong CSRF token",
            vec![("cookie", cookie.as_str())],
            format!("csrf={}&pick=1", "0".repeat(64)),
            StatusCode::FORBIDDEN,
        ),
        (
            "a foreign origin",
            vec![("cookie", cookie.as_str()), ("origin", "http://evil.example")],
            format!("csrf={csrf}&pick=1"),
            StatusCode::FORBIDDEN,
        ),
        (
            "a cross-site fetch",
            vec![("cookie", cookie.as_str()), ("sec-fetch-site", "cross-site")],
            format!("csrf={csrf}&pick=1"),
            StatusCode::FORBIDDEN,
        ),
    ];
    for (what, headers, body, want) in cases {
        let (status, _, _) = http.post(&resolve, &headers, &body).await;
        assert_eq!(status, want, "a resolution with {what}");
        assert_eq!(
            still_open(&cluster, &item).await,
            price_before,
            "a resolution with {what} changed the price"
        );
    }

    // A value the column cannot hold: the error on the page, nothing changed.
    let browser_like = [("cookie", cookie.as_str()), ("origin", own.as_str())];
    let (status, _, page) = http
        .post(&resolve, &browser_like, &format!("csrf={csrf}&value=cheap"))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{page}");
    assert!(page.contains("id=\"error\"") && page.contains("cheap"), "{page}");
    assert_eq!(still_open(&cluster, &item).await, price_before);

    // A good one, then the same item again.
    let (status, headers, _) = http
        .post(&resolve, &browser_like, &format!("csrf={csrf}&value=42.50"))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("/?done={}", item.id).as_str())
    );
    let (status, _, page) = http
        .get(&format!("/?done={}", item.id), &[("cookie", cookie.as_str())])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("id=\"done\""),
        "the page says the item is resolved:\n{page}"
    );
    let (status, _, page) = http.post(&resolve, &browser_like, &format!("csrf={csrf}&pick=2")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert!(page.contains("already resolved"), "{page}");
    wait_resolved_everywhere(&cluster, &item, "42.50").await;
    cluster.stop_all().await;
    eprintln!("HTTP test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_review_commands_list_show_and_resolve_an_item_on_every_node() {
    let (cluster, item) = cluster_with_open_item(2).await;
    let dsn = cluster.pg[1].dsn(DB);
    let id = item.id.to_string();

    let (ok, out) = accord(&["review", "list", "--dsn", &dsn]);
    assert!(
        ok && out.contains(&id) && out.contains("open") && out.contains("shop.products.price"),
        "{out}"
    );

    let (ok, out) = accord(&["review", "show", &id, "--dsn", &dsn]);
    assert!(ok, "{out}");
    for (n, c) in item.item.candidates().iter().enumerate() {
        let line = format!("{}. {}  written on node {} at ", n + 1, c.value, c.stamp.node);
        assert!(out.contains(&line), "candidate {n} as {line:?}:\n{out}");
    }
    assert!(
        out.contains(" UTC (HLC ") && out.contains("(provisional winner)"),
        "{out}"
    );

    let (ok, out) = accord(&["review", "resolve", &id, "--dsn", &dsn]);
    assert!(
        !ok && out.contains("--pick") && out.contains("--value"),
        "a choice is required: {out}"
    );
    let (ok, out) = accord(&["review", "resolve", &id, "--pick", "9", "--dsn", &dsn]);
    assert!(!ok && out.contains("pick 1 to 2"), "there is no candidate 9: {out}");
    assert!(still_open(&cluster, &item).await.ends_with(".00"));

    let (ok, out) = accord(&["review", "resolve", &id, "--value", "12.50", "--dsn", &dsn]);
    assert!(ok && out.contains(&id), "{out}");
    wait_resolved_everywhere(&cluster, &item, "12.50").await;

    let (ok, out) = accord(&["review", "resolve", &id, "--pick", "1", "--dsn", &dsn]);
    assert!(!ok && out.contains("resolved"), "an item is resolved once: {out}");
    let (ok, out) = accord(&["review", "list", "--dsn", &dsn]);
    assert!(ok && !out.contains(&id), "no longer open: {out}");
    let (ok, out) = accord(&["review", "list", "--all", "--dsn", &dsn]);
    assert!(
        ok && out.contains(&id) && out.contains("resolved"),
        "in the history: {out}"
    );
    cluster.stop_all().await;
}
