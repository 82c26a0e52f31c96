//! PostgreSQL through the blocking `postgres` client.

use std::collections::HashMap;

use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls, Statement};

use super::backend::{Backend, Value};
use super::StoreError;

/// A connection to a PostgreSQL database.
pub struct PgBackend {
    client: Client,
    /// Prepared statements by SQL text (one round trip each, once per connection).
    prepared: HashMap<String, Statement>,
}

fn q(e: postgres::Error) -> StoreError {
    StoreError::Query(e.to_string())
}

impl PgBackend {
    /// Connects to `url`. `schema`: a schema to create if missing and work in (tests give each
    /// their own, so they run in parallel on one database).
    pub fn connect(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        let mut client = Client::connect(url, NoTls)
            .map_err(|e| StoreError::Open(format!("{}: {e}", redact(url))))?;
        if let Some(s) = schema {
            if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(StoreError::Open(format!("schema name {s:?}")));
            }
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {s}; SET search_path TO {s}"
                ))
                .map_err(|e| StoreError::Open(e.to_string()))?;
        }
        Ok(Self {
            client,
            prepared: HashMap::new(),
        })
    }

    /// Drops a schema and everything in it (tests clean up after themselves).
    pub fn drop_schema(url: &str, schema: &str) -> Result<(), StoreError> {
        let mut client =
            Client::connect(url, NoTls).map_err(|e| StoreError::Open(e.to_string()))?;
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .map_err(q)
    }

    fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).map_err(q)?;
        self.prepared.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(a), Some(b)) if b > a => format!("{}://***@{}", &url[..a], &url[b + 1..]),
        _ => url.to_owned(),
    }
}

fn params(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|v| match v {
            Value::Int(x) => x as &(dyn ToSql + Sync),
            Value::Real(x) => x as &(dyn ToSql + Sync),
            Value::Text(x) => x as &(dyn ToSql + Sync),
        })
        .collect()
}

impl Backend for PgBackend {
    fn batch(&mut self, stmts: &[(&str, Vec<Value>)]) -> Result<(), StoreError> {
        let mut prepared = Vec::with_capacity(stmts.len());
        for (sql, _) in stmts {
            prepared.push(self.statement(sql)?);
        }
        let mut tx = self.client.transaction().map_err(q)?;
        for (st, (_, values)) in prepared.iter().zip(stmts) {
            tx.execute(st, &params(values)).map_err(q)?;
        }
        tx.commit().map_err(q)
    }

    fn query(&mut self, sql: &str, values: &[Value]) -> Result<Vec<Vec<Value>>, StoreError> {
        let st = self.statement(sql)?;
        let rows = self.client.query(&st, &params(values)).map_err(q)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut r = Vec::with_capacity(row.len());
            for (i, col) in row.columns().iter().enumerate() {
                let t = col.type_();
                r.push(if *t == Type::INT8 {
                    Value::Int(row.try_get(i).map_err(q)?)
                } else if *t == Type::INT4 {
                    Value::Int(row.try_get::<_, Option<i32>>(i).map_err(q)?.map(i64::from))
                } else if *t == Type::FLOAT8 {
                    Value::Real(row.try_get(i).map_err(q)?)
                } else if *t == Type::TEXT || *t == Type::VARCHAR {
                    Value::Text(row.try_get(i).map_err(q)?)
                } else {
                    return Err(StoreError::Query(format!(
                        "column {} has type {t}, outside the shared schema's types",
                        col.name()
                    )));
                });
            }
            out.push(r);
        }
        Ok(out)
    }

    fn apply_script(&mut self, sql: &str, version: i64, now_ms: i64) -> Result<(), StoreError> {
        let mut tx = self.client.transaction().map_err(q)?;
        tx.batch_execute(sql).map_err(q)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_ms) VALUES ($1, $2)",
            &[&version, &now_ms],
        )
        .map_err(q)?;
        tx.commit().map_err(q)
    }
}
