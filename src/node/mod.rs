//! The node beside one PostgreSQL database: init, capture, apply, and the replication loop.

pub mod apply;
pub mod apply_worker;
pub mod capture;
mod copy_tuples;
pub mod ddl_guard;
pub mod ids;
pub mod init;
pub mod join;
pub mod key_locks;
pub mod leave;
pub mod members;
pub mod net;
pub mod pgoutput;
pub mod pipeline;
pub mod quic;
pub mod repair;
pub mod review;
pub mod rows;
pub mod runtime;
pub mod schema_copy;
pub mod shapes;
pub mod spool;
pub mod store;
pub mod tagging;
pub mod truncate;
pub mod verify;
mod verify_read;
