//! Error conventions at the binary edge: one clear line, and exit code 2 for bad input.

use std::fmt;

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

/// Exit code for an error: 2 when any error in the chain is a [`UsageError`], else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|e| e.is::<UsageError>()) {
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
    }
}
