//! PostgreSQL over TLS, as on a managed service that refuses unencrypted connections: scratch
//! clusters with `ssl = on` and a certificate from a test CA, `pg_hba.conf` rejecting anything
//! not encrypted, and `accord check`, `accord init` and two `accord run` processes reaching them
//! with libpq's `sslmode`/`sslrootcert`, the replication stream included.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use accord::scratch_pg::StopMode;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use support::cli::accord;
use support::nodes::{free_udp_port, snapshot, SHOP};
use support::pg::PgCluster;
use support::service::{wait_until, write_node, RunningNode};

/// A CA's certificate (PEM) and a server certificate for `localhost` it signed, with its key.
struct Certificates {
    ca: String,
    server: String,
    server_key: String,
}

fn make_certificates(name: &str) -> Certificates {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = server.signed_by(&key, &issuer).unwrap();
    Certificates {
        ca: ca_cert.pem(),
        server: cert.pem(),
        server_key: key.serialize_pem(),
    }
}

/// Turns TLS on and makes it the only way in (over TCP), then restarts the server.
fn require_tls(pg: &mut PgCluster, certs: &Certificates) {
    let data = pg.data_dir();
    let owner = std::fs::metadata(&data).unwrap();
    for (file, text) in [("server.crt", &certs.server), ("server.key", &certs.server_key)] {
        let path = data.join(file);
        std::fs::write(&path, text).unwrap();
        // PostgreSQL reads its key only when its own user owns it and nobody else can.
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    append(&data.join("postgresql.conf"), "ssl = on\n");
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\n\
         local replication all trust\n\
         hostssl all all 127.0.0.1/32 trust\n\
         hostssl replication all 127.0.0.1/32 trust\n\
         hostnossl all all 0.0.0.0/0 reject\n\
         hostnossl replication all 0.0.0.0/0 reject\n",
    )
    .unwrap();
    pg.stop(StopMode::Fast);
    pg.restart();
}

fn append(path: &Path, text: &str) {
    let mut all = std::fs::read_to_string(path).unwrap();
    all.push_str(text);
    std::fs::write(path, all).unwrap();
}

async fn client(dsn: &str) -> tokio_postgres::Client {
    accord::pg_connection::connect(dsn)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Whether the node's capture is connected, over TLS.
async fn capture_is_encrypted(db: &tokio_postgres::Client) -> bool {
    db.query_one(
        "SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.application_name = 'accord-capture'",
        &[],
    )
    .await
    .map(|r| r.get::<_, bool>(0))
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_postgres_only_over_verified_tls_and_still_converge_across_a_server_restart() {
    let mut pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(2)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certificates("right");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &certs.ca).unwrap();
    let wrong_ca = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, make_certificates("wrong").ca).unwrap();
    for pg in &pgs {
        pg.create_database("shop").await.batch_execute(SHOP).await.unwrap();
    }
    for pg in &mut pgs {
        require_tls(pg, &certs);
    }
    let ports: Vec<u16> = pgs.iter().map(|pg| pg.port()).collect();
    let dsn = |i: usize, host: &str, tls: &str| {
        format!(
            "host={host} port={} user=postgres dbname=shop connect_timeout=10 {tls}",
            ports[i]
        )
    };
    let verified = |i: usize| {
        dsn(
            i,
            "localhost",
            &format!("sslmode=verify-full sslrootcert={}", ca.display()),
        )
    };

    // What a user meets first: `accord check`.
    let (ok, out) = accord(&["check", "--dsn", &verified(0)]);
    assert!(ok, "verify-full with the right root connects: {out}");
    let (ok, out) = accord(&["check", "--dsn", &dsn(0, "localhost", "sslmode=disable")]);
    assert!(
        !ok && out.contains("no encryption"),
        "the server refuses plain connections: {out}"
    );
    let wrong = dsn(
        0,
        "localhost",
        &format!("sslmode=verify-full sslrootcert={}", wrong_ca.display()),
    );
    let (ok, out) = accord(&["check", "--dsn", &wrong]);
    assert!(!ok, "a wrong root certificate is refused: {out}");
    assert!(
        out.contains("invalid peer certificate") && out.contains("wrong-ca.pem"),
        "the refusal says it is the certificate, checked against which roots: {out}"
    );
    // The certificate names localhost, not 127.0.0.1: verify-full refuses it, verify-ca does not.
    let by_ip = |mode: &str| dsn(0, "127.0.0.1", &format!("sslmode={mode} sslrootcert={}", ca.display()));
    let (ok, out) = accord(&["check", "--dsn", &by_ip("verify-full")]);
    assert!(!ok && out.contains("invalid peer certificate"), "{out}");
    let (ok, out) = accord(&["check", "--dsn", &by_ip("verify-ca")]);
    assert!(ok, "verify-ca does not check the name: {out}");
    let (ok, out) = accord(&["check", "--dsn", &dsn(0, "127.0.0.1", "sslmode=require")]);
    assert!(ok, "require encrypts without checking: {out}");
    let (ok, out) = accord(&["check", "--dsn", &dsn(0, "localhost", "sslmode=verify-full")]);
    assert!(
        !ok && out.contains("sslrootcert"),
        "verify-full without a root says what to give: {out}"
    );

    // Two nodes, every connection verified, the replication streams included.
    let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("ca").to_str().unwrap()]);
    assert!(ok, "{out}");
    let quic = [(1, free_udp_port()), (2, free_udp_port())];
    let mut files = Vec::new();
    for i in 0..2 {
        let id = i as u32 + 1;
        let (ok, out) = accord(&["init", "--dsn", &verified(i), "--node-id", &id.to_string()]);
        assert!(ok, "{out}");
        files.push(write_node(dir.path(), id, &verified(i), &quic, ""));
    }
    let mut nodes: Vec<RunningNode> = files.iter().map(|f| RunningNode::start(&f.config, &[])).collect();
    let dbs = [client(&verified(0)).await, client(&verified(1)).await];
    dbs[0]
        .batch_execute(
            "INSERT INTO shop.products (id, name, stock) SELECT g, 'p' || g, 100 FROM generate_series(1, 20) g",
        )
        .await
        .unwrap();
    wait_until("the rows reach node 2", Duration::from_secs(60), || {
        let db = &dbs[1];
        async move {
            db.query_one("SELECT count(*) FROM shop.products", &[])
                .await
                .map(|r| r.get::<_, i64>(0) == 20)
                .unwrap_or(false)
        }
    })
    .await;
    assert!(
        capture_is_encrypted(&dbs[0]).await && capture_is_encrypted(&dbs[1]).await,
        "the replication streams use TLS"
    );

    // Writes on both nodes at once, and node 2's server restarts in the middle of them: its
    // capture and applier reconnect, through TLS again. Each write also inserts a user row, so
    // what committed is counted even when a reply is lost to the restart.
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let dsn = verified(i);
            tokio::spawn(async move {
                let mut db: Option<tokio_postgres::Client> = None;
                let mut acknowledged = 0_i64;
                for round in 0..300_i32 {
                    if db.as_ref().is_none_or(|db| db.is_closed()) {
                        db = accord::pg_connection::connect(&dsn).await.ok();
                    }
                    let Some(client) = db.as_mut() else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let user = i as i32 * 100_000 + round;
                    let write = async {
                        let tx = client.transaction().await?;
                        tx.execute(
                            "UPDATE shop.products SET stock = stock + 1 WHERE id = $1",
                            &[&i64::from(round % 20 + 1)],
                        )
                        .await?;
                        tx.execute(
                            "INSERT INTO shop.users (id, email) VALUES ($1, $2)",
                            &[&user, &format!("{user}@example.com")],
                        )
                        .await?;
                        tx.commit().await
                    };
                    if write.await.is_ok() {
                        acknowledged += 1;
                    }
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| {
        pgs[1].stop(StopMode::Fast);
        pgs[1].restart();
    });
    // A node whose database goes away exits, and its service manager starts it again: as one
    // would, so does the test.
    let mut waited = 0;
    while !nodes[1].has_exited() && waited < 100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    if nodes[1].has_exited() {
        let (_, logs) = nodes.pop().expect("two nodes").terminate();
        assert!(
            logs.contains("connection closed"),
            "node 2 exited because its database went away: {logs}"
        );
        nodes.push(RunningNode::start(&files[1].config, &[]));
    }
    let mut acknowledged = 0;
    for writer in writers {
        acknowledged += writer.await.unwrap();
    }
    assert!(acknowledged > 300, "writes went on around the restart: {acknowledged}");
    let dbs = [client(&verified(0)).await, client(&verified(1)).await];
    let tables = ["shop.products", "shop.users"];
    let started = std::time::Instant::now();
    while snapshot(&dbs[0], &tables).await != snapshot(&dbs[1], &tables).await {
        if started.elapsed() > Duration::from_secs(90) {
            let logs: Vec<String> = nodes.into_iter().map(|n| n.terminate().1).collect();
            panic!(
                "the nodes did not converge within 90 s; their logs:\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for db in &dbs {
        let row = db
            .query_one(
                "SELECT (SELECT sum(stock)::bigint FROM shop.products), (SELECT count(*) FROM shop.users)",
                &[],
            )
            .await
            .unwrap();
        let (stock, committed): (i64, i64) = (row.get(0), row.get(1));
        assert!(
            committed >= acknowledged,
            "{committed} rows for {acknowledged} acknowledged writes"
        );
        assert_eq!(stock, 20 * 100 + committed, "every committed increment counted once");
    }
    wait_until(
        "node 2's capture streams over TLS again",
        Duration::from_secs(30),
        || capture_is_encrypted(&dbs[1]),
    )
    .await;
    for node in nodes {
        let (ok, logs) = node.terminate();
        assert!(ok, "{logs}");
    }
}
