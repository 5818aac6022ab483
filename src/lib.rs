//! The accord service: the node that joins PostgreSQL, the network and the engine.

pub mod config;
pub mod demo;
pub mod node;
pub mod pg_connection;
pub mod review_page;
pub mod scratch_pg;
pub mod service;
pub mod status;
pub mod verify_command;
