//! The node's network over QUIC: adapts the transport's endpoint to the node's [`NetworkPort`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use accord_transport::{Endpoint, EndpointConfig, Link, PeerEvent as TransportEvent};
use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::net::{HelloSource, NetworkPort, Outgoing, PeerEvent};

type Links = Arc<Mutex<BTreeMap<u32, Link>>>;

/// Starts a QUIC endpoint for the node and returns its port, with the bound address.
pub fn quic_port(config: EndpointConfig, hello: HelloSource) -> Result<(NetworkPort, std::net::SocketAddr)> {
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
    tokio::spawn(async move {
        while let Some(out) = outbox_rx.recv().await {
            let link = lock(&links).get(&out.peer.0).filter(|l| l.id().0 == out.link).cloned();
            // Meant for a connection that is gone: the peer resends from its durable position.
            let Some(link) = link else { continue };
            if let Err(error) = link.send(&out.message).await {
                tracing::warn!(peer = %out.peer, %error, "cannot send to peer");
            }
        }
        // The node stopped: so does its endpoint.
        endpoint.shutdown().await;
    });
    Ok((NetworkPort { events, outbox }, addr))
}

fn lock(links: &Links) -> std::sync::MutexGuard<'_, BTreeMap<u32, Link>> {
    links.lock().unwrap_or_else(|p| p.into_inner())
}
