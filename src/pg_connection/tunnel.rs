//! Where the replication stream connects, with TLS made by accord.
//!
//! pgwire-replication speaks the replication protocol, but its own TLS feature turns on rustls'
//! default provider (aws-lc), and accord ships one provider, ring, everywhere. So accord makes
//! the TLS connection itself, with the same configuration as every other connection, and hands
//! pgwire-replication a Unix socket in a directory only this user can open, relaying bytes
//! between the two.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio_postgres::config::Host;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::dsn::{Dsn, SslMode};
use super::tls;

/// PostgreSQL's SSLRequest: length 8, then the code 1234 5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// How long a tunnel waits for pgwire-replication to connect before it gives up.
const ACCEPT_WITHIN: Duration = Duration::from_secs(30);
const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// Host and port to give pgwire-replication: the server itself, or a tunnel's socket directory
/// (a host starting with `/` is a socket directory, as in libpq).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationEndpoint {
    pub host: String,
    pub port: u16,
}

/// Opens the TLS connection now, when the connection string asks for it, so that a refused
/// certificate fails here with a clear message rather than as a broken stream.
pub async fn replication_endpoint(dsn: &Dsn) -> Result<ReplicationEndpoint> {
    let host = match dsn.config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(path)) => path.to_string_lossy().into_owned(),
        None => "localhost".to_owned(),
    };
    let port = dsn.config.get_ports().first().copied().unwrap_or(5432);
    let direct = ReplicationEndpoint {
        host: host.clone(),
        port,
    };
    // libpq does not use TLS over Unix sockets either.
    if dsn.tls.mode == SslMode::Disable || host.starts_with('/') {
        return Ok(direct);
    }
    let within = dsn.config.get_connect_timeout().copied().unwrap_or(CONNECT_WITHIN);
    let mut tcp = tokio::time::timeout(within, TcpStream::connect((host.as_str(), port)))
        .await
        .with_context(|| format!("cannot reach {host}:{port} within {within:?}"))?
        .with_context(|| format!("cannot reach {host}:{port}"))?;
    tcp.set_nodelay(true)?;
    tcp.write_all(&SSL_REQUEST).await?;
    let offered = tcp
        .read_u8()
        .await
        .context("the server closed the connection when asked for TLS")?;
    if offered != b'S' {
        if dsn.tls.mode == SslMode::Prefer {
            return Ok(direct);
        }
        bail!(
            "the server at {host}:{port} does not offer TLS, but sslmode={} requires it",
            dsn.tls.mode
        );
    }
    let config = tls::client_config(&dsn.tls)?.context("TLS is configured for every mode but disable")?;
    let mut make = MakeRustlsConnect::new(config);
    let connector = <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::make_tls_connect(&mut make, &host)
        .with_context(|| format!("{host:?} cannot be a TLS server name"))?;
    let mut server = connector
        .connect(tcp)
        .await
        .context("the TLS handshake with the server failed")?;

    let dir = tempfile::Builder::new().prefix("accord-pg-tls-").tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    let listener = UnixListener::bind(dir.path().join(format!(".s.PGSQL.{port}")))
        .context("cannot make the replication stream's local socket")?;
    let socket_dir = dir.path().to_string_lossy().into_owned();
    tokio::spawn(async move {
        let accepted = tokio::time::timeout(ACCEPT_WITHIN, listener.accept()).await;
        // One connection only: nobody else may ride this session.
        drop(listener);
        drop(dir);
        let Ok(Ok((mut local, _))) = accepted else {
            tracing::debug!("the replication stream did not connect to its TLS tunnel");
            return;
        };
        if let Err(error) = tokio::io::copy_bidirectional(&mut local, &mut server).await {
            tracing::debug!(%error, "the replication stream's TLS tunnel ended");
        }
    });
    Ok(ReplicationEndpoint { host: socket_dir, port })
}
