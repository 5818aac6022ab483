//! `accord demo`: a three-node cluster on this machine, with conflicting work on all three.

use anyhow::{bail, Result};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {}

/// Runs the demo and prints its report; `Ok(false)` when the nodes did not converge.
pub async fn run(_args: DemoArgs) -> Result<bool> {
    bail!("accord demo is not built yet")
}
