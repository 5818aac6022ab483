//! The `accord` command.

mod check;

use std::path::PathBuf;
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
    /// Make the cluster CA and node certificates; nodes authenticate each other with mutual TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run the deterministic simulator: the real merge and replication logic of N nodes under
    /// network, clock and crash faults, checked against the invariants. One line per seed, then
    /// `N passed, N failed`; a failure prints the command that replays it. Exits 1 on a failure.
    Sim(accord_sim::SimArgs),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Make a new cluster CA: DIR/ca.pem and DIR/ca.key (mode 0600; keep it off the nodes).
    Init {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = accord_transport::certs::DEFAULT_DAYS)]
        days: u32,
    },
    /// Make node ID's key and certificate, signed by the CA in --ca-dir: DIR/node-ID.pem,
    /// DIR/node-ID.key (mode 0600) and a copy of ca.pem. Never overwrites a file.
    Node {
        id: u32,
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = accord_transport::certs::DEFAULT_DAYS)]
        days: u32,
    },
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
        Command::Certs(command) => certs(command).map(|()| check::Verdict::Clean),
        Command::Sim(args) => accord_sim::run_cli(&args, &mut std::io::stdout().lock())
            .map(|passed| {
                if passed {
                    check::Verdict::Clean
                } else {
                    check::Verdict::FoundErrors
                }
            })
            .map_err(anyhow::Error::new),
    };
    match result {
        Ok(check::Verdict::Clean) => ExitCode::SUCCESS,
        Ok(check::Verdict::FoundErrors) => ExitCode::from(EXIT_FOUND_ERRORS),
        Err(error) => fail(error),
    }
}

fn certs(command: CertsCommand) -> anyhow::Result<()> {
    use accord_transport::certs;
    let written = match command {
        CertsCommand::Init { out, days } => {
            let files = certs::init(&out, days)?;
            vec![files.cert, files.key]
        }
        CertsCommand::Node { id, ca_dir, out, days } => {
            let files = certs::node(accord_engine::NodeId(id), &ca_dir, &out, days)?;
            vec![files.cert, files.key, files.ca_cert]
        }
    };
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

fn fail(error: anyhow::Error) -> ExitCode {
    eprintln!("accord: error: {error:#}");
    ExitCode::from(EXIT_FAILED)
}
