//! `accord run`, `accord status` and the metrics endpoint as an operator uses them: real
//! processes from the built binary, configuration files, certificates from `accord certs`, QUIC on
//! loopback, real temporary PostgreSQL clusters.

mod support;

use std::time::{Duration, Instant};

use support::cli::{accord, free_tcp_port};
use support::nodes::{free_udp_port, snapshot, SHOP};
use support::pg::PgCluster;
use support::service::{http_get, wait_until, write_node, RunningNode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_run_from_config_files_replicate_report_and_stop_on_sigterm() {
    let pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(2)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("ca").to_str().unwrap()]);
    assert!(ok, "{out}");
    let quic = [(1, free_udp_port()), (2, free_udp_port())];
    let mut dbs = Vec::new();
    let mut files = Vec::new();
    for (i, pg) in pgs.iter().enumerate() {
        let id = i as u32 + 1;
        let db = pg.create_database("shop").await;
        db.batch_execute(SHOP).await.unwrap();
        let dsn = pg.dsn("shop");
        let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", &id.to_string()]);
        assert!(ok, "{out}");
        // Trust authentication ignores the password: it is here to prove it never reaches a log.
        let dsn = format!("{dsn} password=never-logged-secret");
        let review = format!(
            "[review_page]\nlisten = \"127.0.0.1:{}\"\ntoken = \"never-logged-review-token\"",
            free_tcp_port()
        );
        files.push(write_node(dir.path(), id, &dsn, &quic, &review));
        dbs.push(db);
    }

    // Node 1 alone: its peer is unreachable, which the status says rather than hides.
    let node1 = RunningNode::start(&files[0].config, &[]);
    let status_of = |i: usize| {
        let config = files[i].config.clone();
        async move { accord(&["status", "--config", config.to_str().unwrap()]) }
    };
    // Asked until it answers (a loaded machine may take a while to start it); the first answer
    // must report the peer as not connected.
    let started = Instant::now();
    let out = loop {
        let (ok, out) = status_of(0).await;
        if ok {
            break out;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node 1 serves no status: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(out.contains("peer 2: NOT CONNECTED"), "{out}");

    let node2 = RunningNode::start(&files[1].config, &["--log-format", "json"]);
    dbs[0]
        .batch_execute("INSERT INTO shop.products (id, name, stock) VALUES (1, 'lamp', 10)")
        .await
        .unwrap();
    wait_until("the insert reaches node 2", Duration::from_secs(60), || {
        let db = &dbs[1];
        async move {
            db.query_opt("SELECT 1 FROM shop.products WHERE id = 1", &[])
                .await
                .unwrap()
                .is_some()
        }
    })
    .await;
    for (i, db) in dbs.iter().enumerate() {
        for _ in 0..20 {
            db.execute("UPDATE shop.products SET stock = stock + 1 WHERE id = 1", &[])
                .await
                .unwrap_or_else(|e| panic!("update on node {}: {e}", i + 1));
        }
    }
    let tables = ["shop.products"];
    wait_until("both nodes hold the same rows", Duration::from_secs(60), || {
        let (a, b) = (&dbs[0], &dbs[1]);
        async move { snapshot(a, &tables).await == snapshot(b, &tables).await }
    })
    .await;
    let stock: i64 = dbs[1]
        .query_one("SELECT stock FROM shop.products WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stock, 50, "10 + 20 increments on each node");

    // The status, for people and as JSON, and the metrics, once the acknowledgements are in.
    wait_until("node 1 sees node 2 caught up", Duration::from_secs(30), || {
        let config = files[0].config.clone();
        async move {
            let (ok, json) = accord(&["status", "--config", config.to_str().unwrap(), "--json"]);
            let Ok(status) = serde_json::from_str::<serde_json::Value>(&json) else {
                return false;
            };
            let peer = &status["peers"]["2"];
            ok && peer["connected"] == true && peer["unacked"] == 0 && peer["applied_changes"].as_u64() >= Some(20)
        }
    })
    .await;
    let (ok, out) = status_of(0).await;
    assert!(ok, "{out}");
    assert!(out.contains("peer 2: connected for"), "{out}");
    assert!(out.contains("0 changes unacknowledged"), "{out}");
    assert!(out.contains("review queue: 0 open"), "{out}");
    let metrics = http_get(files[1].metrics, "/metrics")
        .await
        .expect("the metrics endpoint answers");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("accord_peer_connected{peer=\"1\"} 1.0"), "{metrics}");
    assert!(metrics.contains("accord_peer_applied_total{peer=\"1\"}"), "{metrics}");

    let (ok, logs1) = node1.terminate();
    assert!(ok, "node 1 exits cleanly on SIGTERM:\n{logs1}");
    assert!(
        logs1.contains("SIGTERM: stopping") && logs1.contains("node stopped"),
        "{logs1}"
    );
    let (ok, logs2) = node2.terminate();
    assert!(ok, "node 2 exits cleanly on SIGTERM:\n{logs2}");
    for line in logs2.lines() {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(entry["level"].is_string() && entry["fields"].is_object(), "{line}");
    }
    assert!(
        logs2.contains("\"name\":\"node\""),
        "log lines carry the node's span:\n{logs2}"
    );
    for logs in [&logs1, &logs2] {
        assert!(
            !logs.contains("never-logged-secret") && !logs.contains("never-logged-review-token"),
            "no secret in the logs:\n{logs}"
        );
    }
}

#[tokio::test]
async fn bad_configurations_are_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("ca").to_str().unwrap()]);
    assert!(ok, "{out}");
    let quic = [(1, free_udp_port()), (2, free_udp_port())];
    // Nothing listens here: these configurations must fail before the database matters, or at it.
    let dsn = format!(
        "host=127.0.0.1 port={} user=nobody password=sekrit dbname=shop connect_timeout=2",
        free_tcp_port()
    );
    let good = write_node(dir.path(), 1, &dsn, &quic, "");
    let text = std::fs::read_to_string(&good.config).unwrap();
    let run_with = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        accord(&["run", "--config", path.to_str().unwrap()])
    };

    let cases = [
        (
            "missing-key.toml",
            text.replace("cluster = \"service-test\"\n", ""),
            "cluster",
        ),
        (
            "unknown-key.toml",
            text.replace("listen = ", "listen_addr = "),
            "listen_addr",
        ),
        (
            "wrong-cert-path.toml",
            text.replace("node-1.pem", "node-9.pem"),
            "tls.cert",
        ),
        (
            "bad-peer-address.toml",
            text.replace("address = \"127.0.0.1:", "address = \"127.0.0.1;"),
            "peers[0].address",
        ),
    ];
    for (name, text, named) in cases {
        let (ok, out) = run_with(name, text);
        assert!(!ok, "{name} is refused: {out}");
        assert!(out.contains(named), "{name}: the error names {named:?}: {out}");
        assert!(!out.contains("sekrit"), "{name}: the password is not echoed: {out}");
    }

    // Another node's certificate.
    write_node(dir.path(), 2, &dsn, &quic, "");
    let (ok, out) = run_with(
        "other-node-cert.toml",
        text.replace("certs-1/node-1.pem", "certs-2/node-2.pem")
            .replace("certs-1/node-1.key", "certs-2/node-2.key"),
    );
    assert!(
        !ok && out.contains("node 2's certificate") && out.contains("node 1"),
        "{out}"
    );
    // Its own certificate with another node's key, and a certificate from another cluster's CA:
    // refused at start, naming the files, not left for the peers' handshakes to refuse.
    let (ok, out) = run_with(
        "mismatched-key.toml",
        text.replace("certs-1/node-1.key", "certs-2/node-2.key"),
    );
    assert!(
        !ok && out.contains("not the key of the node certificate") && out.contains("node-2.key"),
        "{out}"
    );
    let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("other-ca").to_str().unwrap()]);
    assert!(ok, "{out}");
    let foreign = dir.path().join("foreign-1");
    let (ok, out) = accord(&[
        "certs",
        "node",
        "1",
        "--ca-dir",
        dir.path().join("other-ca").to_str().unwrap(),
        "--out",
        foreign.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = run_with(
        "foreign-ca.toml",
        text.replace("certs-1/node-1.pem", &format!("{}/node-1.pem", foreign.display()))
            .replace("certs-1/node-1.key", &format!("{}/node-1.key", foreign.display())),
    );
    assert!(!ok && out.contains("not signed by the CA certificate"), "{out}");

    // A database nobody answers at.
    let (ok, out) = accord(&["run", "--config", good.config.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("cannot connect") || out.contains("connect"), "{out}");
    assert!(!out.contains("sekrit"), "the password is not echoed: {out}");

    // No file at all, and no node to ask for a status.
    let (ok, out) = accord(&["run", "--config", "/nonexistent/node.toml"]);
    assert!(!ok && out.contains("/nonexistent/node.toml"), "{out}");
    let (ok, out) = accord(&["status", "--config", good.config.to_str().unwrap()]);
    assert!(!ok && out.contains("is `accord run` running?"), "{out}");

    // The documented example is what the parser reads (its unit test checks it parses).
    let (ok, out) = accord(&["run", "--print-example-config"]);
    assert!(ok && out.contains("[[peers]]") && out.contains("ACCORD_DSN"), "{out}");
}
