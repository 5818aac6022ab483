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

pub struct NetworkPort {
    pub events: mpsc::Receiver<PeerEvent>,
    pub outbox: mpsc::Sender<Outgoing>,
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
#[derive(Clone, Default)]
pub struct MemoryHub {
    hub: Arc<Mutex<Hub>>,
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
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(out) = outbox_rx.recv().await {
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
        NetworkPort { events, outbox }
    }

    /// Removes `node` (it stopped or crashed); its peers see its links go down.
    pub async fn leave(&self, node: NodeId) {
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
