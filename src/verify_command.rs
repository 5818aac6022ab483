//! `accord verify` at the command line: asks the local node (its [metrics] address, where it
//! serves `POST /verify`) to compare the nodes, and prints what it found.

use std::fmt::Write as _;

use anyhow::{Context, Result};

use crate::node::verify::{RepairReport, VerifyReport};

/// What `POST /verify` takes.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct VerifyRequest {
    /// Tables to compare; empty: every replicated table.
    #[serde(default)]
    pub tables: Vec<String>,
}

/// Asks the node at `addr` to verify, and waits for its report (as long as it takes: a big
/// table is read once on every node).
pub async fn request(addr: std::net::SocketAddr, tables: Vec<String>) -> Result<VerifyReport> {
    post(addr, "verify", tables).await
}

/// Asks the node at `addr` to repair, and waits for its report.
pub async fn request_repair(addr: std::net::SocketAddr, tables: Vec<String>) -> Result<RepairReport> {
    post(addr, "repair", tables).await
}

async fn post<T: serde::de::DeserializeOwned>(
    addr: std::net::SocketAddr,
    what: &str,
    tables: Vec<String>,
) -> Result<T> {
    let body = serde_json::to_vec(&VerifyRequest { tables })?;
    let request = hyper::Request::post(format!("http://{addr}/{what}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
        .context("the request")?;
    // As long as it takes: a big table is read once on every node.
    crate::status::ask_node(addr, request)
        .await
        .with_context(|| format!("accord {what}"))
}

/// The report for people.
pub fn human_text(report: &VerifyReport) -> String {
    let mut out = String::new();
    let nodes: Vec<String> = report.nodes.iter().map(|n| format!("node {n}")).collect();
    let _ = writeln!(out, "compared {} ({} round(s))", nodes.join(", "), report.rounds);
    for (table, rows) in &report.tables {
        let counts: Vec<String> = report
            .nodes
            .iter()
            .zip(rows)
            .map(|(n, r)| format!("{r} on node {n}"))
            .collect();
        let _ = writeln!(out, "  {table}: {} rows", counts.join(", "));
    }
    if let Some(rate) = report.rows_per_second() {
        let _ = writeln!(
            out,
            "read in {:.2} s: {rate:.0} rows per second per node (rows and their metadata)",
            report.seconds
        );
    }
    if report.differences.is_empty() {
        let _ = writeln!(out, "no differences");
    } else {
        let _ = writeln!(out, "{} key(s) differ:", report.differences.len());
        for difference in &report.differences {
            let _ = writeln!(out, "  {} {}:", difference.table, difference.key);
            // Nodes holding the same row, together: the odd one out is what differs.
            let mut groups: Vec<(Option<u128>, Vec<String>, String)> = Vec::new();
            for (node, row) in &difference.nodes {
                let digest = row.as_ref().map(|r| r.digest);
                let what = match row {
                    None => "no such row and no metadata".to_owned(),
                    Some(r) if r.standing == accord_engine::Standing::Uncaptured && !r.present => {
                        "the row is gone, its metadata says it is not (deleted behind accord's back)".to_owned()
                    }
                    Some(r) if r.standing == accord_engine::Standing::Uncaptured => {
                        "written behind accord's back (a write its capture never read)".to_owned()
                    }
                    Some(r) if !r.present => "deleted".to_owned(),
                    Some(r) => format!("row {:08x}", (r.digest >> 96) as u32),
                };
                match groups.iter_mut().find(|(d, _, w)| *d == digest && *w == what) {
                    Some((_, members, _)) => members.push(node.to_string()),
                    None => groups.push((digest, vec![node.to_string()], what)),
                }
            }
            for (_, members, what) in groups {
                let _ = writeln!(out, "    node(s) {}: {what}", members.join(", "));
            }
        }
    }
    let unsettled: usize = report.unsettled.values().map(Vec::len).sum();
    if unsettled > 0 {
        let _ = writeln!(
            out,
            "{unsettled} key(s) were being written through every recheck and are not verified: run it again"
        );
        for (table, keys) in &report.unsettled {
            let shown: Vec<&str> = keys.iter().take(20).map(String::as_str).collect();
            let _ = writeln!(
                out,
                "  {table}: {}{}",
                shown.join(" "),
                if keys.len() > 20 { " ..." } else { "" }
            );
        }
    }
    out
}

/// The repair's report for people.
pub fn repair_text(report: &RepairReport) -> String {
    let mut out = String::from("before:\n");
    out.push_str(&human_text(&report.before));
    if !report.repaired.is_empty() {
        let _ = writeln!(out, "repaired {} row(s):", report.repaired.len());
        for key in &report.repaired {
            let node = key.node.map(|n| format!(" on node {n}")).unwrap_or_default();
            let _ = writeln!(
                out,
                "  {} {}{node} (what it held is in accord.repaired there)",
                key.table, key.key
            );
        }
    }
    if !report.left.is_empty() {
        let _ = writeln!(out, "left {} key(s) as they are:", report.left.len());
        for key in &report.left {
            let node = key.node.map(|n| format!(" on node {n}")).unwrap_or_default();
            let why = key.why.as_deref().unwrap_or("");
            let _ = writeln!(out, "  {} {}{node}: {why}", key.table, key.key);
        }
    }
    out.push_str("after:\n");
    out.push_str(&human_text(&report.after));
    out
}
