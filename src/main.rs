//! The `accord` command.

mod check;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "accord",
    version,
    about = "Active-active PostgreSQL with per-column merge policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a database's @accord annotations without changing anything.
    ///
    /// Prints the replicated tables with each column's policy, then every error and warning.
    /// Exits with 0 when there is no error, 1 when there are errors, 2 when the check could not run.
    Check(check::CheckArgs),
}

/// The check ran but found errors.
const EXIT_FOUND_ERRORS: u8 = 1;
/// The command could not do its work (a connection refused, a query failed, ...).
const EXIT_FAILED: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(anyhow::Error::new(error).context("cannot start the async runtime")),
    };
    let result = match cli.command {
        Command::Check(args) => runtime.block_on(check::run(args)),
    };
    match result {
        Ok(check::Verdict::Clean) => ExitCode::SUCCESS,
        Ok(check::Verdict::FoundErrors) => ExitCode::from(EXIT_FOUND_ERRORS),
        Err(error) => fail(error),
    }
}

fn fail(error: anyhow::Error) -> ExitCode {
    eprintln!("accord: error: {error:#}");
    ExitCode::from(EXIT_FAILED)
}
