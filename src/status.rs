//! What `accord status` and the metrics endpoint show: one [`NodeStatus`], rendered for people
//! and for Prometheus.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::node::runtime::{NodeStatus, PeerStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConflictLabels {
    peer: String,
    kind: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// A per-peer metric: name, help, how to read it from a peer's status.
type PeerFigure<T> = (&'static str, &'static str, fn(&PeerStatus) -> T);

/// The status in Prometheus' text format.
pub fn prometheus_text(status: &NodeStatus) -> Result<String> {
    let mut registry = Registry::with_prefix("accord");
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: f64| {
        let g = FloatGauge::default();
        g.set(value);
        registry.register(name, help, g);
    };
    gauge(
        &mut registry,
        "capture_stopped",
        "1 while the capture is stopped by an error (local writes are not replicated)",
        f64::from(u8::from(status.capture_error.is_some())),
    );
    gauge(
        &mut registry,
        "outbound_head",
        "Last sequence number in this node's outbound log",
        status.head as f64,
    );
    gauge(
        &mut registry,
        "review_open",
        "Open review items (concurrent review writes and parked changes)",
        status.review_open as f64,
    );
    gauge(
        &mut registry,
        "parked_open",
        "Open review items that are changes parked because they could not be applied",
        status.parked_open as f64,
    );
    let captured = Counter::<u64>::default();
    captured.inc_by(status.captured);
    registry.register("captured", "Local changes captured since the node started", captured);

    let peer_gauges: [PeerFigure<f64>; 12] = [
        ("peer_connected", "1 when the peer is connected", |p| {
            f64::from(u8::from(p.connected))
        }),
        (
            "peer_unacked_changes",
            "This node's changes the peer has not acknowledged",
            |p| p.unacked as f64,
        ),
        (
            "peer_outbound_lag_seconds",
            "Age of the oldest change the peer has not acknowledged",
            |p| p.outbound_lag_secs,
        ),
        (
            "peer_inbound_lag_changes",
            "The peer's changes not applied here yet",
            |p| p.inbound_lag_changes as f64,
        ),
        (
            "peer_incomplete_transaction_changes",
            "The peer's changes held here until the rest of their transaction arrives",
            |p| p.incomplete_transaction_changes as f64,
        ),
        (
            "peer_in_flight_transaction_bytes",
            "Estimated size of the peer's transaction still arriving (in memory and spooled)",
            |p| p.in_flight_bytes as f64,
        ),
        (
            "peer_in_flight_spooled_bytes",
            "Of the peer's transaction still arriving, the part spooled to disk (estimated as in memory)",
            |p| p.in_flight_spooled_bytes as f64,
        ),
        (
            "peer_inbound_lag_seconds",
            "Seconds the data applied from the peer is behind (NaN when unknown)",
            |p| p.inbound_lag_secs.unwrap_or(f64::NAN),
        ),
        (
            "peer_applied_per_second",
            "Changes applied from the peer per second",
            |p| p.applied_per_sec,
        ),
        (
            "peer_applied_position",
            "Last of the peer's sequence numbers applied here",
            |p| p.progress.applied as f64,
        ),
        (
            "peer_acked_position",
            "Last of this node's sequence numbers the peer acknowledged",
            |p| p.progress.acked as f64,
        ),
        (
            "peer_apply_waiting",
            "1 while the peer's next transaction cannot be applied here until this node's users act (a row with no partition here)",
            |p| f64::from(u8::from(p.apply_waiting.is_some())),
        ),
    ];
    for (name, help, read) in peer_gauges {
        let family = Family::<PeerLabels, FloatGauge>::default();
        for (peer, p) in &status.peers {
            family
                .get_or_create(&PeerLabels { peer: peer.to_string() })
                .set(read(p));
        }
        registry.register(name, help, family);
    }
    let peer_counters: [PeerFigure<u64>; 8] = [
        (
            "peer_applied",
            "Changes applied from the peer since the node started",
            |p| p.applied_changes,
        ),
        (
            "peer_parked",
            "Changes from the peer parked in the review queue since the node started",
            |p| p.parked,
        ),
        (
            "peer_capture_waits",
            "Applies that waited for the capture of a racing local write",
            |p| p.capture_waits,
        ),
        (
            "peer_keys_clear",
            "Missing rows merged without waiting for the capture: no local removal was on its way",
            |p| p.keys_clear,
        ),
        (
            "peer_causal_waivers",
            "The peer's transactions applied before what they built on, its node being unreachable",
            |p| p.causal_waivers,
        ),
        (
            "apply_deadlocks",
            "Applies of the peer's changes rolled back as a deadlock's victim and tried again",
            |p| p.apply_deadlocks,
        ),
        (
            "peer_spooled_transactions",
            "The peer's transactions larger than replication.spool_mb, spooled to disk while they arrived",
            |p| p.spooled_transactions,
        ),
        (
            "peer_spooled_bytes",
            "Estimated size (as in memory) of what was spooled of the peer's transactions",
            |p| p.spooled_bytes,
        ),
    ];
    for (name, help, read) in peer_counters {
        let family = Family::<PeerLabels, Counter<u64>>::default();
        for (peer, p) in &status.peers {
            family
                .get_or_create(&PeerLabels { peer: peer.to_string() })
                .inc_by(read(p));
        }
        registry.register(name, help, family);
    }
    let conflicts = Family::<ConflictLabels, Counter<u64>>::default();
    for (peer, p) in &status.peers {
        for (kind, n) in conflict_kinds(p) {
            let labels = ConflictLabels {
                peer: peer.to_string(),
                kind: kind.to_string(),
            };
            conflicts.get_or_create(&labels).inc_by(n);
        }
    }
    registry.register(
        "conflicts",
        "Automatic resolutions of the peer's changes, by kind",
        conflicts,
    );

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).context("cannot encode the metrics")?;
    Ok(out)
}

fn conflict_kinds(p: &PeerStatus) -> [(&'static str, u64); 4] {
    [
        ("concurrent_update", p.conflicts.concurrent_update),
        ("delete_won", p.conflicts.delete_won),
        ("insert_insert", p.conflicts.insert_insert),
        ("insert_displaced", p.conflicts.insert_displaced),
    ]
}

/// The status for people: `now_micros` is the wall clock, for "since" durations.
pub fn human_text(status: &NodeStatus, now_micros: u64) -> String {
    let mut out = String::new();
    let ago = |t: u64| seconds(now_micros.saturating_sub(t) as f64 / 1e6);
    let _ = writeln!(
        out,
        "node {}: up {}, outbound log head {}, {} local changes captured since start",
        status.node,
        ago(status.started_micros),
        status.head,
        status.captured
    );
    if let Some(error) = &status.capture_error {
        let _ = writeln!(out, "CAPTURE STOPPED, local writes are not replicated: {error}");
    }
    let _ = writeln!(
        out,
        "review queue: {} open ({} parked changes)",
        status.review_open, status.parked_open
    );
    if !status.members.is_empty() {
        let members: Vec<String> = status.members.iter().map(|(n, state)| format!("{n} {state}")).collect();
        let _ = writeln!(out, "members: {}", members.join(", "));
    }
    for (peer, p) in &status.peers {
        let state = match (p.connected, p.since_micros) {
            (true, Some(t)) => format!("connected for {}", ago(t)),
            (true, None) => "connected".to_string(),
            (false, Some(t)) => format!("DISCONNECTED for {}", ago(t)),
            (false, None) => "NOT CONNECTED since start".to_string(),
        };
        let _ = writeln!(out, "\npeer {peer}: {state}");
        if let (false, Some(error)) = (p.connected, &p.last_error) {
            let _ = writeln!(out, "  last error:   {error}");
        }
        let _ = writeln!(
            out,
            "  to peer:      {} changes unacknowledged, {} behind",
            p.unacked,
            seconds(p.outbound_lag_secs)
        );
        let inbound_secs = p.inbound_lag_secs.map(seconds).unwrap_or_else(|| "unknown time".into());
        let _ = writeln!(
            out,
            "  from peer:    {} changes waiting, {} behind; {:.0} applied/s, {} applied since start",
            p.inbound_lag_changes, inbound_secs, p.applied_per_sec, p.applied_changes
        );
        if let Some((node, through)) = p.waiting_for {
            let _ = writeln!(
                out,
                "  held:         next transaction waits for node {node}'s changes through {through} (it built on them)"
            );
        }
        if let Some(why) = &p.apply_waiting {
            let _ = writeln!(
                out,
                "  waiting:      next transaction cannot be applied here yet: {why}"
            );
        }
        if p.causal_waivers > 0 {
            let _ = writeln!(
                out,
                "  applied early: {} transactions before what they built on (its node was unreachable)",
                p.causal_waivers
            );
        }
        if p.incomplete_transaction_changes > 0 {
            let spooled = match p.in_flight_spooled_bytes {
                0 => String::new(),
                n => format!(", {} spooled to disk", megabytes(n)),
            };
            let _ = writeln!(
                out,
                "  held:         {} changes of a transaction still arriving (applied whole; {}{spooled})",
                p.incomplete_transaction_changes,
                megabytes(p.in_flight_bytes)
            );
        }
        if p.spooled_transactions > 0 {
            let _ = writeln!(
                out,
                "  spooled:      {} large transactions ({}) since start",
                p.spooled_transactions,
                megabytes(p.spooled_bytes)
            );
        }
        let kinds = conflict_kinds(p)
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(out, "  conflicts:    {kinds}; {} changes parked", p.parked);
        if p.apply_deadlocks > 0 {
            let _ = writeln!(
                out,
                "  deadlocks:    {} applies met a local transaction in a deadlock and were tried again",
                p.apply_deadlocks
            );
        }
    }
    out
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / (1u64 << 20) as f64)
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// Reads the status of the node serving metrics at `addr`.
pub async fn fetch(addr: std::net::SocketAddr) -> Result<NodeStatus> {
    let uri = format!("http://{addr}/status");
    let request = hyper::Request::get(uri)
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .context("status request")?;
    let answer = ask_node(addr, request);
    tokio::time::timeout(std::time::Duration::from_secs(5), answer)
        .await
        .with_context(|| format!("the node at {addr} did not answer within 5 s"))?
}

/// Sends `request` to the node serving [metrics] at `addr` and reads its JSON answer; an error
/// status is an error with the node's text.
pub async fn ask_node<T: serde::de::DeserializeOwned>(
    addr: std::net::SocketAddr,
    request: hyper::Request<http_body_util::Full<hyper::body::Bytes>>,
) -> Result<T> {
    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client: Client<_, http_body_util::Full<hyper::body::Bytes>> =
        Client::builder(TokioExecutor::new()).build(hyper_util::client::legacy::connect::HttpConnector::new());
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
        anyhow::bail!("the node at {addr} answered {code}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).context("the node's answer is not in the expected form")
}

#[cfg(test)]
mod tests {
    use super::*;
    use accord_engine::NodeId;

    fn sample() -> NodeStatus {
        let mut status = NodeStatus {
            node: 1,
            started_micros: 1_000_000,
            head: 42,
            captured: 40,
            review_open: 3,
            parked_open: 1,
            members: [(1, "active"), (2, "active"), (3, "active"), (4, "joining"), (5, "left")]
                .into_iter()
                .map(|(n, s)| (n, s.to_string()))
                .collect(),
            ..NodeStatus::default()
        };
        let mut p = PeerStatus {
            connected: true,
            since_micros: Some(2_000_000),
            unacked: 7,
            outbound_lag_secs: 0.25,
            inbound_lag_changes: 5,
            inbound_lag_secs: Some(1.5),
            applied_changes: 900,
            applied_per_sec: 120.0,
            parked: 1,
            incomplete_transaction_changes: 300,
            in_flight_bytes: 3 << 20,
            in_flight_spooled_bytes: 2 << 20,
            spooled_transactions: 4,
            spooled_bytes: 40 << 20,
            waiting_for: Some((NodeId(3), 41)),
            causal_waivers: 2,
            apply_deadlocks: 3,
            apply_waiting: Some("no partition of relation \"events\" found for row (...): create a partition".into()),
            ..PeerStatus::default()
        };
        p.conflicts.concurrent_update = 4;
        status.peers.insert(NodeId(2), p);
        status.peers.insert(
            NodeId(3),
            PeerStatus {
                last_error: Some("the peer's TLS refused this node".into()),
                ..PeerStatus::default()
            },
        );
        status
    }

    #[test]
    fn prometheus_text_carries_every_figure_per_peer() {
        let text = prometheus_text(&sample()).unwrap();
        for line in [
            "accord_review_open 3.0",
            "accord_peer_connected{peer=\"2\"} 1.0",
            "accord_peer_connected{peer=\"3\"} 0.0",
            "accord_peer_unacked_changes{peer=\"2\"} 7.0",
            "accord_peer_inbound_lag_seconds{peer=\"2\"} 1.5",
            "accord_peer_incomplete_transaction_changes{peer=\"2\"} 300.0",
            "accord_peer_applied_total{peer=\"2\"} 900",
            "accord_peer_causal_waivers_total{peer=\"2\"} 2",
            "accord_peer_apply_waiting{peer=\"2\"} 1.0",
            "accord_peer_apply_waiting{peer=\"3\"} 0.0",
            "accord_apply_deadlocks_total{peer=\"2\"} 3",
            "accord_peer_in_flight_transaction_bytes{peer=\"2\"} 3145728.0",
            "accord_peer_in_flight_spooled_bytes{peer=\"2\"} 2097152.0",
            "accord_peer_spooled_transactions_total{peer=\"2\"} 4",
            "accord_peer_spooled_bytes_total{peer=\"2\"} 41943040",
            "accord_conflicts_total{peer=\"2\",kind=\"concurrent_update\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn human_text_names_lag_and_errors() {
        let text = human_text(&sample(), 62_000_000);
        assert!(text.contains("node 1: up 61.0 s"), "{text}");
        assert!(
            text.contains("members: 1 active, 2 active, 3 active, 4 joining, 5 left"),
            "{text}"
        );
        assert!(text.contains("peer 2: connected for 60.0 s"), "{text}");
        assert!(text.contains("7 changes unacknowledged, 250 ms behind"), "{text}");
        assert!(text.contains("peer 3: NOT CONNECTED since start"), "{text}");
        assert!(
            text.contains("last error:   the peer's TLS refused this node"),
            "{text}"
        );
        assert!(text.contains("concurrent_update 4"), "{text}");
        assert!(
            text.contains(
                "held:         300 changes of a transaction still arriving (applied whole; 3.0 MB, 2.0 MB spooled to disk)"
            ),
            "{text}"
        );
        assert!(
            text.contains("spooled:      4 large transactions (40.0 MB) since start"),
            "{text}"
        );
        assert!(!text.contains("peer 3: NOT CONNECTED since start\n  held"), "{text}");
        assert!(
            text.contains("next transaction waits for node 3's changes through 41"),
            "{text}"
        );
        assert!(text.contains("applied early: 2 transactions"), "{text}");
        assert!(text.contains("deadlocks:    3 applies"), "{text}");
        assert!(
            text.contains("waiting:      next transaction cannot be applied here yet: no partition of relation"),
            "{text}"
        );
    }

    #[test]
    fn the_status_survives_json() {
        let status = sample();
        let json = serde_json::to_string(&status).unwrap();
        let back: NodeStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, status);
    }
}
