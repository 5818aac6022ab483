//! The built `accord` binary as a user runs it, and loopback ports for what it serves.

use std::net::TcpListener;
use std::process::Command;

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

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port on loopback")
}
