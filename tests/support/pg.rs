//! Temporary PostgreSQL clusters for tests, from the installed server binaries.
//!
//! Each [`PgCluster`] is a fresh `initdb` in its own temporary directory, listening on 127.0.0.1 on
//! a port of its own (its unix socket is inside that directory), configured for logical decoding.
//! Dropping it stops the server and deletes the directory. Any number can run at once, from any
//! number of test threads. Missing binaries fail the test (they are not skipped): a suite that
//! silently skips its database tests proves nothing.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::thread;

use tempfile::TempDir;

const SERVER_SETTINGS: &str = "
listen_addresses = '127.0.0.1'
wal_level = logical
track_commit_timestamp = on
max_replication_slots = 16
max_wal_senders = 16
max_connections = 50
shared_buffers = 16MB
# Tests outlive no machine crash; a PostgreSQL crash (immediate stop) loses nothing without fsync.
fsync = off
log_min_messages = warning
";

/// How to stop a server: `Fast` is a clean shutdown, `Immediate` a crash without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    Fast,
    Immediate,
}

impl StopMode {
    fn arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

pub struct PgCluster {
    bin: PathBuf,
    run_as: Option<&'static str>,
    port: u16,
    running: bool,
    // Last, so that the server is stopped (in Drop) before its directory goes.
    dir: TempDir,
}

impl PgCluster {
    /// A new cluster, started. Panics with the reason when it cannot be had.
    pub fn start() -> PgCluster {
        let bin = bin_dir();
        let run_as = run_as();
        let dir = tempfile::Builder::new()
            .prefix("accord-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory for PostgreSQL: {e}"));
        if let Some(user) = run_as {
            give_to(dir.path(), user);
        }
        let mut cluster = PgCluster {
            bin,
            run_as,
            port: 0,
            running: false,
            dir,
        };
        cluster.init();
        cluster.start_on_a_free_port();
        cluster
    }

    /// `n` new clusters, set up side by side.
    pub fn start_many(n: usize) -> Vec<PgCluster> {
        let handles: Vec<_> = (0..n).map(|_| thread::spawn(PgCluster::start)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| panic!("starting a PostgreSQL cluster failed (see above)"))
            })
            .collect()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// A libpq-style connection string for `dbname`, as the `postgres` superuser.
    pub fn dsn(&self, dbname: &str) -> String {
        format!("host={} port={} user=postgres dbname={dbname}", self.host(), self.port)
    }

    /// The directory of the server binaries in use (`pg_recvlogical`, `psql`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A connection to `dbname`, its connection task running on the current tokio runtime.
    pub async fn connect(&self, dbname: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.dsn(dbname), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.dsn(dbname)));
        tokio::spawn(async move {
            // Ends with an error when the server goes away mid-test, which the test sees itself.
            let _ = connection.await;
        });
        client
    }

    /// Creates database `name` and returns a connection to it.
    pub async fn create_database(&self, name: &str) -> tokio_postgres::Client {
        let admin = self.connect("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        self.connect(name).await
    }

    /// Stops the server; [`PgCluster::restart`] starts it again on the same port with the same data.
    pub fn stop(&mut self, mode: StopMode) {
        let out = self.pg_ctl(&["stop", "-w", "-m", mode.arg()]);
        assert!(out.status.success(), "pg_ctl stop failed: {}", self.describe(&out));
        self.running = false;
    }

    pub fn restart(&mut self) {
        let out = self.start_server();
        assert!(
            out.status.success(),
            "PostgreSQL did not start again: {}",
            self.describe(&out)
        );
        self.running = true;
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn init(&self) {
        let data = self.data_dir();
        let out = self.command("initdb", |cmd| {
            cmd.arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]);
        });
        assert!(out.status.success(), "initdb failed: {}", self.describe(&out));
        let settings = format!(
            "{SERVER_SETTINGS}unix_socket_directories = '{}'\n",
            self.dir.path().display()
        );
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).unwrap_or_else(|e| panic!("cannot read {}: {e}", conf.display()));
        text.push_str(&settings);
        fs::write(&conf, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
    }

    /// Ports are taken from the OS and may be taken by someone else before the server binds them,
    /// so a start that fails to bind tries another port.
    fn start_on_a_free_port(&mut self) {
        const ATTEMPTS: usize = 8;
        for _ in 0..ATTEMPTS {
            self.port = free_port();
            let out = self.start_server();
            if out.status.success() {
                self.running = true;
                return;
            }
            let log = self.log();
            if !(log.contains("could not bind") || log.contains("Address already in use")) {
                panic!("PostgreSQL did not start: {}", self.describe(&out));
            }
        }
        panic!("PostgreSQL found no free port in {ATTEMPTS} attempts:\n{}", self.log());
    }

    fn start_server(&self) -> Output {
        self.pg_ctl(&["start", "-w", "-t", "60", "-o", &format!("-p {}", self.port)])
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let (data, log) = (self.data_dir(), self.log_path());
        self.command("pg_ctl", |cmd| {
            cmd.arg("-D").arg(&data).arg("-l").arg(&log).args(args);
        })
    }

    /// Runs a server binary, as the `postgres` user when we are root (PostgreSQL refuses root).
    fn command(&self, program: &str, args: impl FnOnce(&mut Command)) -> Output {
        let path = self.bin.join(program);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", user, "--"]).arg(&path);
                cmd
            }
            None => Command::new(&path),
        };
        args(&mut cmd);
        // The server must not inherit the test's libpq settings or locale.
        cmd.env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .env("LC_ALL", "C");
        cmd.current_dir(self.dir.path());
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
    }

    fn describe(&self, out: &Output) -> String {
        format!(
            "{}\nstdout:\n{}\nstderr:\n{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            // Nothing in it is worth a clean shutdown; errors are ignored as the test is over.
            let _ = self.pg_ctl(&["stop", "-w", "-m", "immediate"]);
        }
    }
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `ACCORD_PG_BIN`, else PostgreSQL 15's
/// Debian location, else `pg_config --bindir`, else the newest version under /usr/lib/postgresql.
fn bin_dir() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(find_bin_dir)
        .clone()
        .unwrap_or_else(|message| panic!("{message}"))
}

fn find_bin_dir() -> Result<PathBuf, String> {
    let mut candidates = vec![PathBuf::from("/usr/lib/postgresql/15/bin")];
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    versions.sort();
    candidates.extend(versions.into_iter().rev().map(|(_, dir)| dir));
    locate_bin_dir(std::env::var_os("ACCORD_PG_BIN"), candidates)
}

const INSTALL_HINT: &str = "These tests need a real PostgreSQL: install it with `apt-get install -y postgresql-15`, \
     or set ACCORD_PG_BIN to the directory holding initdb, pg_ctl and postgres.";

/// The first of `from_env` (which, when set, must be right) or `candidates` that holds the server.
pub fn locate_bin_dir(from_env: Option<OsString>, candidates: Vec<PathBuf>) -> Result<PathBuf, String> {
    let has_server = |dir: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|b| dir.join(b).is_file());
    if let Some(dir) = from_env {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "ACCORD_PG_BIN={} holds no initdb, pg_ctl and postgres. {INSTALL_HINT}",
                dir.display()
            ))
        };
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    candidates.into_iter().find(|dir| has_server(dir)).ok_or_else(|| {
        format!(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found (looked in: {}). {INSTALL_HINT}",
            if looked.is_empty() {
                "nowhere".to_string()
            } else {
                looked.join(", ")
            }
        )
    })
}

/// `Some("postgres")` when we run as root, as initdb and postgres refuse to.
fn run_as() -> Option<&'static str> {
    let uid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    (uid == 0).then_some("postgres")
}

fn give_to(dir: &Path, user: &str) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, user])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `id`: {e}"));
        assert!(
            out.status.success(),
            "running as root, the tests start PostgreSQL as user `{user}`, which does not exist; \
             install PostgreSQL with `apt-get install -y postgresql-15`, which creates it"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("`id {flag} {user}` printed no number: {e}"))
    };
    std::os::unix::fs::chown(dir, Some(id("-u")), Some(id("-g")))
        .unwrap_or_else(|e| panic!("cannot give {} to {user}: {e}", dir.display()));
}

/// A port nobody listens on now, and that no other cluster of this process was given.
fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("cannot bind a port: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("bound socket has no address: {e}"))
            .port();
        let mut given = given.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if given.insert(port) {
            return port;
        }
    }
}
