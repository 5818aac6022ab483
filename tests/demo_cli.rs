//! `accord demo` as a new user runs it: the built binary, its report, its exit status, and that
//! nothing of it is left on the machine afterwards.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Small sizes: the point here is the demo's plumbing, not load.
const SMALL: &[&str] = &["--products", "30", "--hot", "5", "--clients", "2", "--writes", "40"];

fn demo(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_accord"));
    cmd.arg("demo").args(SMALL).args(args).env_remove("ACCORD_LOG");
    cmd
}

/// What the report says about where the demo lived: its directory and the PostgreSQL ports.
struct Traces {
    dir: PathBuf,
    ports: Vec<u16>,
}

fn traces(out: &str) -> Traces {
    let dir = out
        .lines()
        .find_map(|l| l.strip_prefix("Directory "))
        .map(|rest| rest.trim().split(' ').next().unwrap_or_default().into())
        .unwrap_or_else(|| panic!("the report names its directory:\n{out}"));
    let ports: Vec<u16> = out
        .lines()
        .filter_map(|l| l.split("PostgreSQL 127.0.0.1:").nth(1))
        .map(|rest| {
            rest.split(',')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("a port in {rest:?}"))
        })
        .collect();
    assert_eq!(ports.len(), 3, "three PostgreSQL servers are listed:\n{out}");
    Traces { dir, ports }
}

/// The checks of a converged run's report.
fn assert_converged(out: &str) {
    let checksums: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("checksum ").nth(1))
        .map(str::trim)
        .collect();
    assert_eq!(checksums.len(), 3, "one checksum per node:\n{out}");
    assert!(checksums.iter().all(|c| c.len() == 32 && *c == checksums[0]), "{out}");
    assert!(out.contains("identical on every node: yes"), "{out}");

    let expected: i64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("expected sum "))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the report gives the expected stock sum:\n{out}"));
    let sums: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_end().ends_with("exact") && l.trim().starts_with("node "))
        .collect();
    assert_eq!(sums.len(), 3, "each node's stock sum is exact:\n{out}");
    for line in sums {
        assert!(line.contains(&format!(": {expected} ")), "{line} holds {expected}");
    }
    assert!(out.contains("exact on every node: yes"), "{out}");
    assert!(
        out.contains("every order kept, no id shared by two nodes: yes"),
        "{out}"
    );
    assert!(out.contains("the same on every node: yes"), "{out}");
    assert!(out.contains("Result: converged"), "{out}");
}

/// What the report says of its certain concurrent price change.
struct Reviewed {
    item: String,
    product: String,
    value: String,
}

/// The checks of the certain concurrent price change: one item with the changes of nodes 1 and
/// 3, resolved with `accord review resolve` and then resolved, with the chosen price, everywhere.
fn assert_reviewed(out: &str) -> Reviewed {
    let part = out
        .split("A concurrent price change, made certain")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap_or_else(|| panic!("the report has the concurrent price change:\n{out}"));
    assert!(!part.contains("FAILED"), "{part}");
    let (item, product) = part
        .lines()
        .find_map(|l| l.trim().strip_prefix("item ")?.split_once(": shop.products ("))
        .and_then(|(item, rest)| Some((item.to_string(), rest.split_once(") price")?.0.to_string())))
        .unwrap_or_else(|| panic!("the item is shown with its row:\n{part}"));
    assert!(part.contains("open on nodes 1, 2 and 3"), "{part}");
    let candidates: Vec<&str> = part.lines().filter(|l| l.contains("  written on node ")).collect();
    assert_eq!(candidates.len(), 2, "two candidates:\n{part}");
    assert!(candidates.iter().any(|l| l.contains("written on node 1")), "{part}");
    assert!(candidates.iter().any(|l| l.contains("written on node 3")), "{part}");
    assert!(
        part.contains(&format!(" review resolve {item} --pick ")),
        "the command run is shown:\n{part}"
    );
    let value = part
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&format!("resolved {item} with "))?
                .split(';')
                .next()
        })
        .map(str::to_string)
        .unwrap_or_else(|| panic!("accord review resolve's own answer is shown:\n{part}"));
    assert!(
        part.contains(&format!(
            "item {item} is resolved on nodes 1, 2 and 3, and product {product}'s price is {value} on every node"
        )),
        "{part}"
    );
    assert!(part.contains("identical on every node again: yes"), "{part}");
    assert!(out.contains("reviewed and resolved on every node"), "{out}");
    Reviewed { item, product, value }
}

/// Nothing of the demo remains: its directory, its servers' ports, its processes.
fn assert_gone(traces: &Traces) {
    assert!(!traces.dir.exists(), "{} is removed", traces.dir.display());
    for &port in &traces.ports {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "nothing listens on {port} any more"
        );
    }
    let dir = traces.dir.display().to_string();
    let left: Vec<String> = processes_mentioning(&dir);
    assert!(left.is_empty(), "processes of the demo are left: {left:?}");
}

fn processes_mentioning(text: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|cmd| cmd.contains(text))
        .collect()
}

#[test]
fn demo_converges_with_exact_sums_and_cleans_up() {
    let out = demo(&[]).output().expect("the accord binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert_converged(&stdout);
    assert_reviewed(&stdout);
    assert!(
        stdout.contains("@accord delta") && stdout.contains("@accord review"),
        "{report}"
    );
    assert!(
        stdout.contains("Review queue") && stdout.contains("lag: converged"),
        "{report}"
    );
    assert!(stdout.contains("throughput: "), "{report}");
    let traces = traces(&stdout);
    assert!(
        stdout.contains(&format!("{} removed", traces.dir.display())),
        "{report}"
    );
    assert_gone(&traces);
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_keep_replicates_until_ctrl_c_then_cleans_up() {
    let mut child = demo(&["--keep"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the accord binary runs");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.contains("Press Ctrl-C") {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                out.push_str(&line);
                out.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                panic!("the demo did not get to waiting for Ctrl-C:\n{out}");
            }
        }
    }
    assert_converged(&out);
    let reviewed = assert_reviewed(&out);
    let traces = traces(&out);
    assert!(
        traces.dir.exists(),
        "{} is kept while the demo waits",
        traces.dir.display()
    );

    // The printed commands work, and the nodes still replicate.
    let dsns: Vec<String> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("node ") && l.contains("psql '"))
        .filter_map(|l| l.split('\'').nth(1).map(str::to_string))
        .collect();
    assert_eq!(dsns.len(), 3, "a psql command per node:\n{out}");
    let connect = |dsn: String| async move {
        let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{dsn}: {e}"));
        tokio::spawn(connection);
        client
    };
    let (one, three) = (connect(dsns[0].clone()).await, connect(dsns[2].clone()).await);
    one.execute(
        "UPDATE shop.products SET name = 'kept and replicated' WHERE id = 3",
        &[],
    )
    .await
    .unwrap();
    let seen = Instant::now() + Duration::from_secs(30);
    loop {
        let name: String = three
            .query_one("SELECT name FROM shop.products WHERE id = 3", &[])
            .await
            .unwrap()
            .get(0);
        if name == "kept and replicated" {
            break;
        }
        assert!(Instant::now() < seen, "a write on node 1 never reached node 3");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((one, three));

    // The review as the databases have it, not as the report tells it.
    for dsn in &dsns {
        let db = connect(dsn.clone()).await;
        let status: String = db
            .query_one(
                "SELECT status FROM accord.review_items WHERE id = $1",
                &[&reviewed.item],
            )
            .await
            .unwrap_or_else(|e| panic!("item {} on {dsn}: {e}", reviewed.item))
            .get(0);
        assert_eq!(status, "resolved", "item {} on {dsn}", reviewed.item);
        let holds: bool = db
            .query_one(
                "SELECT price = $2::text::numeric FROM shop.products WHERE id = $1::text::bigint",
                &[&reviewed.product, &reviewed.value],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            holds,
            "product {}'s price is {} on {dsn}",
            reviewed.product, reviewed.value
        );
    }

    // The printed review command runs as printed: its program is this very binary's path.
    let review = out
        .lines()
        .find(|l| l.contains(" review list --dsn '"))
        .unwrap_or_else(|| panic!("a review list command:\n{out}"));
    let (program, rest) = review.trim().split_once(" review list --dsn ").expect("found above");
    let listed = std::process::Command::new(program)
        .args(["review", "list", "--dsn", rest.trim_matches('\'')])
        .output()
        .unwrap_or_else(|e| panic!("the printed program {program:?} runs: {e}"));
    assert!(
        listed.status.success(),
        "{review}: {}",
        String::from_utf8_lossy(&listed.stderr)
    );

    // So does the review page's link, token and all.
    let url = out
        .lines()
        .find_map(|l| l.split("review page of node 1: ").nth(1))
        .unwrap_or_else(|| panic!("the review page is offered:\n{out}"));
    let (addr, path) = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once('/'))
        .unwrap_or_else(|| panic!("a loopback URL: {url}"));
    let mut http = TcpStream::connect(addr).expect("the review page listens");
    write!(
        http,
        "GET /{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    let status = response.lines().next().unwrap_or_default();
    assert!(
        status.starts_with("HTTP/1.1 2") || status.starts_with("HTTP/1.1 3"),
        "the token is accepted: {status}"
    );

    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status().expect("kill runs");
    assert!(sent.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .expect("the demo exits");
    for line in lines.try_iter() {
        out.push_str(&line);
        out.push('\n');
    }
    reader.join().expect("the reader thread ends");
    for line in lines.try_iter() {
        out.push_str(&line);
        out.push('\n');
    }
    assert_eq!(status.code(), Some(0), "converged, then stopped by Ctrl-C:\n{out}");
    assert!(out.contains("Cleaned up"), "{out}");
    assert_gone(&traces);
}

#[test]
fn demo_help_says_what_keep_does_and_what_the_exit_status_means() {
    let out = Command::new(env!("CARGO_BIN_EXE_accord"))
        .args(["demo", "--help"])
        .output()
        .expect("the accord binary runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    for needle in ["--keep", "Ctrl-C", "--writes", "--seed", "Exit status", "postgresql-15"] {
        assert!(help.contains(needle), "--help mentions {needle}:\n{help}");
    }
}
