//! Error conventions at the binary edge: one clear line on stderr, and one exit-code rule.
//!
//! - 2: the command line or the request is wrong and must be changed: a bad flag or value,
//!   a socket path that is not free, a request the VM process refuses (unknown command, bad
//!   argument, a VM not in a state to do it), a missing `/dev/kvm`;
//! - 1: something failed while running: no VM process answers at the control socket, a
//!   migration failed, a guest failed, a file could not be written.

use std::fmt;

use fastmig_host::{ClientError, HostError};

/// Marks an error as the user's input being wrong (exit code 2) rather than a runtime failure.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Shorthand: `return Err(usage!("bad size {s}"))`.
#[macro_export]
macro_rules! usage {
    ($($arg:tt)*) => {
        anyhow::Error::new($crate::error::UsageError(format!($($arg)*)))
    };
}

/// Exit code for an error (see the module doc).
pub fn exit_code(err: &anyhow::Error) -> i32 {
    let usage = err.chain().any(|e| {
        e.is::<UsageError>()
            || e.downcast_ref::<HostError>()
                .is_some_and(HostError::is_usage)
            || matches!(
                e.downcast_ref::<ClientError>(),
                Some(ClientError::Refused(_))
            )
    });
    if usage {
        2
    } else {
        1
    }
}

/// The whole error chain on one line: `outer: cause: root cause`.
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let s = cause.to_string().replace('\n', " ");
        // Avoid repeating a cause that the outer message already spells out.
        if parts.last().is_some_and(|p| p.contains(&s)) {
            continue;
        }
        parts.push(s);
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_map_to_exit_code_two_even_when_wrapped() {
        let err = usage!("bad spec").context("parsing --workload");
        assert_eq!(exit_code(&err), 2);
        assert_eq!(one_line(&err), "parsing --workload: bad spec");
        let runtime = anyhow::anyhow!("connection reset");
        assert_eq!(exit_code(&runtime), 1);
        let refused = anyhow::Error::new(ClientError::Refused(
            fastmig_host::CommandError::generic("no migration in progress"),
        ));
        assert_eq!(exit_code(&refused.context("migrate-cancel")), 2);
        let missing = anyhow::Error::new(HostError::NotASocket("/tmp/x".into()));
        assert_eq!(exit_code(&missing), 2);
    }
}
