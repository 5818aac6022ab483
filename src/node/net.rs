//! The node's view of the network: events from peers in, messages to peers out. The QUIC transport
//! and the in-memory hub below both provide exactly this, so the node does not know which it has.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use accord_engine::{Hello, Message, NodeId};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// Connection `link` to `peer` is up; `hello` is what the peer said first.
    Up {
        peer: NodeId,
        link: u64,
        hello: Hello,
    },
    /// A message on the peer's current connection.
    Message {
        peer: NodeId,
        message: Message,
    },
    Down {
        peer: NodeId,
        link: u64,
        reason: String,
    },
    /// A connection attempt failed before it became a connection (TLS, handshake, refusal);
    /// `peer` when the network knows which node it was.
    Rejected {
        peer: Option<NodeId>,
        reason: String,
    },
}

/// A message for one connection: the network drops it when that connection is gone, so that
/// nothing meant for an old connection (a batch computed before a reconnect) reaches a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub peer: NodeId,
    pub link: u64,
    pub message: Message,
}

/// Makes the hello this node sends `peer` when a connection comes up.
pub type HelloSource = Arc<dyn Fn(NodeId) -> Hello + Send + Sync>;

/// The peers a node keeps links to, with the address (`host:port`) each is dialled at; the node
/// sets it whenever its membership changes.
pub type PeerDirectory = tokio::sync::watch::Sender<BTreeMap<NodeId, String>>;

pub struct NetworkPort {
    pub events: mpsc::Receiver<PeerEvent>,
    pub outbox: mpsc::Sender<Outgoing>,
    /// `None` for a network that links every node it knows (the in-memory hub): the node then
    /// refuses the links of nodes that are not members.
    pub peers: Option<PeerDirectory>,
}

/// Bounded, so that a node that cannot keep up slows its peers instead of buffering without end.
const CHANNEL_CAPACITY: usize = 256;

struct Member {
    events: mpsc::Sender<PeerEvent>,
    hello: HelloSource,
}

#[derive(Default)]
struct Hub {
    members: BTreeMap<NodeId, Member>,
    cut: BTreeSet<(NodeId, NodeId)>,
    /// The current connection of each linked pair.
    links: BTreeMap<(NodeId, NodeId), u64>,
    next_link: u64,
}

impl Hub {
    fn linked(&self, a: NodeId, b: NodeId) -> bool {
        a != b && self.members.contains_key(&a) && self.members.contains_key(&b) && !self.cut.contains(&ordered(a, b))
    }

    /// A new connection a–b: the events that bring it up, for both ends.
    fn up(&mut self, a: NodeId, b: NodeId) -> Vec<(mpsc::Sender<PeerEvent>, PeerEvent)> {
        let (Some(ma), Some(mb)) = (self.members.get(&a), self.members.get(&b)) else {
            return Vec::new();
        };
        let link = self.next_link + 1;
        let events = vec![
            (
                ma.events.clone(),
                PeerEvent::Up {
                    peer: b,
                    link,
                    hello: (mb.hello)(a),
                },
            ),
            (
                mb.events.clone(),
                PeerEvent::Up {
                    peer: a,
                    link,
                    hello: (ma.hello)(b),
                },
            ),
        ];
        self.next_link = link;
        self.links.insert(ordered(a, b), link);
        events
    }

    fn down(&mut self, a: NodeId, b: NodeId, reason: &str) -> Vec<(mpsc::Sender<PeerEvent>, PeerEvent)> {
        let Some(link) = self.links.remove(&ordered(a, b)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (me, other) in [(a, b), (b, a)] {
            if let Some(m) = self.members.get(&me) {
                let event = PeerEvent::Down {
                    peer: other,
                    link,
                    reason: reason.to_owned(),
                };
                out.push((m.events.clone(), event));
            }
        }
        out
    }

    /// The events queue of `to`, if `out` is for the current connection from `from`.
    fn route(&self, from: NodeId, out: &Outgoing) -> Option<mpsc::Sender<PeerEvent>> {
        let current = self.links.get(&ordered(from, out.peer)) == Some(&out.link);
        if !current || !self.linked(from, out.peer) {
            return None;
        }
        self.members.get(&out.peer).map(|m| m.events.clone())
    }
}

fn ordered(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

/// An in-process network for tests and the demo: every member is linked to every other, and a
/// test can cut and heal links. Messages on a cut link are lost, as on a closed connection.
///
/// Like the QUIC transport, a member sees a link's events in order: `Up`, its messages, `Down`.
/// `delivery` makes that hold: links come up and messages are routed one at a time, so a peer
/// that hears of a new link first cannot send on it before the other end has heard of it too
/// (the other end would drop that batch as from a peer not connected, and the sender, thinking
/// it sent, would not send it again until the next reconnect).
#[derive(Clone, Default)]
pub struct MemoryHub {
    hub: Arc<Mutex<Hub>>,
    delivery: Arc<tokio::sync::Mutex<()>>,
}

impl MemoryHub {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.hub.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds `node`; its links to the other members come up.
    pub async fn join(&self, node: NodeId, hello: HelloSource) -> NetworkPort {
        let delivery = self.delivery.lock().await;
        let (events_tx, events) = mpsc::channel(CHANNEL_CAPACITY);
        let (outbox, mut outbox_rx) = mpsc::channel::<Outgoing>(CHANNEL_CAPACITY);
        let ups = {
            let mut hub = self.lock();
            hub.members.insert(
                node,
                Member {
                    events: events_tx,
                    hello,
                },
            );
            let others: Vec<NodeId> = hub.members.keys().copied().filter(|&n| hub.linked(node, n)).collect();
            others
                .into_iter()
                .flat_map(|other| hub.up(node, other))
                .collect::<Vec<_>>()
        };
        deliver(ups).await;
        drop(delivery);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(out) = outbox_rx.recv().await {
                // Held across the send: nodes never wait on the hub, only on their own queues,
                // so this cannot deadlock.
                let _delivery = me.delivery.lock().await;
                let target = me.lock().route(node, &out);
                if let Some(target) = target {
                    let _ = target
                        .send(PeerEvent::Message {
                            peer: node,
                            message: out.message,
                        })
                        .await;
                }
            }
        });
        NetworkPort {
            events,
            outbox,
            peers: None,
        }
    }

    /// Removes `node` (it stopped or crashed); its peers see its links go down.
    pub async fn leave(&self, node: NodeId) {
        let _delivery = self.delivery.lock().await;
        let downs = {
            let mut hub = self.lock();
            let others: Vec<NodeId> = hub.members.keys().copied().filter(|&n| hub.linked(node, n)).collect();
            let downs: Vec<_> = others
                .into_iter()
                .flat_map(|o| hub.down(node, o, "peer left"))
                .collect();
            hub.members.remove(&node);
            downs
        };
        deliver(downs).await;
    }

    pub async fn cut(&self, a: NodeId, b: NodeId) {
        let _delivery = self.delivery.lock().await;
        let downs = {
            let mut hub = self.lock();
            let was = hub.linked(a, b);
            hub.cut.insert(ordered(a, b));
            if was {
                hub.down(a, b, "link cut")
            } else {
                Vec::new()
            }
        };
        deliver(downs).await;
    }

    pub async fn heal(&self, a: NodeId, b: NodeId) {
        let _delivery = self.delivery.lock().await;
        let ups = {
            let mut hub = self.lock();
            hub.cut.remove(&ordered(a, b));
            if hub.linked(a, b) {
                hub.up(a, b)
            } else {
                Vec::new()
            }
        };
        deliver(ups).await;
    }
}

async fn deliver(events: Vec<(mpsc::Sender<PeerEvent>, PeerEvent)>) {
    for (to, event) in events {
        // A member that is gone no longer needs to hear about its links.
        let _ = to.send(event).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accord_engine::Hlc;

    fn hello_from(node: NodeId) -> HelloSource {
        Arc::new(move |_peer| Hello {
            version: 1,
            cluster: "test".into(),
            node,
            fingerprint: String::new(),
            hlc: Hlc::zero(node),
            applied_yours: 0,
        })
    }

    /// A node that answers a link coming up by sending at once: its peer must hear of the link
    /// before it hears the message, every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_link_comes_up_at_both_ends_before_its_first_message() {
        let (a, b) = (NodeId(1), NodeId(2));
        let hub = MemoryHub::new();
        let mut port_a = hub.join(a, hello_from(a)).await;
        let mut port_b = hub.join(b, hello_from(b)).await;
        let outbox_a = port_a.outbox.clone();
        let echo = tokio::spawn(async move {
            while let Some(event) = port_a.events.recv().await {
                if let PeerEvent::Up { peer, link, .. } = event {
                    let message = Message::Ack { applied: link };
                    if outbox_a.send(Outgoing { peer, link, message }).await.is_err() {
                        break;
                    }
                }
            }
        });
        // Busy threads beside the runtime's, so that the OS preempts the hub between the two
        // ends of a link coming up: that is where a message used to slip in first.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..8)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let mut current = None;
        for round in 0..3000 {
            hub.cut(a, b).await;
            hub.heal(a, b).await;
            // Read until this round's echo: every Ack must be for a link B has seen come up.
            loop {
                match port_b.events.recv().await.expect("the hub lives") {
                    PeerEvent::Up { link, .. } => current = Some(link),
                    PeerEvent::Down { .. } => current = None,
                    PeerEvent::Message {
                        message: Message::Ack { applied },
                        ..
                    } => {
                        assert_eq!(current, Some(applied), "round {round}: a message before its link's Up");
                        break;
                    }
                    other => panic!("unexpected event {other:?}"),
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for spinner in spinners {
            spinner.join().expect("a spinner only loops");
        }
        echo.abort();
    }
}
