//! accord's deterministic simulator (`accord sim`).
//!
//! It runs the real engine state machines (`Capturer`, `merge`, `Replication`, the protocol's
//! handshake checks) of N nodes, each beside a simulated database, over a simulated network with
//! per-node simulated clocks, injects faults, and checks every invariant of PRODUCT.md against an
//! independent oracle. Time is simulated and jumps from event to event; all randomness comes from
//! one seed; nothing iterates a hash map. So a seed replays a run exactly, and a failure prints
//! the one command that replays it.
//!
//! Map: `config` (what a run is), `swarm` (the regime a seed draws), `rng`, `trace` (determinism
//! hash), `clock`, `network`, `db` (a node's durable state), `node` (the driver of the engine),
//! `workload`, `world` (event loop, faults, liveness), `oracle` + `expect` + `check` (the
//! invariants), `runner` (seeds in parallel, determinism check), `shrink`, `cli`.

pub mod apply;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod db;
pub mod expect;
pub mod network;
pub mod node;
pub mod oracle;
pub mod outcome;
pub mod rng;
pub mod runner;
pub mod shrink;
pub mod swarm;
pub mod table;
pub mod trace;
pub mod verify_check;
pub mod workload;
pub mod world;

pub use cli::{run as run_cli, SimArgs};
pub use config::{FaultKind, FaultSet, PlantedBug, SimConfig};
pub use outcome::{Failure, Invariant, Stats};
pub use runner::{run_seed, SeedReport};
