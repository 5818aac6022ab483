//! The node's network over QUIC: adapts the transport's endpoint to the node's [`NetworkPort`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use accord_engine::NodeId;
use accord_transport::{Endpoint, EndpointConfig, Link, PeerAddr, PeerEvent as TransportEvent};
use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};

use super::net::{HelloSource, NetworkPort, Outgoing, PeerEvent};

type Links = Arc<Mutex<BTreeMap<u32, Link>>>;

/// Starts a QUIC endpoint for the node and returns its port, with the bound address.
pub fn quic_port(config: EndpointConfig, hello: HelloSource) -> Result<(NetworkPort, std::net::SocketAddr)> {
    let me = config.identity.node;
    let (endpoint, mut transport_events) =
        Endpoint::start(config, move |peer| hello(peer)).context("cannot start the QUIC endpoint")?;
    let addr = endpoint.local_addr();
    let (events_tx, events) = mpsc::channel(1024);
    let (outbox, mut outbox_rx) = mpsc::channel::<Outgoing>(256);
    let links: Links = Arc::default();

    // Events and outgoing messages run in separate tasks: a send waiting on a slow peer must never
    // stop this node from reading what its peers send.
    let event_links = Arc::clone(&links);
    tokio::spawn(async move {
        while let Some(event) = transport_events.recv().await {
            let event = match event {
                TransportEvent::Up { link, hello } => {
                    let (peer, id) = (link.peer(), link.id().0);
                    lock(&event_links).insert(peer.0, link);
                    PeerEvent::Up { peer, link: id, hello }
                }
                TransportEvent::Message { peer, message } => PeerEvent::Message { peer, message },
                TransportEvent::Down { peer, link, reason } => {
                    let mut links = lock(&event_links);
                    if links.get(&peer.0).is_some_and(|l| l.id() == link) {
                        links.remove(&peer.0);
                    }
                    PeerEvent::Down {
                        peer,
                        link: link.0,
                        reason: reason.to_string(),
                    }
                }
                TransportEvent::Rejected {
                    peer,
                    remote,
                    rejection,
                } => {
                    let name = peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
                    tracing::error!(peer = name, %remote, %rejection, "connection rejected");
                    PeerEvent::Rejected {
                        peer,
                        reason: format!("{remote}: {rejection}"),
                    }
                }
            };
            if events_tx.send(event).await.is_err() {
                break;
            }
        }
    });
    let (directory, mut peers_rx) = watch::channel(BTreeMap::<NodeId, String>::new());
    // The sender starts with the configured peers' addresses already in use; only changes count.
    peers_rx.mark_unchanged();
    tokio::spawn(async move {
        let mut endpoint = endpoint;
        let mut unresolved = false;
        let mut retry = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                // What the node sent goes out before a change of peers closes a link.
                biased;
                out = outbox_rx.recv() => {
                    let Some(out) = out else { break };
                    let link = lock(&links).get(&out.peer.0).filter(|l| l.id().0 == out.link).cloned();
                    // Meant for a connection that is gone: the peer resends from its durable position.
                    let Some(link) = link else { continue };
                    if let Err(error) = link.send(&out.message).await {
                        tracing::warn!(peer = %out.peer, %error, "cannot send to peer");
                    }
                }
                changed = peers_rx.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let wanted = peers_rx.borrow_and_update().clone();
                    unresolved = set_peers(&mut endpoint, me, &wanted).await;
                }
                _ = retry.tick(), if unresolved => {
                    let wanted = peers_rx.borrow().clone();
                    unresolved = set_peers(&mut endpoint, me, &wanted).await;
                }
            }
        }
        // The node stopped: so does its endpoint.
        endpoint.shutdown().await;
    });
    Ok((
        NetworkPort {
            events,
            outbox,
            peers: Some(directory),
        },
        addr,
    ))
}

/// Resolves the peers' addresses and hands them to the endpoint. A peer this node dials whose
/// address does not resolve (yet) is left out; returns whether one was, to try again later. A
/// peer that dials this node (a lower id) needs no address.
async fn set_peers(endpoint: &mut Endpoint, me: NodeId, wanted: &BTreeMap<NodeId, String>) -> bool {
    let mut peers = Vec::new();
    let mut unresolved = false;
    for (&node, address) in wanted {
        // No address known: the one the endpoint was started with, if any.
        if let Some(addr) = endpoint.peer_addr(node).filter(|_| address.is_empty()) {
            peers.push(PeerAddr { node, addr });
            continue;
        }
        match tokio::net::lookup_host(address.as_str()).await.map(|mut a| a.next()) {
            Ok(Some(addr)) => peers.push(PeerAddr { node, addr }),
            _ if node < me => peers.push(PeerAddr {
                node,
                addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            }),
            Ok(None) | Err(_) => {
                tracing::warn!(peer = %node, address, "cannot resolve the peer's address; trying again in 5 s");
                unresolved = true;
            }
        }
    }
    if let Err(error) = endpoint.set_peers(&peers) {
        tracing::error!(%error, "cannot change the peers");
    }
    unresolved
}

fn lock(links: &Links) -> std::sync::MutexGuard<'_, BTreeMap<u32, Link>> {
    links.lock().unwrap_or_else(|p| p.into_inner())
}
