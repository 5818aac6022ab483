//! Temporary PostgreSQL clusters from the installed server binaries (for `accord demo` and tests).
//!
//! Each [`PgCluster`] is a fresh `initdb` in its own temporary directory, listening on 127.0.0.1 on
//! a port of its own (its unix socket is inside that directory), configured for logical decoding.
//! Dropping it stops the server and deletes the directory. Any number can run at once, from any
//! number of threads. Missing binaries are an error that says what to install: a test suite that
//! silently skipped its database tests would prove nothing.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::thread;

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

const SERVER_SETTINGS: &str = "
listen_addresses = '127.0.0.1'
wal_level = logical
track_commit_timestamp = on
max_replication_slots = 16
max_wal_senders = 16
max_connections = 50
shared_buffers = 16MB
# Scratch clusters outlive no machine crash; a PostgreSQL crash (immediate stop) loses nothing without fsync.
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

#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    run_as: Option<&'static str>,
    port: u16,
    running: bool,
    // Last, so that the server is stopped (in Drop) before its directory goes.
    dir: TempDir,
}

impl PgCluster {
    /// A new cluster in the system's temporary directory, started.
    pub fn start() -> Result<PgCluster> {
        Self::start_in(&std::env::temp_dir())
    }

    /// A new cluster in a new directory under `parent`, started. When we run as root the server
    /// runs as `postgres`, which must be able to traverse `parent`.
    pub fn start_in(parent: &Path) -> Result<PgCluster> {
        let bin = bin_dir()?;
        let run_as = run_as();
        let dir = tempfile::Builder::new()
            .prefix("accord-pg-")
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a directory for PostgreSQL in {}", parent.display()))?;
        if let Some(user) = run_as {
            give_to(dir.path(), user)?;
        }
        let mut cluster = PgCluster {
            bin,
            run_as,
            port: 0,
            running: false,
            dir,
        };
        cluster.init()?;
        cluster.start_on_a_free_port()?;
        Ok(cluster)
    }

    /// `n` new clusters in the system's temporary directory, set up side by side.
    pub fn start_many(n: usize) -> Result<Vec<PgCluster>> {
        Self::start_many_in(n, &std::env::temp_dir())
    }

    /// `n` new clusters under `parent`, set up side by side. On an error, those that did start are
    /// stopped and removed again.
    pub fn start_many_in(n: usize, parent: &Path) -> Result<Vec<PgCluster>> {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let parent = parent.to_path_buf();
                thread::spawn(move || PgCluster::start_in(&parent))
            })
            .collect();
        let results: Vec<Result<PgCluster>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("starting a PostgreSQL cluster panicked")))
            })
            .collect();
        results.into_iter().collect()
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

    /// The cluster's own directory: the data directory, the server log and the unix socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A connection to `dbname`, its connection task running on the current tokio runtime.
    pub async fn connect(&self, dbname: &str) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.dsn(dbname), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("cannot connect to {}", self.dsn(dbname)))?;
        tokio::spawn(async move {
            // Ends with an error when the server goes away, which the client's user sees itself.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Creates database `name` and returns a connection to it.
    pub async fn create_database(&self, name: &str) -> Result<tokio_postgres::Client> {
        let admin = self.connect("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")))
            .await
            .with_context(|| format!("cannot create database {name}"))?;
        self.connect(name).await
    }

    /// Stops the server; [`PgCluster::restart`] starts it again on the same port with the same data.
    pub fn stop(&mut self, mode: StopMode) -> Result<()> {
        let out = self.pg_ctl(&["stop", "-w", "-m", mode.arg()])?;
        if !out.status.success() {
            bail!("pg_ctl stop failed: {}", self.describe(&out));
        }
        self.running = false;
        Ok(())
    }

    pub fn restart(&mut self) -> Result<()> {
        let out = self.start_server()?;
        if !out.status.success() {
            bail!("PostgreSQL did not start again: {}", self.describe(&out));
        }
        self.running = true;
        Ok(())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn init(&self) -> Result<()> {
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
        })?;
        if !out.status.success() {
            bail!("initdb failed: {}", self.describe(&out));
        }
        let settings = format!(
            "{SERVER_SETTINGS}unix_socket_directories = '{}'\n",
            self.dir.path().display()
        );
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).with_context(|| format!("cannot read {}", conf.display()))?;
        text.push_str(&settings);
        fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))
    }

    /// Ports are taken from the OS and may be taken by someone else before the server binds them,
    /// so a start that fails to bind tries another port.
    fn start_on_a_free_port(&mut self) -> Result<()> {
        const ATTEMPTS: usize = 8;
        for _ in 0..ATTEMPTS {
            self.port = free_port()?;
            let out = self.start_server()?;
            if out.status.success() {
                self.running = true;
                return Ok(());
            }
            let log = self.log();
            if !(log.contains("could not bind") || log.contains("Address already in use")) {
                bail!("PostgreSQL did not start: {}", self.describe(&out));
            }
        }
        bail!("PostgreSQL found no free port in {ATTEMPTS} attempts:\n{}", self.log())
    }

    fn start_server(&self) -> Result<Output> {
        self.pg_ctl(&["start", "-w", "-t", "60", "-o", &format!("-p {}", self.port)])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<Output> {
        let (data, log) = (self.data_dir(), self.log_path());
        self.command("pg_ctl", |cmd| {
            cmd.arg("-D").arg(&data).arg("-l").arg(&log).args(args);
        })
    }

    /// Runs a server binary, as the `postgres` user when we are root (PostgreSQL refuses root).
    fn command(&self, program: &str, args: impl FnOnce(&mut Command)) -> Result<Output> {
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
        // The server must not inherit the caller's libpq settings or locale.
        cmd.env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .env("LC_ALL", "C");
        cmd.current_dir(self.dir.path());
        cmd.output().with_context(|| format!("cannot run {}", path.display()))
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
            // Nothing in a scratch cluster is worth a clean shutdown, and Drop cannot report errors.
            let _ = self.pg_ctl(&["stop", "-w", "-m", "immediate"]);
        }
    }
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `ACCORD_PG_BIN`, else PostgreSQL 15's
/// Debian location, else `pg_config --bindir`, else the newest version under /usr/lib/postgresql.
fn bin_dir() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| find_bin_dir().map_err(|e| e.to_string()))
        .clone()
        .map_err(|message| anyhow!(message))
}

/// A PostgreSQL client program (`pg_dump`, `psql`): from the server binaries' directory when it
/// has it, else from `PATH`.
pub fn pg_tool(name: &str) -> Result<PathBuf> {
    if let Ok(dir) = bin_dir() {
        if dir.join(name).is_file() {
            return Ok(dir.join(name));
        }
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            anyhow!("{name} was not found (PATH, PostgreSQL's binaries): install PostgreSQL's client programs (apt-get install -y postgresql-client-15)")
        })
}

fn find_bin_dir() -> Result<PathBuf> {
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

const INSTALL_HINT: &str = "accord needs PostgreSQL's server binaries here: install them with \
     `apt-get install -y postgresql-15`, or set ACCORD_PG_BIN to the directory holding initdb, pg_ctl and postgres.";

/// The first of `from_env` (which, when set, must be right) or `candidates` that holds the server.
pub fn locate_bin_dir(from_env: Option<OsString>, candidates: Vec<PathBuf>) -> Result<PathBuf> {
    let has_server = |dir: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|b| dir.join(b).is_file());
    if let Some(dir) = from_env {
        let dir = PathBuf::from(dir);
        if has_server(&dir) {
            return Ok(dir);
        }
        bail!(
            "ACCORD_PG_BIN={} holds no initdb, pg_ctl and postgres. {INSTALL_HINT}",
            dir.display()
        );
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    candidates.into_iter().find(|dir| has_server(dir)).ok_or_else(|| {
        anyhow!(
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
pub fn run_as() -> Option<&'static str> {
    let uid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    (uid == 0).then_some("postgres")
}

fn give_to(dir: &Path, user: &str) -> Result<()> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id")
            .args([flag, user])
            .output()
            .context("cannot run `id`")?;
        if !out.status.success() {
            bail!(
                "running as root, accord starts PostgreSQL as user `{user}`, which does not exist; \
                 install PostgreSQL with `apt-get install -y postgresql-15`, which creates it"
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("`id {flag} {user}` printed no number"))
    };
    std::os::unix::fs::chown(dir, Some(id("-u")?), Some(id("-g")?))
        .with_context(|| format!("cannot give {} to {user}", dir.display()))
}

/// A port nobody listens on now, and that no other cluster of this process was given.
fn free_port() -> Result<u16> {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a port on 127.0.0.1")?;
        let port = listener.local_addr().context("a bound socket has no address")?.port();
        let mut given = given.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if given.insert(port) {
            return Ok(port);
        }
    }
}
