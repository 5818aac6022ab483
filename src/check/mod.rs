//! `accord check`: lint a database's annotations, changing nothing.

mod json;
mod text;

use std::time::Duration;

use accord::pg_connection::{self, Dsn};
use accord_schema_annotations::pg;
use anyhow::Context;
use clap::{Args, ValueEnum};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The database to check, as a connection string (`host=... dbname=...`) or a postgres:// URL.
    #[arg(long)]
    dsn: String,
    /// `text` for people, `json` for machines.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    FoundErrors,
}

/// A server that does not answer should not leave the user waiting forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: CheckArgs) -> anyhow::Result<Verdict> {
    let mut dsn = Dsn::parse(&args.dsn).context("--dsn is not a valid connection string")?;
    if dsn.config.get_connect_timeout().is_none() {
        dsn.config.connect_timeout(CONNECT_TIMEOUT);
    }
    if dsn.config.get_application_name().is_none() {
        dsn.config.application_name("accord check");
    }
    // The DSN is not repeated in messages: it may hold a password.
    let (mut client, connection) = pg_connection::connect_parsed(&dsn).await.with_context(|| {
        format!(
            "cannot connect to the database given by --dsn{}",
            pg_connection::tls_note(&dsn.tls)
        )
    })?;
    let connection = tokio::spawn(connection);
    let checked = pg::check_database(&mut client).await?;
    drop(client);
    // The connection ends once the client is gone; how it ended changes nothing that was read.
    let _ = connection.await;

    let report = match args.format {
        Format::Text => text::render(&checked),
        Format::Json => json::render(&checked)?,
    };
    print!("{report}");
    Ok(if checked.has_errors() {
        Verdict::FoundErrors
    } else {
        Verdict::Clean
    })
}
