//! Shell conventions: `completions SHELL` and `man`, generated from the clap definitions.

use std::io::Write;

use anyhow::{Context, Result};

/// Shell helpers.
#[derive(clap::Subcommand, Debug)]
pub enum ShellCommand {
    /// Print a completion script, e.g. `fastmig completions bash > /etc/bash_completion.d/fastmig`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `fastmig man | man -l -`.
    Man,
}

/// Runs a shell helper.
pub fn main(cmd: ShellCommand) -> Result<()> {
    let mut buf = Vec::new();
    let mut command = crate::cli_command();
    match cmd {
        ShellCommand::Completions { shell } => {
            clap_complete::generate(shell, &mut command, "fastmig", &mut buf);
        }
        ShellCommand::Man => clap_mangen::Man::new(command)
            .render(&mut buf)
            .context("rendering the man page")?,
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&buf)
        .and_then(|()| out.flush())
        .context("writing to stdout")
}
