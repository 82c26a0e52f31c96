//! `fastmig simulate` (placeholder until the simulator lands).

/// Arguments of `fastmig simulate`.
#[derive(clap::Args, Debug)]
pub struct SimulateArgs {}

/// Runs the simulator.
pub fn main(_args: SimulateArgs) -> anyhow::Result<()> {
    anyhow::bail!("simulate: not built yet")
}
