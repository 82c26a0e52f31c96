//! VM subcommands: `run`, `status` (placeholder until the VMM lands).

/// VM subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum VmCommand {
    /// Placeholder.
    Status,
}

/// Runs a VM subcommand.
pub fn main(_cmd: VmCommand) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
