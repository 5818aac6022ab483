//! The PostgreSQL test harness itself: what every database test relies on.

mod support;

use std::net::TcpStream;

use support::pg::{locate_bin_dir, PgCluster, StopMode};

#[tokio::test]
async fn three_clusters_run_at_once_ready_for_logical_decoding() {
    let clusters = PgCluster::start_many(3);
    let mut ports: Vec<u16> = clusters.iter().map(PgCluster::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3, "each cluster has its own port");

    for cluster in &clusters {
        let client = cluster.connect("postgres").await;
        let show = |name: &'static str| {
            let client = &client;
            async move {
                let row = client.query_one(&format!("SHOW {name}"), &[]).await.unwrap();
                row.get::<_, String>(0)
            }
        };
        assert_eq!(show("wal_level").await, "logical");
        assert_eq!(show("track_commit_timestamp").await, "on");
        assert_eq!(show("listen_addresses").await, "127.0.0.1");
        assert!(show("max_replication_slots").await.parse::<u32>().unwrap() >= 10);
        assert!(show("max_wal_senders").await.parse::<u32>().unwrap() >= 10);
        assert!(show("unix_socket_directories")
            .await
            .starts_with(&std::env::temp_dir().display().to_string()));
        // A logical slot can be made only when all of the above took effect.
        client
            .query_one(
                "SELECT pg_create_logical_replication_slot('harness_check', 'test_decoding')",
                &[],
            )
            .await
            .unwrap();
    }

    let data_dirs: Vec<_> = clusters.iter().map(PgCluster::data_dir).collect();
    drop(clusters);
    for (dir, port) in data_dirs.iter().zip(ports) {
        assert!(!dir.exists(), "{} is removed", dir.display());
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "nothing listens on {port} any more"
        );
    }
}

#[tokio::test]
async fn a_crashed_server_restarts_with_its_committed_data() {
    let mut cluster = PgCluster::start();
    let client = cluster.create_database("crash").await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);")
        .await
        .unwrap();
    drop(client);
    cluster.stop(StopMode::Immediate);
    cluster.restart();
    let client = cluster.connect("crash").await;
    let count: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(count, 2);
}

#[test]
fn missing_binaries_fail_with_what_to_install() {
    let err = locate_bin_dir(None, vec!["/nonexistent/bin".into()]).unwrap_err();
    assert!(err.contains("/nonexistent/bin"), "{err}");
    assert!(err.contains("apt-get install -y postgresql-15"), "{err}");
    let err = locate_bin_dir(Some("/nonexistent/pg".into()), vec![]).unwrap_err();
    assert!(err.contains("ACCORD_PG_BIN=/nonexistent/pg"), "{err}");
    assert!(err.contains("apt-get install -y postgresql-15"), "{err}");
}
