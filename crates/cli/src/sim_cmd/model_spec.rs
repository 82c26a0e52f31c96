//! `--migration model:PATH[,transport=T][,link=L][,dirty=N]`: the fitted pre-copy model as the
//! simulator's migration cost, parsed into typed values (a bad spec is a usage error, exit 2).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use fastmig_model::{Model, Transport};
use fastmig_sim::{Link, ModelCost};

use crate::usage;

/// `--migration model:PATH[,transport=T][,link=L][,dirty=N]`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ModelSpec {
    path: PathBuf,
    transport: Transport,
    link: Link,
    /// Page writes per second of a VM at 100 % CPU; `None`: the simulator's default.
    dirty_pps: Option<f64>,
}

impl ModelSpec {
    /// Parses what follows `model:`.
    pub(super) fn parse(rest: &str) -> Result<Self> {
        let mut parts = rest.split(',');
        let path = parts.next().unwrap_or("").trim();
        if path.is_empty() {
            return Err(usage!("--migration model:PATH: the model file is missing"));
        }
        let mut spec = ModelSpec {
            path: PathBuf::from(path),
            transport: Transport::Classic,
            link: Link::Host,
            dirty_pps: None,
        };
        for kv in parts {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                usage!("--migration model: {kv:?} is not KEY=VALUE (transport, link or dirty)")
            })?;
            match k.trim() {
                "transport" => spec.transport = parse_transport(v.trim())?,
                "link" => {
                    spec.link = v.parse().map_err(|e| usage!("--migration model: {e}"))?;
                }
                "dirty" => {
                    let n: f64 = v.trim().parse().map_err(|_| {
                        usage!("--migration model: dirty={v:?} is not a number of pages/s")
                    })?;
                    spec.dirty_pps = Some(n);
                }
                other => {
                    return Err(usage!(
                        "--migration model: unknown key {other:?} (transport, link or dirty)"
                    ))
                }
            }
        }
        Ok(spec)
    }

    /// Loads the model and builds the cost (a bad file or a missing transport is a usage
    /// error: it is the user's input).
    pub(super) fn build(&self) -> Result<ModelCost> {
        let model = Model::load(&self.path).map_err(|e| {
            usage!(
                "--migration model:{}: {}",
                self.path.display(),
                with_cause(&e)
            )
        })?;
        let mut cost = ModelCost::new(model, self.transport, self.link)
            .map_err(|e| usage!("--migration model:{}: {e}", self.path.display()))?;
        if let Some(d) = self.dirty_pps {
            cost = cost
                .with_dirty_pps_at_full_cpu(d)
                .map_err(|e| usage!("--migration model: {e}"))?;
        }
        Ok(cost)
    }
}

/// One fitted-model row of `--migration-sweep --model`.
#[derive(Debug, Clone)]
pub(super) struct ModelRow {
    /// How the table, the CSV and the chart name it (`model classic 10gbit`).
    pub(super) label: String,
    /// The transport (one chart line each).
    pub(super) transport: Transport,
    /// Link, Gbit/s (the chart's x).
    pub(super) gbit: f64,
    pub(super) cost: ModelCost,
}

/// The model rows of the speed sweep: classic at 32 MiB/s (2011 KVM's default cap), then
/// classic, multi-tcp and shm-class on 1 and 10 Gbit/s links; a transport the model lacks is
/// skipped with a note on stderr.
pub(super) fn sweep_rows(path: &Path) -> Result<Vec<ModelRow>> {
    let model =
        Model::load(path).map_err(|e| usage!("--model {}: {}", path.display(), with_cause(&e)))?;
    let grid = [
        (Transport::Classic, "32mib"),
        (Transport::Classic, "1gbit"),
        (Transport::Classic, "10gbit"),
        (Transport::MultiTcp, "1gbit"),
        (Transport::MultiTcp, "10gbit"),
        (Transport::Shm, "1gbit"),
        (Transport::Shm, "10gbit"),
    ];
    let mut rows = Vec::new();
    for (transport, link_name) in grid {
        if model.params(transport).is_err() {
            eprintln!(
                "--model {}: no {transport} parameters, its rows are skipped",
                path.display()
            );
            continue;
        }
        let link: Link = link_name.parse().map_err(|e| anyhow!("{e}"))?;
        let Link::BytesPerS(bytes) = link else {
            return Err(anyhow!("sweep link {link_name} is not a fixed rate"));
        };
        let cost = ModelCost::new(model.clone(), transport, link)
            .map_err(|e| usage!("--model {}: {e}", path.display()))?;
        rows.push(ModelRow {
            label: format!("model {transport} {link_name}"),
            transport,
            gbit: bytes * 8.0 / 1e9,
            cost,
        });
    }
    Ok(rows)
}

/// An error and its cause on one line (`reading model m.json: No such file or directory`).
fn with_cause(e: &dyn std::error::Error) -> String {
    match e.source() {
        Some(c) => format!("{e}: {c}"),
        None => e.to_string(),
    }
}

/// A transport by the name the engine uses.
pub(super) fn parse_transport(name: &str) -> Result<Transport> {
    Transport::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = Transport::ALL.iter().map(|t| t.name()).collect();
            usage!(
                "--migration model: transport {name:?} is not one of {}",
                names.join(", ")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_into_typed_values() {
        let s = ModelSpec::parse("m.json,transport=multi-tcp,link=10gbit,dirty=500").unwrap();
        assert_eq!(
            s,
            ModelSpec {
                path: PathBuf::from("m.json"),
                transport: Transport::MultiTcp,
                link: Link::BytesPerS(1.25e9),
                dirty_pps: Some(500.0),
            }
        );
        let d = ModelSpec::parse("m.json").unwrap();
        assert_eq!(
            (d.transport, d.link, d.dirty_pps),
            (Transport::Classic, Link::Host, None)
        );
    }

    #[test]
    fn bad_specs_are_usage_errors() {
        for bad in [
            "",
            "m.json,transport=udp",
            "m.json,link=fast",
            "m.json,link=0gbit",
            "m.json,dirty=lots",
            "m.json,colour=blue",
            "m.json,transport",
        ] {
            let e = ModelSpec::parse(bad)
                .err()
                .map(|e| crate::error::exit_code(&e));
            assert_eq!(e, Some(2), "{bad:?}");
        }
        // A file that is not there, and a negative dirty rate, fail when built.
        let e = ModelSpec::parse("/nonexistent/model.json")
            .and_then(|s| s.build())
            .err()
            .map(|e| crate::error::exit_code(&e));
        assert_eq!(e, Some(2));
    }
}
