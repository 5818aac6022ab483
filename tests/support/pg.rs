//! Temporary PostgreSQL clusters for tests: [`accord::scratch_pg`], whose errors fail the test here
//! with their reason (a test has nothing better to do with them).

use std::ffi::OsString;
use std::ops::Deref;
use std::path::{Path, PathBuf};

pub use accord::scratch_pg::*;

/// [`accord::scratch_pg::PgCluster`], panicking where it returns an error.
pub struct PgCluster(accord::scratch_pg::PgCluster);

impl PgCluster {
    pub fn start() -> PgCluster {
        PgCluster(accord::scratch_pg::PgCluster::start().unwrap_or_else(|e| panic!("{e:#}")))
    }

    pub fn start_many(n: usize) -> Vec<PgCluster> {
        accord::scratch_pg::PgCluster::start_many(n)
            .unwrap_or_else(|e| panic!("{e:#}"))
            .into_iter()
            .map(PgCluster)
            .collect()
    }

    // Delegated by name (not only through Deref) so that tests can name them as paths,
    // `map(PgCluster::port)`.
    pub fn port(&self) -> u16 {
        self.0.port()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.0.data_dir()
    }

    pub fn bin_dir(&self) -> &Path {
        self.0.bin_dir()
    }

    pub fn dsn(&self, dbname: &str) -> String {
        self.0.dsn(dbname)
    }

    pub async fn connect(&self, dbname: &str) -> tokio_postgres::Client {
        self.0.connect(dbname).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub async fn create_database(&self, name: &str) -> tokio_postgres::Client {
        self.0.create_database(name).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn stop(&mut self, mode: StopMode) {
        self.0.stop(mode).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn restart(&mut self) {
        self.0.restart().unwrap_or_else(|e| panic!("{e:#}"))
    }
}

impl Deref for PgCluster {
    type Target = accord::scratch_pg::PgCluster;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// [`accord::scratch_pg::locate_bin_dir`] with the error as its message.
pub fn locate_bin_dir(from_env: Option<OsString>, candidates: Vec<PathBuf>) -> Result<PathBuf, String> {
    accord::scratch_pg::locate_bin_dir(from_env, candidates).map_err(|e| e.to_string())
}
