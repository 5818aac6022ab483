//! A libpq connection string, read so that its TLS options reach every connection accord makes.
//!
//! tokio-postgres reads the rest of the string, but it knows `sslmode` values only up to `require`
//! and none of libpq's certificate options (`sslrootcert`, `sslcert`, `sslkey`): those are taken
//! out here, and the rest is handed to it unchanged in meaning.

use std::fmt;
use std::path::{Path, PathBuf};

use percent_encoding::percent_decode_str;

/// libpq's `sslmode`, the values accord supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, without checking its certificate (libpq's default).
    Prefer,
    /// TLS always, without checking the certificate.
    Require,
    /// TLS, and the server's certificate must be signed by a trusted root.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<Self, DsnError> {
        Ok(match text {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(DsnError::UnknownSslMode(other.to_owned())),
        })
    }

    pub fn verifies_certificate(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        })
    }
}

/// Where the roots that a server's certificate must chain to come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file (`sslrootcert=FILE`, or libpq's default `~/.postgresql/root.crt`).
    File(PathBuf),
    /// `sslrootcert=system`: the Mozilla roots (webpki-roots), the same on every machine.
    System,
}

/// A client certificate for servers that authenticate clients by certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The TLS part of a connection string, as libpq would act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// The mode in effect: `require` with a root certificate file checks the chain, as libpq
    /// does, so it reads as `VerifyCa` here.
    pub mode: SslMode,
    pub roots: Option<RootCerts>,
    pub client_cert: Option<ClientCert>,
}

#[derive(Debug, thiserror::Error)]
pub enum DsnError {
    #[error("the connection string is not valid: {0}")]
    Syntax(String),
    #[error("sslmode={0:?} is not supported: use disable, prefer, require, verify-ca or verify-full")]
    UnknownSslMode(String),
    #[error(
        "sslmode={mode} checks the server's certificate, so it needs the root certificate that signed it: \
         give sslrootcert=FILE (or sslrootcert=system for the Mozilla roots); libpq's default {default} does not exist"
    )]
    NoRootCert { mode: SslMode, default: String },
    #[error("sslcert and sslkey go together, but only {0} is given")]
    HalfClientCert(&'static str),
    #[error("the connection string is not valid: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

/// A connection string read whole: tokio-postgres's configuration and the TLS options.
#[derive(Debug, Clone)]
pub struct Dsn {
    pub config: tokio_postgres::Config,
    pub tls: TlsOptions,
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl Dsn {
    pub fn parse(text: &str) -> Result<Self, DsnError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Self::parse_with_home(text, home.as_deref())
    }

    /// As `parse`, with libpq's default root certificate looked for under `home`.
    pub fn parse_with_home(text: &str, home: Option<&Path>) -> Result<Self, DsnError> {
        let (rest, options) = split_tls_options(text)?;
        let option = |key: &str| options.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let mut mode = option("sslmode")
            .map(SslMode::parse)
            .transpose()?
            .unwrap_or(SslMode::Prefer);
        let default_root = home.map(|h| h.join(".postgresql").join("root.crt"));
        let roots = match option("sslrootcert") {
            Some("system") => Some(RootCerts::System),
            Some(path) => Some(RootCerts::File(PathBuf::from(path))),
            None => default_root
                .as_ref()
                .filter(|p| p.exists())
                .cloned()
                .map(RootCerts::File),
        };
        if mode == SslMode::Require && matches!(roots, Some(RootCerts::File(_))) {
            mode = SslMode::VerifyCa;
        }
        let mut config: tokio_postgres::Config = rest.parse()?;
        // libpq ignores sslmode over Unix sockets (the server never offers TLS there).
        let unix_only = !config.get_hosts().is_empty()
            && config
                .get_hosts()
                .iter()
                .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        if unix_only {
            mode = SslMode::Disable;
        }
        if mode.verifies_certificate() && roots.is_none() {
            return Err(DsnError::NoRootCert {
                mode,
                default: default_root.map_or("~/.postgresql/root.crt".to_owned(), |p| p.display().to_string()),
            });
        }
        let client_cert = match (option("sslcert"), option("sslkey")) {
            (Some(cert), Some(key)) => Some(ClientCert {
                cert: cert.into(),
                key: key.into(),
            }),
            (Some(_), None) => return Err(DsnError::HalfClientCert("sslcert")),
            (None, Some(_)) => return Err(DsnError::HalfClientCert("sslkey")),
            (None, None) => None,
        };
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        Ok(Self {
            config,
            tls: TlsOptions {
                mode,
                roots,
                client_cert,
            },
        })
    }
}

/// The connection string without the TLS options, and those options (decoded), in order.
fn split_tls_options(text: &str) -> Result<(String, Vec<(String, String)>), DsnError> {
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        split_url(text)
    } else {
        split_key_values(text)
    }
}

fn split_url(text: &str) -> Result<(String, Vec<(String, String)>), DsnError> {
    let Some((base, query)) = text.split_once('?') else {
        return Ok((text.to_owned(), Vec::new()));
    };
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| DsnError::Syntax(format!("{s:?} is not UTF-8 once decoded")))
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key_decoded = decode(key)?;
        if TLS_KEYS.contains(&key_decoded.as_str()) {
            taken.push((key_decoded, decode(value)?));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, taken))
}

/// libpq's `key = value` form: values may be single-quoted, and a backslash escapes the next
/// character in either kind of value.
fn split_key_values(text: &str) -> Result<(String, Vec<(String, String)>), DsnError> {
    let (taken, kept): (Vec<_>, Vec<_>) = key_values(text)?
        .into_iter()
        .partition(|(key, _)| TLS_KEYS.contains(&key.as_str()));
    Ok((join_key_values(&kept), taken))
}

/// The pairs in written order, values unquoted and unescaped.
pub(super) fn key_values(text: &str) -> Result<Vec<(String, String)>, DsnError> {
    let mut chars = text.chars().peekable();
    let mut pairs = Vec::new();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(DsnError::Syntax(format!("{key:?} has no value (expected {key}=value)")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(DsnError::Syntax(format!("the value of {key:?} has no closing quote"))),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

pub(super) fn join_key_values(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Dsn, DsnError> {
        Dsn::parse_with_home(text, None)
    }

    #[test]
    fn without_tls_options_the_default_is_prefer_and_the_rest_is_kept() {
        let dsn = parse("host=db.example port=6543 user=app password='a b\\'c' dbname=shop").unwrap();
        assert_eq!(dsn.tls.mode, SslMode::Prefer);
        assert_eq!(dsn.config.get_ports(), &[6543]);
        assert_eq!(dsn.config.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(dsn.config.get_dbname(), Some("shop"));
        assert_eq!(dsn.config.get_ssl_mode(), tokio_postgres::config::SslMode::Prefer);
    }

    #[test]
    fn verify_full_with_a_root_file_is_taken_out_of_a_key_value_string() {
        let dsn = parse("host=db sslmode = verify-full sslrootcert='/etc/ca dir/root.pem' user=u").unwrap();
        assert_eq!(dsn.tls.mode, SslMode::VerifyFull);
        assert_eq!(dsn.tls.roots, Some(RootCerts::File("/etc/ca dir/root.pem".into())));
        assert_eq!(dsn.config.get_user(), Some("u"));
        assert_eq!(dsn.config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn url_parameters_are_decoded_and_the_rest_of_the_query_kept() {
        let dsn =
            parse("postgresql://u:pw@db:5433/shop?sslmode=verify-ca&application_name=x&sslrootcert=%2Ftmp%2Fca.pem")
                .unwrap();
        assert_eq!(dsn.tls.mode, SslMode::VerifyCa);
        assert_eq!(dsn.tls.roots, Some(RootCerts::File("/tmp/ca.pem".into())));
        assert_eq!(dsn.config.get_application_name(), Some("x"));
        assert_eq!(dsn.config.get_ports(), &[5433]);
        let dsn = parse("postgres://u@db/shop?sslmode=disable").unwrap();
        assert_eq!(dsn.tls.mode, SslMode::Disable);
        assert_eq!(dsn.config.get_dbname(), Some("shop"));
    }

    #[test]
    fn require_with_a_root_file_checks_the_chain_as_libpq_does() {
        let dsn = parse("host=db sslmode=require sslrootcert=/ca.pem").unwrap();
        assert_eq!(dsn.tls.mode, SslMode::VerifyCa);
        let dsn = parse("host=db sslmode=require sslrootcert=system").unwrap();
        assert_eq!(dsn.tls.mode, SslMode::Require);
    }

    #[test]
    fn libpqs_default_root_file_is_used_when_it_exists() {
        let home = tempfile::tempdir().unwrap();
        let missing = Dsn::parse_with_home("host=db sslmode=verify-full", Some(home.path())).unwrap_err();
        assert!(matches!(missing, DsnError::NoRootCert { .. }), "{missing}");
        assert!(missing.to_string().contains("sslrootcert=FILE"), "{missing}");
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        std::fs::write(home.path().join(".postgresql/root.crt"), "").unwrap();
        let dsn = Dsn::parse_with_home("host=db sslmode=verify-full", Some(home.path())).unwrap();
        assert_eq!(
            dsn.tls.roots,
            Some(RootCerts::File(home.path().join(".postgresql/root.crt")))
        );
    }

    #[test]
    fn bad_tls_options_are_refused_with_what_to_do() {
        let unknown = parse("host=db sslmode=verify_full").unwrap_err();
        assert!(unknown.to_string().contains("verify-full"), "{unknown}");
        let half = parse("host=db sslmode=require sslcert=/c.pem").unwrap_err();
        assert!(matches!(half, DsnError::HalfClientCert("sslcert")), "{half}");
        let open = parse("host=db password='abc").unwrap_err();
        assert!(open.to_string().contains("closing quote"), "{open}");
        let novalue = parse("host").unwrap_err();
        assert!(matches!(novalue, DsnError::Syntax(_)), "{novalue}");
    }

    #[test]
    fn sslmode_does_not_apply_over_unix_sockets() {
        let dsn = parse("host=/var/run/postgresql sslmode=verify-full dbname=shop").unwrap();
        assert_eq!(dsn.tls.mode, SslMode::Disable);
        assert_eq!(dsn.config.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
    }

    #[test]
    fn system_roots_and_client_certificates() {
        let dsn = parse("host=db sslmode=verify-full sslrootcert=system sslcert=/c.pem sslkey=/k.pem").unwrap();
        assert_eq!(dsn.tls.roots, Some(RootCerts::System));
        assert_eq!(
            dsn.tls.client_cert,
            Some(ClientCert {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            })
        );
    }
}
