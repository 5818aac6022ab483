//! `accord run` as an operator runs it: configuration files with certificates made by
//! `accord certs`, and the built binary as a process.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::cli::{accord, free_tcp_port};

/// A cluster an operator set up: certificates made (`accord certs init` into `dir`), the database
/// `shop` made with `schema` on each of `pgs`, `accord init` run on each as node 1, 2, ..., and
/// each node's configuration written (QUIC on free loopback ports). Returns the configurations
/// and a client of each database.
pub async fn init_cluster(
    pgs: &[super::pg::PgCluster],
    dir: &Path,
    schema: &str,
) -> (Vec<NodeFiles>, Vec<tokio_postgres::Client>) {
    let (ok, out) = accord(&["certs", "init", "--out", dir.join("ca").to_str().unwrap()]);
    assert!(ok, "{out}");
    let quic: Vec<(u32, u16)> = (1..=pgs.len() as u32)
        .map(|id| (id, super::nodes::free_udp_port()))
        .collect();
    let mut files = Vec::new();
    let mut dbs = Vec::new();
    for (i, pg) in pgs.iter().enumerate() {
        let db = pg.create_database("shop").await;
        db.batch_execute(schema).await.unwrap();
        let dsn = pg.dsn("shop");
        let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", &(i + 1).to_string()]);
        assert!(ok, "{out}");
        files.push(write_node(dir, i as u32 + 1, &dsn, &quic, ""));
        dbs.push(db);
    }
    (files, dbs)
}

pub struct NodeFiles {
    pub config: PathBuf,
    pub metrics: u16,
}

/// Writes node `id`'s configuration (peers: the other ids) into `dir`, with certificates made by
/// `accord certs` as an operator would.
pub fn write_node(dir: &Path, id: u32, dsn: &str, quic: &[(u32, u16)], extra: &str) -> NodeFiles {
    let certs = dir.join(format!("certs-{id}"));
    let (ok, out) = accord(&[
        "certs",
        "node",
        &id.to_string(),
        "--ca-dir",
        dir.join("ca").to_str().unwrap(),
        "--out",
        certs.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let metrics = free_tcp_port();
    let own = quic.iter().find(|(n, _)| *n == id).unwrap().1;
    let mut text = format!(
        "node_id = {id}\ncluster = \"service-test\"\ndsn = \"{dsn}\"\nlisten = \"127.0.0.1:{own}\"\n\
         [tls]\nca = \"certs-{id}/ca.pem\"\ncert = \"certs-{id}/node-{id}.pem\"\nkey = \"certs-{id}/node-{id}.key\"\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n{extra}\n"
    );
    for (peer, port) in quic.iter().filter(|(n, _)| *n != id) {
        text.push_str(&format!("[[peers]]\nid = {peer}\naddress = \"127.0.0.1:{port}\"\n"));
    }
    let config = dir.join(format!("node-{id}.toml"));
    std::fs::write(&config, text).unwrap();
    NodeFiles { config, metrics }
}

/// A running `accord run`; killed if the test fails before stopping it.
pub struct RunningNode {
    child: Option<Child>,
    exited: Option<ExitStatus>,
    /// Reads the process's log as it comes: a pipe nobody reads fills up (64 KiB), and the node
    /// then blocks in its next log line, whole runtime threads with it.
    logs: Option<std::thread::JoinHandle<String>>,
}

impl RunningNode {
    pub fn start(config: &Path, extra: &[&str]) -> RunningNode {
        let mut child = Command::new(env!("CARGO_BIN_EXE_accord"))
            .args(["run", "--config", config.to_str().unwrap()])
            .args(extra)
            .env_remove("ACCORD_DSN")
            // More detail from the nodes when a failure needs it (`ACCORD_TEST_NODE_LOG=accord=debug`).
            .env(
                "ACCORD_LOG",
                std::env::var("ACCORD_TEST_NODE_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("accord run starts");
        let mut stderr = child.stderr.take().expect("piped");
        let logs = std::thread::spawn(move || {
            let mut logs = String::new();
            let _ = stderr.read_to_string(&mut logs);
            logs
        });
        RunningNode {
            child: Some(child),
            exited: None,
            logs: Some(logs),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: a crash, with nothing flushed or said. Returns what it had logged.
    pub fn kill9(mut self) -> String {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        self.logs()
    }

    /// What the process logged; once it has ended.
    fn logs(&mut self) -> String {
        self.logs
            .take()
            .map(|reader| reader.join().unwrap_or_else(|_| "(the log reader panicked)".into()))
            .unwrap_or_default()
    }

    /// Whether the process has ended (as a node does when its database goes away).
    pub fn has_exited(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten());
        }
        self.exited.is_some()
    }

    /// SIGTERM, then the exit status and the logs.
    pub fn terminate(mut self) -> (bool, String) {
        let mut child = self.child.take().unwrap();
        if self.exited.is_none() {
            let sent = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.exited {
                break status;
            }
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("accord run did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status.success(), self.logs())
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A GET on loopback (the metrics endpoint): the whole response, `None` if it fails or takes
/// longer than 5 s.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    };
    tokio::time::timeout(Duration::from_secs(5), fetch).await.ok().flatten()
}

/// A process's memory from `/proc/PID/status`, in KiB: `field` is `VmRSS` (now) or `VmHWM`
/// (the peak).
pub fn memory_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
