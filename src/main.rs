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
    /// Run the deterministic simulator of a cluster under faults.
    ///
    /// The real merge and replication logic of N nodes under network, clock and crash faults,
    /// checked against the invariants. One line per seed, then `N passed, N failed`; a failure
    /// prints the command that replays it. Exits 1 on a failure.
    Sim(accord_sim::SimArgs),
    /// Prepare a database to be a node.
    ///
    /// Checks the annotations, creates accord's schema (metadata, outbound log, review queue,
    /// conflict log), sets REPLICA IDENTITY FULL on the replicated tables, adds to each the
    /// triggers through which a local insert waits for a merge into the same key and a local
    /// removal counts itself (`zz_accord_key_lock_insert`, `zz_accord_key_lock_update`,
    /// `zz_accord_count_removals`, sequence `accord.local_removals`) and the one that records
    /// what a TRUNCATE empties (`zz_accord_record_truncate`), creates the publication and the
    /// logical slot, and records the rows that are already there. Safe to run again.
    Init {
        #[arg(long, env = "ACCORD_DSN", hide_env_values = true, value_name = "DSN")]
        dsn: String,
        #[arg(long, value_name = "ID")]
        node_id: u32,
    },
    /// Make a new node from a running node's database: copy its replicated tables and accord's
    /// metadata, review queue and positions, while every node keeps writing.
    ///
    /// The new node's database must have the cluster's annotated tables, empty, or none of them
    /// (the join then creates them from the donor's definitions with pg_dump, which must be
    /// installed; partitions are not copied); the join runs `accord init` there. It reads the donor in chunks, one short snapshot each, and records
    /// where it is after every chunk: interrupted, the same command resumes it. The donor's
    /// `accord run` must be running (rows written there just before a chunk was read are copied
    /// once its capture has accounted for them). Then start the new node with `accord run
    /// --config FILE`; it streams every node's changes from where the copy left off.
    ///
    /// Before copying, the join registers the new node with the donor (at its configuration's
    /// `address`) and waits until every node of the cluster knows it: no configuration needs
    /// editing, but every node must be running and reachable. The certificates decide who may
    /// connect: the new node's must be signed by the cluster's CA.
    Join(JoinArgs),
    /// Take a node out of the cluster for good, or remove one that is gone.
    ///
    /// Without --node, the node of --config leaves: stop writing to its database first. It waits
    /// until the node's capture has read everything committed and every peer has acknowledged
    /// all of its changes, marks it as left (its `accord run` tells the cluster and stops), and
    /// drops its replication slot and origins; its rows and accord's schema stay. With --node ID,
    /// that node is removed through the node of --config, which must be running: for a node that
    /// is gone (a dead machine). Its changes that reached some nodes and not others stay so. Either
    /// way the other nodes drop its links, stop keeping their changes for it, and collect
    /// tombstones without it; a node id that left is never used again.
    Leave(LeaveArgs),
    /// Run a node: capture, apply and replication with its peers, metrics and the review page.
    ///
    /// Reads one TOML file (`accord run --print-example-config` prints a documented one). ACCORD_DSN
    /// and ACCORD_REVIEW_TOKEN override the file's DSN and review token. Stops gracefully on SIGINT
    /// or SIGTERM: the batch being applied commits or rolls back, acknowledgements go out,
    /// connections close. Logs go to stderr (ACCORD_LOG sets the filter, default `info`).
    Run(RunArgs),
    /// Show a running node's peers, lag, throughput, conflicts and review queue.
    ///
    /// Asks the node's metrics address (from --config, or --metrics). Exits 2 when the node cannot
    /// be reached.
    Status(StatusArgs),
    /// Prove the nodes hold the same rows and metadata, while writes go on.
    ///
    /// Asks the node of --config (its [metrics] address) to compare every replicated table, or
    /// those given with --table, on every live node over the mesh. Each node reads each row once,
    /// in one snapshot taken after its capture read past a probe; rows are compared at a cut every
    /// node has applied, so a write still on its way is never a difference: such keys are checked
    /// again, a few times, and listed if they never settle. A row changed, deleted or inserted
    /// with accord bypassed is a difference, and so is one that differs in accord's metadata.
    /// The report gives each table's rows on each node and how many rows a second each node
    /// read. Exits 0 when the nodes agree, 1 when keys differ (each listed with what each node holds),
    /// 2 when the verification could not run.
    Verify(VerifyArgs),
    /// Make the nodes equal again where `accord verify` finds them different, by what accord
    /// replicated, not by a vote.
    ///
    /// Verifies (as `accord verify`), then for each differing key reads every node's row and
    /// metadata: the rows accord replicated (the merge of every write it carried) are written to
    /// the node that holds something else: a row changed, deleted or inserted behind accord's
    /// back. What that node held is kept in its `accord.repaired` (nothing is lost: write it
    /// again through accord if it was wanted), and the repair is logged in `accord.conflict_log`.
    /// Keys still being written, or whose replicated rows differ between nodes, are left as they
    /// are, with the reason. Then verifies again. Exits 0 when the nodes end equal, 1 when not, 2
    /// when the repair could not run.
    Repair(VerifyArgs),
    /// Give a table's generated ids from accord.next_id, so that two nodes never make the same.
    ///
    /// `serial`, `bigserial` and identity keys count from the same start on every node, so two
    /// nodes give one id to two different rows (`accord check` flags them). Run on every node
    /// after `accord init`: the column's default becomes `accord.next_id(counter, lanes)`, which
    /// gives counter * lanes + this node's id from a new sequence starting above every id the
    /// table holds or its old sequence gave. Existing rows keep their ids.
    #[command(subcommand)]
    Ids(IdsCommand),
    /// Work the review queue.
    ///
    /// The queue holds concurrent writes to review columns, and changes parked because they could
    /// not be applied here.
    #[command(subcommand)]
    Review(ReviewCommand),
    /// Start a three-node cluster on this machine and show it converge.
    ///
    /// Three temporary PostgreSQL clusters from the installed binaries, an annotated example schema,
    /// certificates, three nodes on loopback and conflicting writes on all three at once, and a
    /// concurrent price change made certain, then resolved with `accord review resolve`; then a
    /// report: identical rows, exact stock sums, the review queue and the resolved item, lag and
    /// throughput.
    Demo(accord::demo::DemoArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The node's configuration file.
    #[arg(long, value_name = "FILE", required_unless_present = "print_example_config")]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Print a documented example configuration and exit.
    #[arg(long)]
    print_example_config: bool,
}

#[derive(Debug, clap::Args)]
struct JoinArgs {
    /// The new node's configuration file (its node id and database are used).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The database of a running node to copy from (libpq's connection string; TLS options honoured).
    #[arg(long, env = "ACCORD_DONOR_DSN", hide_env_values = true, value_name = "DSN")]
    donor_dsn: String,
    /// Rows per chunk: each is one short read on the donor and one transaction on the new node.
    #[arg(long, default_value_t = accord::node::join::DEFAULT_CHUNK_ROWS, value_name = "N")]
    chunk_rows: usize,
    /// How long to wait for every running node to learn of the new one before copying; it needs
    /// every node of the cluster running and reachable.
    #[arg(long, default_value_t = accord::node::join::DEFAULT_MEMBERS_WAIT.as_secs(), value_name = "SECS")]
    members_wait_secs: u64,
}

#[derive(Debug, clap::Args)]
struct LeaveArgs {
    /// The configuration of the node that leaves, or (with --node) of a running node to remove
    /// another through.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Remove this node (gone for good) instead of the node of --config.
    #[arg(long, value_name = "ID")]
    node: Option<u32>,
    /// How long each step may wait (the capture, the peers' acknowledgements, the gossip).
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    wait_secs: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// Which running node to ask: the address it serves [metrics] at.
#[derive(Debug, clap::Args)]
struct NodeAddress {
    /// The node's configuration file: its [metrics] address is asked.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "metrics",
        conflicts_with = "metrics"
    )]
    config: Option<PathBuf>,
    /// The node's metrics address (host:port), instead of --config.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    node: NodeAddress,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    node: NodeAddress,
    /// A table to compare (schema.table); repeat for more. Default: every replicated table.
    #[arg(long = "table", value_name = "TABLE")]
    tables: Vec<String>,
    /// How to print the report.
    #[arg(long, value_enum, default_value = "text")]
    format: ReportFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum IdsCommand {
    /// Convert one table's id column (its key, when it has one key column).
    Convert {
        #[arg(long, env = "ACCORD_DSN", hide_env_values = true, value_name = "DSN")]
        dsn: String,
        /// The table, as schema.table.
        #[arg(long, value_name = "TABLE")]
        table: String,
        /// The column, when the key has several or another column is numbered.
        #[arg(long, value_name = "COLUMN")]
        column: Option<String>,
        /// A power of two above every node id (default 1024 for bigint, 64 for integer). Use the
        /// same on every node.
        #[arg(long, value_name = "N")]
        lanes: Option<i32>,
        /// Keep ids below 2^53, so that JavaScript numbers hold them exactly.
        #[arg(long)]
        js_safe: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ReviewCommand {
    /// The open items (all items with --all).
    List {
        #[arg(long, env = "ACCORD_DSN", hide_env_values = true, value_name = "DSN")]
        dsn: String,
        #[arg(long)]
        all: bool,
    },
    /// One item with its candidates, numbered for `resolve --pick`.
    Show {
        id: accord_engine::ReviewItemId,
        #[arg(long, env = "ACCORD_DSN", hide_env_values = true, value_name = "DSN")]
        dsn: String,
    },
    /// Resolve an item: the choice is written as a new value that supersedes every candidate, and
    /// replicates to every node like any write. For an insert displaced by an earlier one of the
    /// same key, --pick 1 keeps the row as it is and --pick 2 writes the displaced insert over it.
    #[command(group(clap::ArgGroup::new("choice").required(true).multiple(false)))]
    Resolve {
        id: accord_engine::ReviewItemId,
        #[arg(long, env = "ACCORD_DSN", hide_env_values = true, value_name = "DSN")]
        dsn: String,
        /// The candidate to keep (1 is the first `show` lists; for a displaced insert, 1 keeps the
        /// row, 2 takes the displaced insert).
        #[arg(long, group = "choice")]
        pick: Option<usize>,
        /// A value of your own, in PostgreSQL's text form.
        #[arg(long, group = "choice")]
        value: Option<String>,
    },
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(anyhow::Error::new(error).context("cannot start the async runtime")),
    };
    let result = match cli.command {
        Command::Check(args) => runtime.block_on(check::run(args)),
        Command::Certs(command) => certs(command).map(|()| check::Verdict::Clean),
        Command::Init { dsn, node_id } => runtime.block_on(init(&dsn, node_id)).map(|()| check::Verdict::Clean),
        Command::Review(command) => runtime.block_on(review(command)).map(|()| check::Verdict::Clean),
        Command::Ids(command) => runtime.block_on(ids(command)).map(|()| check::Verdict::Clean),
        Command::Join(args) => runtime.block_on(join(args)).map(|()| check::Verdict::Clean),
        Command::Leave(args) => runtime.block_on(leave(args)).map(|()| check::Verdict::Clean),
        Command::Run(args) => runtime.block_on(run(args)).map(|()| check::Verdict::Clean),
        Command::Status(args) => runtime.block_on(status(args)).map(|()| check::Verdict::Clean),
        Command::Verify(args) => runtime.block_on(verify(args)),
        Command::Repair(args) => runtime.block_on(repair(args)),
        Command::Demo(args) => runtime.block_on(accord::demo::run(args)).map(|converged| {
            if converged {
                check::Verdict::Clean
            } else {
                check::Verdict::FoundErrors
            }
        }),
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use accord::config::{ProcessEnvironment, ServiceConfig, EXAMPLE};
    let Some(path) = args.config.filter(|_| !args.print_example_config) else {
        print!("{EXAMPLE}");
        return Ok(());
    };
    let config = ServiceConfig::load(&path, &ProcessEnvironment)?;
    init_logs(args.log_format)?;
    accord::service::run(config).await
}

async fn join(args: JoinArgs) -> anyhow::Result<()> {
    use accord::config::{ProcessEnvironment, ServiceConfig};
    use accord::node::join::{join, JoinRequest};
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    let config = ServiceConfig::load(&args.config, &ProcessEnvironment)?;
    init_logs(LogFormat::Human)?;
    let Some(address) = config.address.clone() else {
        anyhow::bail!(
            "{}: set `address` (host:port), where the other nodes reach this node; `listen` names no single IP \
             to take instead",
            args.config.display()
        );
    };
    let request = JoinRequest {
        node: config.node,
        dsn: config.dsn.clone(),
        donor_dsn: args.donor_dsn,
        chunk_rows: args.chunk_rows,
        address,
        members_wait: std::time::Duration::from_secs(args.members_wait_secs),
    };
    // A bar on a terminal; otherwise a log line every few seconds.
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    let terminal = std::io::stderr().is_terminal();
    if !terminal {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {pos}/{len} rows, {binary_bytes_per_sec} ({eta} left)",
        )?
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let mut logged = started;
    let mut on_progress = |p: &accord::node::join::JoinProgress| {
        bar.set_length(p.total_rows.max(p.rows));
        bar.set_position(p.rows);
        bar.set_message(p.table.clone());
        if !terminal && logged.elapsed() >= std::time::Duration::from_secs(5) {
            logged = std::time::Instant::now();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                table = %p.table,
                rows = p.rows,
                of = p.total_rows,
                mb_per_s = format!("{:.1}", p.bytes as f64 / secs / 1e6),
                "copying"
            );
        }
    };
    let joined = join(&request, &mut on_progress).await?;
    bar.finish_and_clear();
    println!(
        "node {} joined from node {}{}: {} rows and {} deleted rows' metadata copied in {:.1} s ({} of them once the \
         donor's capture had accounted for a write to them)",
        config.node,
        joined.donor,
        if joined.resumed { " (resumed)" } else { "" },
        joined.rows,
        joined.tombstones,
        started.elapsed().as_secs_f64(),
        joined.settled,
    );
    let positions: Vec<String> = joined.positions.iter().map(|(n, s)| format!("node {n}: {s}")).collect();
    println!("it streams every node's changes after: {}", positions.join(", "));
    println!("start it: accord run --config {}", args.config.display());
    Ok(())
}

async fn leave(args: LeaveArgs) -> anyhow::Result<()> {
    use accord::config::{ProcessEnvironment, ServiceConfig};
    use accord::node::leave::{leave, LeaveRequest};
    let config = ServiceConfig::load(&args.config, &ProcessEnvironment)?;
    init_logs(LogFormat::Human)?;
    let request = LeaveRequest {
        node: config.node,
        dsn: config.dsn.clone(),
        remove: args.node.map(accord_engine::NodeId),
        wait: std::time::Duration::from_secs(args.wait_secs),
    };
    let left = leave(&request).await?;
    match request.remove {
        Some(node) => {
            println!("node {node} removed from the cluster: every running node knows, and none keeps changes for it");
            if let Some(applied) = left.applied_here {
                println!(
                    "node {} had applied node {node}'s changes up to {applied}; changes of it that reached only some \
                     nodes stay on those nodes",
                    config.node
                );
            }
        }
        None => {
            println!(
                "node {} left the cluster: every peer had its changes up to {}; its replication slot and origins \
                 are dropped, its rows and the accord schema stay (DROP SCHEMA accord CASCADE removes accord's)",
                config.node,
                left.handed_over.unwrap_or(0)
            );
            if left.not_handed_over > 0 {
                println!(
                    "warning: {} change(s) written on node {} while it left did not reach the cluster",
                    left.not_handed_over, config.node
                );
            }
        }
    }
    Ok(())
}

fn init_logs(format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ACCORD_LOG").or_else(|_| EnvFilter::try_new("info"))?;
    use std::io::IsTerminal;
    // Colour codes only on a terminal: in a file or a journal they are noise around every field.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

async fn verify(args: VerifyArgs) -> anyhow::Result<check::Verdict> {
    let addr = metrics_address(args.node)?;
    let report = accord::verify_command::request(addr, args.tables).await?;
    match args.format {
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        ReportFormat::Text => print!("{}", accord::verify_command::human_text(&report)),
    }
    Ok(if report.is_clean() {
        check::Verdict::Clean
    } else {
        check::Verdict::FoundErrors
    })
}

async fn repair(args: VerifyArgs) -> anyhow::Result<check::Verdict> {
    let addr = metrics_address(args.node)?;
    let report = accord::verify_command::request_repair(addr, args.tables).await?;
    match args.format {
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        ReportFormat::Text => print!("{}", accord::verify_command::repair_text(&report)),
    }
    Ok(if report.after.is_clean() {
        check::Verdict::Clean
    } else {
        check::Verdict::FoundErrors
    })
}

/// The node's metrics address: given, or from its configuration.
fn metrics_address(node: NodeAddress) -> anyhow::Result<std::net::SocketAddr> {
    use accord::config::{ProcessEnvironment, ServiceConfig};
    Ok(match (node.metrics, node.config) {
        (Some(addr), _) => addr,
        (None, Some(path)) => {
            let config = ServiceConfig::load(&path, &ProcessEnvironment)?;
            config.metrics.ok_or_else(|| {
                anyhow::anyhow!(
                    "{} has no [metrics] listen address: the node serves its status and verifications there",
                    path.display()
                )
            })?
        }
        (None, None) => anyhow::bail!("give --config FILE or --metrics ADDR"),
    })
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let addr = metrics_address(args.node)?;
    let node = accord::status::fetch(addr).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&node)?);
    } else {
        print!(
            "{}",
            accord::status::human_text(&node, accord::node::runtime::wall_micros())
        );
    }
    Ok(())
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

async fn init(dsn: &str, node_id: u32) -> anyhow::Result<()> {
    use accord::node::init;
    let mut db = accord::pg_connection::connect(dsn).await?;
    let done = init::init(&mut db, accord_engine::NodeId(node_id)).await?;
    println!("node {} is ready to replicate:", done.node);
    for table in &done.tables {
        println!("  {table}");
    }
    println!("policy fingerprint {}", done.fingerprint);
    if done.rows_recorded > 0 {
        println!("{} existing rows recorded", done.rows_recorded);
    }
    if done.slot_created {
        println!("created the logical replication slot {}", accord::node::store::SLOT);
    }
    match &done.partition_guard {
        init::PartitionGuard::NotNeeded => {}
        init::PartitionGuard::Installed => println!(
            "partitioned: {} (replicated through the root; partitions made or attached later get \
             REPLICA IDENTITY FULL from an event trigger)",
            done.partitioned.join(", ")
        ),
        init::PartitionGuard::NotPermitted(why) => eprintln!(
            "warning: partitioned: {}; the event trigger that gives partitions made later REPLICA IDENTITY \
             FULL could not be installed ({why}): run `ALTER TABLE <partition> REPLICA IDENTITY FULL` for \
             each new partition before writing to it, or run `accord init` as a superuser",
            done.partitioned.join(", ")
        ),
    }
    if let init::TakeInTrigger::NotPermitted(why) = &done.take_in_trigger {
        eprintln!(
            "warning: accord's event triggers could not be installed ({why}): the running node takes a table newly \
             tagged `@accord replicate` in within seconds, and rows written to it before then stay on this node \
             (call `SELECT accord.take_in('schema.table')` in the migration that tags it), and renaming a \
             replicated table or column, or changing a column's @accord tag, is not refused (do neither while \
             the cluster runs). Run `accord init` as a superuser to install them"
        );
    }
    Ok(())
}

async fn ids(command: IdsCommand) -> anyhow::Result<()> {
    use accord::node::ids;
    match command {
        IdsCommand::Convert {
            dsn,
            table,
            column,
            lanes,
            js_safe,
        } => {
            let mut db = accord::pg_connection::connect(&dsn).await?;
            let request = ids::ConvertRequest {
                table,
                column,
                lanes,
                js_safe,
            };
            let done = ids::convert(&mut db, &request).await?;
            if done.already {
                println!(
                    "{}.{} already takes its ids from accord.next_id; nothing changed",
                    done.table, done.column
                );
                return Ok(());
            }
            println!(
                "{}.{} now takes its ids from accord.next_id({}, {}){}",
                done.table,
                done.column,
                done.counter,
                done.lanes,
                if done.was_identity {
                    " (its identity was dropped)"
                } else {
                    ""
                }
            );
            let lanes = i64::from(done.lanes);
            match done.node {
                Some(node) => {
                    let first = done.first_counter * lanes + i64::from(node);
                    println!(
                        "node {node}'s ids: {first}, {}, ... (every {lanes}th), up to {}; existing rows keep theirs",
                        first + lanes,
                        done.max_counter * lanes + i64::from(node)
                    );
                }
                None => println!(
                    "ids: {} * {lanes} + the node id `accord init` gives this database, counting up to {}; \
                     existing rows keep theirs",
                    done.first_counter, done.max_counter
                ),
            }
            println!("run the same command on every node, with the same --lanes");
        }
    }
    Ok(())
}

async fn review(command: ReviewCommand) -> anyhow::Result<()> {
    use accord::node::{init, review};
    match command {
        ReviewCommand::List { dsn, all } => {
            let db = accord::pg_connection::connect(&dsn).await?;
            let entries = review::list(&db, (!all).then_some("open")).await?;
            if entries.is_empty() {
                println!("no {}review items", if all { "" } else { "open " });
            }
            for e in entries {
                let what = match &e.item.kind {
                    accord_engine::ReviewKind::Concurrent { candidates, .. } => {
                        format!("{} concurrent values", candidates.len())
                    }
                    accord_engine::ReviewKind::DisplacedInsert { created, .. } => {
                        format!("an insert by node {} displaced by an earlier one", created.node)
                    }
                    accord_engine::ReviewKind::Unapplicable { error, .. } => format!("not applied: {error}"),
                };
                let column = e.item.column.as_deref().map(|c| format!(".{c}")).unwrap_or_default();
                println!(
                    "{}  {:<10} {}{column} {}  {what}",
                    e.id, e.status, e.item.table, e.item.key
                );
            }
        }
        ReviewCommand::Show { id, dsn } => {
            let db = accord::pg_connection::connect(&dsn).await?;
            let e = review::show(&db, id).await?;
            let column = e.item.column.as_deref().unwrap_or("(whole change)");
            println!("item {}: {} {} {column} — {}", e.id, e.item.table, e.item.key, e.status);
            match &e.item.kind {
                accord_engine::ReviewKind::Concurrent {
                    candidates,
                    provisional,
                } => {
                    for (i, c) in candidates.iter().enumerate() {
                        let mark = if c.stamp == *provisional {
                            "  (provisional winner)"
                        } else {
                            ""
                        };
                        println!(
                            "  {}. {}  written on node {} at {} (HLC {}){mark}",
                            i + 1,
                            c.value,
                            c.stamp.node,
                            accord::node::review::utc(c.stamp.physical),
                            c.stamp
                        );
                    }
                }
                accord_engine::ReviewKind::DisplacedInsert { created, values } => {
                    println!(
                        "  node {} inserted this key at {} (HLC {created}) while an earlier insert of it was on its way; \
                         the earlier kept the row. The displaced insert:",
                        created.node,
                        accord::node::review::utc(created.physical)
                    );
                    for (name, value) in values {
                        match value {
                            Some(v) => println!("    {name} = {v}"),
                            None => println!("    {name} (not known here)"),
                        }
                    }
                    if e.status == "open" {
                        println!(
                            "  resolve with --pick 1 (keep the row as it is) or --pick 2 (write these values over it)"
                        );
                    }
                }
                accord_engine::ReviewKind::Unapplicable { origin, seq, error, .. } => {
                    println!("  change {seq} from node {origin} could not be applied: {error}");
                }
            }
            if let Some(value) = e.closed_value {
                println!("  closed with value {value}");
            }
        }
        ReviewCommand::Resolve { id, dsn, pick, value } => {
            let mut db = accord::pg_connection::connect(&dsn).await?;
            let policy = init::load_policy(&mut db).await?;
            let choice = match (pick, value) {
                (Some(n), _) => review::Choice::Pick(n),
                (None, Some(v)) => review::Choice::Value(v),
                (None, None) => anyhow::bail!("say what to keep: --pick N or --value V"),
            };
            let written = review::resolve(&mut db, &policy, id, choice).await?;
            println!("resolved {id} with {written}; the resolution replicates to every node");
        }
    }
    Ok(())
}

fn fail(error: anyhow::Error) -> ExitCode {
    eprintln!("accord: error: {}", accord::service::error_chain(&error));
    ExitCode::from(EXIT_FAILED)
}
