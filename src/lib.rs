//! The accord service: the node that joins PostgreSQL, the network and the engine.

pub mod node;
