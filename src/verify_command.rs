//! `accord verify` at the command line: asks the local node (its [metrics] address, where it
//! serves `POST /verify`) to compare the nodes, and prints what it found.

use std::fmt::Write as _;

use anyhow::{Context, Result};

use crate::node::verify::VerifyReport;

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
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client: Client<_, Full<hyper::body::Bytes>> =
        Client::builder(TokioExecutor::new()).build(hyper_util::client::legacy::connect::HttpConnector::new());
    let body = serde_json::to_vec(&VerifyRequest { tables })?;
    let request = hyper::Request::post(format!("http://{addr}/verify"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(hyper::body::Bytes::from(body)))
        .context("the verify request")?;
    let response = client
        .request(request)
        .await
        .with_context(|| format!("cannot reach the node's metrics address {addr}: is `accord run` running?"))?;
    let code = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("cannot read the node's answer")?
        .to_bytes();
    if !code.is_success() {
        anyhow::bail!("the verification failed: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).context("the node's report is not in the expected form")
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
