//! `accord leave`: a node leaves the cluster for good, or a node that is gone is removed from it.
//!
//! Both write a `left` entry into a running node's membership (`accord.members`), which gossips
//! it: every node then drops its links to the node, stops keeping its outbound log for it, drops
//! its replication origin, and collection rounds go on without it. A node id that left is never
//! used again (`left` is final in the membership's merge).
//!
//! A node leaving by itself first hands every change it captured to every peer: it waits until
//! its capture has read everything committed so far and every peer has acknowledged all of it.
//! Its `accord run` then stops, and the command drops its replication slot and origins (the rows
//! and accord's schema stay). A node removed while it is down cannot do that: changes it captured
//! that reached some nodes and not others stay where they are, and the command says so.

use std::time::Duration;

use accord_engine::{Hlc, Member, MemberState, NodeId};
use anyhow::{bail, Context, Result};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::capture::wait_until_captured;
use super::members;
use super::runtime::wall_micros;
use super::store::{self, origin_name};
use crate::pg_connection::connect;

/// What to do, from which node's database.
#[derive(Debug, Clone)]
pub struct LeaveRequest {
    /// The node whose database `dsn` is (the one running the command).
    pub node: NodeId,
    pub dsn: String,
    /// The node to remove; `None`: this node leaves.
    pub remove: Option<NodeId>,
    /// How long each wait may take (capture, acknowledgements, gossip, the node stopping).
    pub wait: Duration,
}

/// What a leave did.
#[derive(Debug, Clone)]
pub struct Left {
    pub node: NodeId,
    /// The last change of the leaving node every peer acknowledged (own leave only).
    pub handed_over: Option<u64>,
    /// Changes the leaving node captured after the ones it handed over, which did not reach the
    /// cluster (writes made on it while it left).
    pub not_handed_over: u64,
    /// This node's applied position of a removed node's changes.
    pub applied_here: Option<u64>,
}

pub async fn leave(request: &LeaveRequest) -> Result<Left> {
    let db = connect(&request.dsn).await?;
    let has_members: bool = db
        .query_one("SELECT to_regclass('accord.members') IS NOT NULL", &[])
        .await?
        .get(0);
    if !has_members {
        bail!("this database keeps no membership yet: start this version's `accord run` on it first");
    }
    match request.remove {
        Some(node) if node == request.node => bail!(
            "node {node} is this node: to make it leave, run `accord leave` without --node; --node removes another \
             node"
        ),
        Some(node) => remove(&db, request, node).await,
        None => leave_self(&db, request).await,
    }
}

/// Removes `node` from the cluster, through this node's running `accord run`.
async fn remove(db: &Client, request: &LeaveRequest, node: NodeId) -> Result<Left> {
    match members::entry_known(db, node).await? {
        None => bail!(
            "node {node} is not a member of the cluster as node {} knows it",
            request.node
        ),
        Some((MemberState::Left, _)) => bail!("node {node} has already left the cluster"),
        Some(_) => {}
    }
    ensure_running(db, request.node).await?;
    let applied_here = store::recorded_applied(db)
        .await?
        .into_iter()
        .find(|(n, _)| *n == node)
        .map(|(_, seq)| seq);
    mark_left(db, request.node, node).await?;
    wait_known(db, node, request.wait).await?;
    Ok(Left {
        node,
        handed_over: None,
        not_handed_over: 0,
        applied_here,
    })
}

/// This node leaves: its changes to every peer first, then the `left` entry, then its slot.
async fn leave_self(db: &Client, request: &LeaveRequest) -> Result<Left> {
    let node = request.node;
    let already_left = members::load(db)
        .await?
        .iter()
        .any(|m| m.node == node && m.state == MemberState::Left);
    if already_left && !store::capture_running(db).await? {
        // A leave that stopped after marking this node as left: what remains is its slot and origins.
        let last = last_captured(db).await?;
        let handed_over = peers_behind(db, node, last)
            .await?
            .iter()
            .map(|(_, acked)| *acked)
            .min()
            .unwrap_or(last);
        drop_replication_state(db, request.wait).await?;
        return Ok(Left {
            node,
            handed_over: Some(handed_over),
            not_handed_over: last - handed_over,
            applied_here: None,
        });
    }
    ensure_running(db, node).await?;
    if let Some(lsn) = wait_until_captured(db, &format!("accord leave of node {node}"), request.wait).await? {
        bail!(
            "this node's capture has not read past {} in {} s: see `accord status`; nothing was changed",
            tokio_postgres::types::PgLsn::from(lsn),
            request.wait.as_secs()
        );
    }
    let head = last_captured(db).await?;
    let started = tokio::time::Instant::now();
    loop {
        let behind = peers_behind(db, node, head).await?;
        if behind.is_empty() {
            break;
        }
        if started.elapsed() > request.wait {
            let nodes: Vec<String> = behind.iter().map(|(n, acked)| format!("node {n} at {acked}")).collect();
            bail!(
                "not every peer has acknowledged this node's changes up to {head} within {} s ({}): they must be \
                 running and reachable; nothing was changed",
                request.wait.as_secs(),
                nodes.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mark_left(db, node, node).await?;
    // The node stops once its peers heard it (or after its grace period); its slot is then free.
    let started = tokio::time::Instant::now();
    while store::capture_running(db).await? {
        if started.elapsed() > request.wait + Duration::from_secs(30) {
            bail!(
                "node {node} is marked as left, but its `accord run` has not stopped: stop it, then run `accord leave` \
                 again to drop its replication slot"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let last = last_captured(db).await?;
    drop_replication_state(db, request.wait + Duration::from_secs(30)).await?;
    Ok(Left {
        node,
        handed_over: Some(head),
        not_handed_over: last.saturating_sub(head),
        applied_here: None,
    })
}

async fn ensure_running(db: &Client, node: NodeId) -> Result<()> {
    if !store::capture_running(db).await? {
        bail!(
            "node {node}'s `accord run` is not running: start it first, so that it can tell the cluster (a node that \
             is gone for good is removed from another node with `accord leave --config <its config> --node <id>`)"
        );
    }
    Ok(())
}

async fn last_captured(db: &Client) -> Result<u64> {
    let last: i64 = db
        .query_one("SELECT last_seq FROM accord.capture_state", &[])
        .await
        .context("this node has no capture checkpoint")?
        .get(0);
    Ok(u64::try_from(last).unwrap_or(0))
}

/// Live peers whose acknowledgement of this node's changes is below `head`, with where they are.
async fn peers_behind(db: &Client, node: NodeId, head: u64) -> Result<Vec<(NodeId, u64)>> {
    let peers: Vec<NodeId> = members::load(db)
        .await?
        .into_iter()
        .filter(|m| m.node != node && m.state != MemberState::Left)
        .map(|m| m.node)
        .collect();
    let mut behind = Vec::new();
    for peer in peers {
        let acked = store::peer_acked(db, peer).await?;
        if acked < head {
            behind.push((peer, acked));
        }
    }
    Ok(behind)
}

async fn mark_left(db: &Client, by: NodeId, node: NodeId) -> Result<()> {
    let address = members::load(db)
        .await?
        .into_iter()
        .find(|m| m.node == node)
        .map(|m| m.address)
        .unwrap_or_default();
    let entry = Member {
        node,
        state: MemberState::Left,
        address,
        stamp: Hlc::new(wall_micros(), 0, by),
    };
    members::write(db, &entry)
        .await
        .context("cannot write accord.members")?;
    tracing::info!(%node, "marked as left; the running node tells the cluster");
    Ok(())
}

/// Waits until every live node holds `node`'s `left` entry.
async fn wait_known(db: &Client, node: NodeId, wait: Duration) -> Result<()> {
    let started = tokio::time::Instant::now();
    loop {
        if let Some((_, Some(not_known))) = members::entry_known(db, node).await? {
            if not_known.is_empty() {
                return Ok(());
            }
            if started.elapsed() > wait {
                let nodes: Vec<String> = not_known.iter().map(|n| n.to_string()).collect();
                bail!(
                    "node {node} is marked as left here, but node(s) {} have not heard yet (they learn it when they \
                     reach this node or any that knows)",
                    nodes.join(", ")
                );
            }
        } else if started.elapsed() > wait {
            bail!("node {node} is marked as left here, but this node's `accord run` has not taken it in");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a node that left no longer needs: its slot (which would hold WAL for ever) and its
/// replication origins. Its `accord run` has stopped capturing, but its appliers' sessions may
/// still be closing and hold their origins: a drop refused for that is tried again until `wait`.
async fn drop_replication_state(db: &Client, wait: Duration) -> Result<()> {
    db.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        &[&store::SLOT],
    )
    .await
    .context("cannot drop the replication slot")?;
    let origins: Vec<String> = db
        .query(
            "SELECT roname FROM pg_replication_origin WHERE roname LIKE 'accord_peer_%'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let started = tokio::time::Instant::now();
    for origin in origins {
        if store::peer_of_origin(&origin).map(origin_name).as_deref() != Some(origin.as_str()) {
            continue;
        }
        loop {
            match db.execute("SELECT pg_replication_origin_drop($1)", &[&origin]).await {
                Ok(_) => break,
                Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && started.elapsed() < wait => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot drop the replication origin {origin} (if a session of this node's `accord run` \
                             still holds it, stop that process and run `accord leave` again)"
                        )
                    })
                }
            }
        }
    }
    Ok(())
}
