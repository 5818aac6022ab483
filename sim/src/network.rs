//! The simulated network: one connection per pair of nodes, carrying two ordered, reliable
//! streams while it is up (as QUIC streams are). What the protocol must tolerate happens at the
//! connection level: a connection breaks and what was in flight on it is lost; a message of a
//! broken connection may turn up late on the next one (a duplicated, reordered delivery);
//! partitions hold a direction's messages, and a partition longer than the idle timeout closes
//! the connection; clogging slows a link without losing anything.

use std::collections::VecDeque;

use accord_engine::Message;

use crate::rng::SimRng;
use crate::swarm::Params;

/// A message on its way, in a link's FIFO.
#[derive(Debug)]
pub struct InFlight {
    pub arrive: u64,
    pub epoch: u64,
    /// Delivered late from an earlier connection.
    pub ghost: bool,
    pub msg: Message,
}

/// One direction between two nodes.
#[derive(Debug, Default)]
pub struct Link {
    pub queue: VecDeque<InFlight>,
    /// A delivery event for the head of the queue is pending.
    pub scheduled: bool,
    /// Active partitions blocking this direction.
    pub blocked: u32,
    /// Bumped whenever a block starts, so a stale idle-timeout check can tell.
    pub block_gen: u64,
    pub clogged: u32,
    last_arrive: u64,
    /// Messages of broken connections kept for a late delivery on the next one.
    pub ghosts: Vec<Message>,
}

/// The connection of one pair. The lower-numbered node dials.
#[derive(Debug, Default)]
pub struct Conn {
    pub epoch: u64,
    /// Whether each side (lower, higher) completed its handshake on this epoch.
    pub up: [bool; 2],
    pub dialing: bool,
    pub dial_scheduled: bool,
    pub backoff: u64,
    /// A message of an earlier connection was delivered on this epoch.
    pub ghost_epoch: Option<u64>,
}

impl Conn {
    pub fn is_up(&self) -> bool {
        self.up[0] && self.up[1]
    }
}

#[derive(Debug)]
pub struct Network {
    n: usize,
    pub links: Vec<Link>,
    pub conns: Vec<Conn>,
}

impl Network {
    pub fn new(n: usize) -> Self {
        Network {
            n,
            links: (0..n * n).map(|_| Link::default()).collect(),
            conns: (0..n * n).map(|_| Conn::default()).collect(),
        }
    }

    pub fn link_ix(&self, from: usize, to: usize) -> usize {
        from * self.n + to
    }

    /// The index of the pair's connection, and which side (0 = lower) `node` is.
    pub fn pair(&self, a: usize, b: usize) -> usize {
        a.min(b) * self.n + a.max(b)
    }

    pub fn ends(&self, pair: usize) -> (usize, usize) {
        (pair / self.n, pair % self.n)
    }

    /// Draws a one-way latency in µs.
    pub fn latency(&self, rng: &mut SimRng, params: &Params, clogged: bool) -> u64 {
        let mut l = params.latency_base + rng.below(params.latency_jitter + 1);
        if rng.chance(params.latency_tail_p) {
            l += rng.exp(params.latency_tail as f64);
        }
        if clogged {
            l += params.latency_tail * 4 + rng.below(params.latency_tail * 4 + 1);
        }
        l.max(1)
    }

    /// Queues a message on a link; returns the time its delivery event must be scheduled, if the
    /// link had no pending delivery.
    pub fn enqueue(
        &mut self,
        link: usize,
        now: u64,
        latency: u64,
        epoch: u64,
        ghost: bool,
        msg: Message,
    ) -> Option<u64> {
        let l = &mut self.links[link];
        // FIFO: a message never overtakes the one before it on the same stream.
        let arrive = (now + latency).max(l.last_arrive);
        l.last_arrive = arrive;
        l.queue.push_back(InFlight {
            arrive,
            epoch,
            ghost,
            msg,
        });
        if l.scheduled || l.blocked > 0 {
            return None;
        }
        l.scheduled = true;
        Some(arrive)
    }

    /// After a delivery or an unblock: when the next head of the queue is due, if any.
    pub fn next_due(&mut self, link: usize, now: u64) -> Option<u64> {
        let l = &mut self.links[link];
        if l.scheduled || l.blocked > 0 {
            return None;
        }
        let head = l.queue.front()?;
        l.scheduled = true;
        Some(head.arrive.max(now))
    }
}
