//! The built `accord` binary as a user runs it, and loopback ports for what it serves.

use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Runs `accord ARGS` without the environment overrides a developer's shell may hold; returns
/// whether it succeeded and its stdout and stderr together.
pub fn accord(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_accord"))
        .args(args)
        .env_remove("ACCORD_DSN")
        .env_remove("ACCORD_REVIEW_TOKEN")
        .output()
        .expect("the accord binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A TCP port free on loopback now, below Linux's ephemeral range (32768 and up): a port the
/// kernel hands out could be taken by any outgoing connection (a PostgreSQL client of a test
/// running beside) before the node binds it, or between two of its restarts. A run saw that
/// ("Address already in use" on a node's metrics port).
pub fn free_tcp_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let spread = std::process::id().wrapping_mul(7_919);
    for _ in 0..10_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (spread.wrapping_add(n.wrapping_mul(104_729)) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on loopback between 20000 and 32000")
}
