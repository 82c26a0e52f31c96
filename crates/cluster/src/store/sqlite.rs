//! SQLite through `rusqlite` (bundled: nothing to install).

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql};

use super::backend::{Backend, Value};
use super::StoreError;

/// An open SQLite database file.
pub struct SqliteBackend {
    conn: Connection,
}

fn q(e: rusqlite::Error) -> StoreError {
    StoreError::Query(e.to_string())
}

impl SqliteBackend {
    /// Opens (creating) the file. WAL journal: readers (the API) do not block the writer.
    pub fn open(path: &str) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|e| StoreError::Open(format!("{path}: {e}")))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .and_then(|()| conn.pragma_update(None, "synchronous", "NORMAL"))
            .and_then(|()| conn.busy_timeout(std::time::Duration::from_secs(5)))
            .map_err(|e| StoreError::Open(format!("{path}: {e}")))?;
        Ok(Self { conn })
    }
}

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Int(Some(v)) => ToSqlOutput::from(*v),
            Value::Real(Some(v)) => ToSqlOutput::from(*v),
            Value::Text(Some(v)) => ToSqlOutput::from(v.as_str()),
            Value::Int(None) | Value::Real(None) | Value::Text(None) => {
                ToSqlOutput::from(rusqlite::types::Null)
            }
        })
    }
}

impl Backend for SqliteBackend {
    fn batch(&mut self, stmts: &[(&str, Vec<Value>)]) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(q)?;
        for (sql, params) in stmts {
            let mut st = tx.prepare_cached(sql).map_err(q)?;
            st.execute(rusqlite::params_from_iter(params.iter()))
                .map_err(q)?;
        }
        tx.commit().map_err(q)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, StoreError> {
        let mut st = self.conn.prepare_cached(sql).map_err(q)?;
        let n = st.column_count();
        let mut rows = st
            .query(rusqlite::params_from_iter(params.iter()))
            .map_err(q)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(q)? {
            let mut r = Vec::with_capacity(n);
            for i in 0..n {
                r.push(match row.get_ref(i).map_err(q)? {
                    ValueRef::Null => Value::Text(None),
                    ValueRef::Integer(v) => Value::Int(Some(v)),
                    ValueRef::Real(v) => Value::Real(Some(v)),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        Value::Text(Some(String::from_utf8_lossy(t).into_owned()))
                    }
                });
            }
            out.push(r);
        }
        Ok(out)
    }

    fn apply_script(&mut self, sql: &str, version: i64, now_ms: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(q)?;
        tx.execute_batch(sql).map_err(q)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_ms) VALUES ($1, $2)",
            rusqlite::params![version, now_ms],
        )
        .map_err(q)?;
        tx.commit().map_err(q)
    }
}
