//! How the service reaches PostgreSQL: a libpq connection string with its TLS options
//! (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) honoured on every connection, the
//! replication stream's included.

mod dsn;
mod tls;
mod tunnel;

use anyhow::{Context, Result};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

pub use dsn::{ClientCert, Dsn, DsnError, RootCerts, SslMode, TlsOptions};
pub use tls::TlsSetupError;
pub use tunnel::{replication_endpoint, ReplicationEndpoint};

/// A connection for queries; its connection task runs until the client is dropped.
pub async fn connect(dsn: &str) -> Result<Client> {
    let parsed = Dsn::parse(dsn).with_context(|| format!("cannot use the connection string ({})", redact(dsn)))?;
    let (client, connection) = connect_parsed(&parsed).await.with_context(|| {
        format!(
            "cannot connect to the database ({}{})",
            redact(dsn),
            tls_note(&parsed.tls)
        )
    })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "database connection ended");
        }
    });
    Ok(client)
}

/// A connection and its task, for callers that run the task themselves.
pub async fn connect_parsed(
    dsn: &Dsn,
) -> Result<(
    Client,
    impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
)> {
    let make = MakeRustlsConnect::new(match tls::client_config(&dsn.tls)? {
        Some(config) => config,
        // tokio-postgres never asks for TLS with sslmode=disable; the connector is not used.
        None => tls::client_config(&TlsOptions {
            mode: SslMode::Require,
            roots: None,
            client_cert: None,
        })?
        .context("a TLS configuration exists for sslmode=require")?,
    });
    let (client, connection) = dsn.config.connect(make).await?;
    Ok((client, connection))
}

/// What a connection error should also say about TLS, so that a refused certificate reads as
/// what it is.
pub fn tls_note(tls: &TlsOptions) -> String {
    match (&tls.mode, &tls.roots) {
        (SslMode::VerifyCa | SslMode::VerifyFull, Some(RootCerts::File(path))) => {
            format!("; sslmode={} against the roots in {}", tls.mode, path.display())
        }
        (SslMode::VerifyCa | SslMode::VerifyFull, _) => format!("; sslmode={} against the Mozilla roots", tls.mode),
        (mode, _) => format!("; sslmode={mode}"),
    }
}

/// A DSN with any password replaced, for messages.
pub fn redact(dsn: &str) -> String {
    // The URL form: postgres://user:secret@host/db
    if let Some((scheme, rest)) = dsn.split_once("://") {
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            return format!("{scheme}://{user}{hidden}@{host}{}", redact_query(tail));
        }
        return format!("{scheme}://{authority}{}", redact_query(tail));
    }
    match dsn::key_values(dsn) {
        Ok(mut pairs) => {
            for (key, value) in &mut pairs {
                if key == "password" {
                    *value = "***".to_owned();
                }
            }
            dsn::join_key_values(&pairs)
        }
        // Unreadable: say nothing of it but its length.
        Err(_) => format!("an unreadable connection string of {} characters", dsn.len()),
    }
}

fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let query = query
        .split('&')
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{path}?{query}")
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_hidden_in_both_forms() {
        assert_eq!(
            redact("host=h password=s3cret user=u"),
            "host='h' password='***' user='u'"
        );
        assert_eq!(redact("host=h password='s3 cret'"), "host='h' password='***'");
        assert_eq!(redact("postgres://u:s3cret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(
            redact("postgresql://u@h/db?password=s3cret&x=1"),
            "postgresql://u@h/db?password=***&x=1"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert!(!redact("host=h password='s3cret").contains("s3cret"));
    }
}
