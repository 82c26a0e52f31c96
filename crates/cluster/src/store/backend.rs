//! The seam between the queries (written once in `mod.rs`) and a database driver.

use super::StoreError;

/// A value crossing the seam. Nulls are typed because PostgreSQL checks a parameter's type
/// even when it is NULL.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// BIGINT.
    Int(Option<i64>),
    /// DOUBLE PRECISION.
    Real(Option<f64>),
    /// TEXT.
    Text(Option<String>),
}

impl Value {
    /// A non-null text.
    pub fn text(s: &str) -> Self {
        Value::Text(Some(s.to_owned()))
    }

    /// The integer, if this is a non-null integer.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(v) => *v,
            _ => None,
        }
    }
}

/// What a driver provides. Statements use `$1`, `$2`, ... in order of first appearance.
pub trait Backend: Send {
    /// Runs the statements in one transaction.
    fn batch(&mut self, stmts: &[(&str, Vec<Value>)]) -> Result<(), StoreError>;
    /// Runs a query and returns its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, StoreError>;
    /// Runs a migration script and records its version, in one transaction.
    fn apply_script(&mut self, sql: &str, version: i64, now_ms: i64) -> Result<(), StoreError>;
}
