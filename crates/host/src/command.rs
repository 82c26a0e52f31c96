//! The control protocol as types: every command with its arguments ([`Command`]), every reply
//! ([`StatusInfo`], [`VmInfo`], [`MigrateState`], ...), and the QMP-like envelope around them.
//!
//! One line in, one line out (see the crate README for the wire format):
//!
//! ```text
//!  {"execute": "migrate", "arguments": {"uri": "127.0.0.1:4444"}, "id": 7}
//!  {"return": {}, "id": 7}
//!  {"execute": "self-destruct"}
//!  {"error": {"class": "CommandNotFound", "desc": "the command self-destruct has not been found"}}
//! ```
//!
//! Adding a command means one variant of [`Command`] and one arm in the VM process's
//! `execute`; the parser, the error classes and the client's generic path follow from the enum.

use std::time::Duration;

use fastmig_migration::tls::TlsFiles;
use fastmig_migration::{
    Endpoint, MigrateOptions, MigrationSummary, OnNoConverge, Progress, TransportKind,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use strum::VariantNames;

/// A control command. On the wire: `{"execute": NAME, "arguments": {...}}`; `arguments` may be
/// left out (or be `{}`) for commands that take none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::VariantNames)]
#[serde(
    tag = "execute",
    content = "arguments",
    rename_all = "kebab-case",
    deny_unknown_fields
)]
#[strum(serialize_all = "kebab-case")]
pub enum Command {
    /// `query-status`: the VM's run state and counters → [`StatusInfo`].
    QueryStatus,
    /// `query-vm`: the VM's configuration → [`VmInfo`].
    QueryVm,
    /// `stop`: pause the vCPUs → `{}`. Refused while a migration is in flight.
    Stop,
    /// `cont`: resume the vCPUs → `{}`. Refused once the VM has migrated away.
    Cont,
    /// `quit`: end the process (cancels an outgoing migration first) → `{}`.
    Quit,
    /// `verify-memory`: check every stamped page of a `verify` workload →
    /// [`fastmig_vmm::VerifyReport`].
    VerifyMemory,
    /// `migrate`: start an outgoing live migration in the background → `{}`; follow it with
    /// `query-migrate`.
    Migrate(MigrationRequest),
    /// `query-migrate`: the outgoing migration's state → [`MigrateState`].
    QueryMigrate,
    /// `migrate-cancel`: cancel the outgoing migration → `{}`; the VM keeps running here.
    MigrateCancel,
    /// `set-dirty-rate`: change the write rate of a `dirty`/`verify` workload → `{}` (what
    /// the host agent does to make a guest's load follow its CPU demand).
    SetDirtyRate(SetDirtyRate),
}

/// Arguments of `set-dirty-rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetDirtyRate {
    /// Page writes per second over all vCPUs, above 0.
    pub pages_per_s: u64,
}

impl Command {
    /// Every command name, as written on the wire.
    pub fn names() -> &'static [&'static str] {
        Self::VARIANTS
    }

    /// Builds a command from its name and its arguments as JSON (what `fastmig ctl` and the
    /// server both do). An unknown name is [`ErrorClass::CommandNotFound`].
    pub fn from_parts(name: &str, arguments: Option<Value>) -> Result<Command, CommandError> {
        if !Self::names().contains(&name) {
            return Err(CommandError {
                class: ErrorClass::CommandNotFound,
                desc: format!("the command {name} has not been found"),
            });
        }
        let mut obj = Map::new();
        obj.insert("execute".into(), Value::String(name.into()));
        match arguments {
            // `{}` and a missing member mean the same: no arguments.
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if m.is_empty() && !Self::takes_arguments(name) => {}
            Some(Value::Object(m)) => {
                obj.insert("arguments".into(), Value::Object(m));
            }
            Some(_) => return Err(CommandError::generic("\"arguments\" must be an object")),
        }
        serde_json::from_value(Value::Object(obj))
            .map_err(|e| CommandError::generic(format!("{name}: {e}")))
    }

    /// True for commands whose variant carries arguments (serde needs them present).
    fn takes_arguments(name: &str) -> bool {
        // A unit variant serialises without `arguments`; probing the enum keeps this in step
        // with it instead of a second list.
        serde_json::from_value::<Command>(serde_json::json!({ "execute": name })).is_err()
    }

    /// The command's wire name.
    pub fn name(&self) -> String {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m
                .get("execute")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        }
    }
}

/// One parsed request line: the command and the `id` to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command.
    pub command: Command,
    /// Echoed back in the reply when present.
    pub id: Option<Value>,
}

impl Request {
    /// Parses one request line. On error, returns the error reply (with the `id` if one could
    /// be read) to send back.
    pub fn parse(line: &str) -> Result<Request, Reply> {
        let value: Value = serde_json::from_str(line)
            .map_err(|e| Reply::error(None, CommandError::generic(format!("invalid JSON: {e}"))))?;
        let Value::Object(mut obj) = value else {
            return Err(Reply::error(
                None,
                CommandError::generic("a request must be a JSON object"),
            ));
        };
        let id = obj.remove("id");
        let fail = |e: CommandError| Reply::error(id.clone(), e);
        let name = match obj.remove("execute") {
            Some(Value::String(name)) => name,
            _ => {
                return Err(fail(CommandError::generic(
                    "missing string member \"execute\"",
                )))
            }
        };
        let arguments = obj.remove("arguments");
        if let Some(other) = obj.keys().next() {
            return Err(fail(CommandError::generic(format!(
                "unknown member {other:?} (a request has execute, arguments and id)"
            ))));
        }
        let command = Command::from_parts(&name, arguments).map_err(&fail)?;
        Ok(Request { command, id })
    }
}

/// QMP-like error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// A malformed request, bad arguments, or a command that failed or is refused in the
    /// VM's current state.
    GenericError,
    /// No such command.
    CommandNotFound,
}

/// A command's failure: its class and one line saying what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{desc}")]
pub struct CommandError {
    /// Error class.
    pub class: ErrorClass,
    /// What went wrong.
    pub desc: String,
}

impl CommandError {
    /// A [`ErrorClass::GenericError`].
    pub fn generic(desc: impl Into<String>) -> Self {
        CommandError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
}

/// One reply line: `{"return": ...}` or `{"error": {...}}`, with the request's `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// Success.
    Return {
        /// The command's result (`{}` for commands without one).
        #[serde(rename = "return")]
        value: Value,
        /// The request's `id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
    /// Failure.
    Error {
        /// Class and description.
        error: CommandError,
        /// The request's `id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Value>,
    },
}

impl Reply {
    /// An error reply.
    pub fn error(id: Option<Value>, error: CommandError) -> Reply {
        Reply::Error { error, id }
    }

    /// The reply as one JSON line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"error":{{"class":"GenericError","desc":"unencodable reply: {e}"}}}}"#)
        })
    }
}

/// An empty `{}` result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// What a command returns (serialised as the bare value inside `return`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Return {
    /// `query-status`.
    Status(StatusInfo),
    /// `query-vm`.
    Vm(VmInfo),
    /// `verify-memory`.
    Verify(fastmig_vmm::VerifyReport),
    /// `query-migrate`.
    Migrate(Box<MigrateState>),
    /// Commands without a result.
    Empty(Empty),
}

/// The process's state as `query-status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// Built, vCPUs not started.
    Created,
    /// Waiting for (or receiving) an incoming migration; the VM has not run here.
    Inmigrate,
    /// The guest runs.
    Running,
    /// Paused by `stop`.
    Paused,
    /// Migrated away: paused here for good, the destination runs it. Ends with `quit`.
    Postmigrate,
    /// Shut down.
    Stopped,
    /// A vCPU failed (`error` says why).
    Failed,
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = serde_json::to_value(self).unwrap_or(Value::Null);
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Run state.
    pub status: RunStatus,
    /// The guest's progress counter: pages its workload has written plus heartbeats of an
    /// idle guest, over all vCPUs since boot, carried over by a migration. It grows only while
    /// the guest runs, so it shows where the guest is and that it moves.
    pub progress: u64,
    /// Distinct guest pages dirtied per second over the last second, from KVM's dirty log.
    /// Lower than a workload's requested write `rate` when writes hit the same pages again
    /// (it is capped by the working set); 0 until a second of running has been measured.
    pub dirty_rate_pps: f64,
    /// Working set: distinct guest pages dirtied over the last 10 s of running, from KVM's
    /// dirty log (absent before a VM exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_set_pages: Option<u64>,
    /// Pages the guest's workload has written (re-writes counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_written: Option<u64>,
    /// Heartbeats of an idle guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeats: Option<u64>,
    /// An outgoing migration is in flight.
    #[serde(default)]
    pub migrating: bool,
    /// Incoming only: the migration listener is bound, a source may connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listening: Option<bool>,
    /// Why the VM failed, when `status` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Reply of `query-vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Guest memory, bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Workload spec, as `fastmig run --workload` takes it.
    pub workload: String,
}

/// Reply of `query-migrate`: the outgoing migration, tagged by `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum MigrateState {
    /// No migration was started.
    None,
    /// In flight; `progress` is absent until the handshake is done.
    Active {
        /// Last progress report.
        progress: Option<Progress>,
    },
    /// Done: the destination runs the VM; it stays paused here (`postmigrate`).
    Completed {
        /// The source's summary.
        summary: MigrationSummary,
    },
    /// Failed: the VM runs here again.
    Failed {
        /// One line saying what failed.
        error: String,
    },
    /// Cancelled by `migrate-cancel` or `quit`: the VM runs here again.
    Cancelled {
        /// One line saying so.
        error: String,
    },
    /// `Commit` was sent but no `Resumed` came back: the VM is paused here (never resumed
    /// automatically) and may run on the destination. An operator who checked the
    /// destination may `cont` it here.
    InDoubt {
        /// One line saying what failed after the commit.
        error: String,
    },
}

/// Arguments of `migrate`. Every member but `uri` may be left out; [`Default`] gives the
/// values used then (the migration engine's own defaults).
///
/// ```json
/// {"uri": "127.0.0.1:4444", "transport": {"kind": "multi-tcp", "streams": 4},
///  "downtime_limit_ms": 30, "max_bandwidth": 1073741824, "max_rounds": 30,
///  "on_no_converge": "wait", "timeout_ms": 10000}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationRequest {
    /// Destination: `HOST:PORT` or `unix:PATH`. Required.
    pub uri: String,
    /// Transport, tagged by `kind`.
    pub transport: TransportKind,
    /// Largest acceptable downtime. On the wire: `downtime_limit_ms`.
    #[serde(rename = "downtime_limit_ms", with = "millis")]
    pub downtime_limit: Duration,
    /// Bandwidth cap for page data, bytes/s; none when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Most pre-copy rounds, including the first full pass (at least 2).
    pub max_rounds: u32,
    /// What to do when rounds stop converging.
    pub on_no_converge: OnNoConverge,
    /// A destination silent this long fails the migration. On the wire: `timeout_ms`.
    #[serde(rename = "timeout_ms", with = "millis")]
    pub timeout: Duration,
    /// Mutual TLS 1.3 files (`{"cert", "key", "ca"}`), classic and multi-tcp over TCP only;
    /// none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
}

impl Default for MigrationRequest {
    fn default() -> Self {
        let engine = MigrateOptions::default();
        MigrationRequest {
            uri: String::new(),
            transport: engine.transport,
            downtime_limit: engine.downtime_limit,
            max_bandwidth: engine.bandwidth_limit,
            max_rounds: engine.max_rounds,
            on_no_converge: engine.on_no_converge,
            timeout: engine.io_timeout,
            tls: None,
        }
    }
}

/// Most multi-tcp streams a request may ask for.
pub const MAX_STREAMS: u32 = 64;

impl MigrationRequest {
    /// A request to migrate to `uri` with every other member at its default.
    pub fn to(uri: impl Into<String>) -> Self {
        MigrationRequest {
            uri: uri.into(),
            ..MigrationRequest::default()
        }
    }

    /// Checks what serde cannot and returns the destination.
    pub fn validate(&self) -> Result<Endpoint, CommandError> {
        let bad = |m: String| CommandError::generic(format!("migrate: {m}"));
        if self.uri.is_empty() {
            return Err(bad("missing argument `uri`".into()));
        }
        let endpoint = self
            .uri
            .parse()
            .map_err(|e: fastmig_migration::BadEndpoint| bad(e.to_string()))?;
        if let TransportKind::MultiTcp { streams } = self.transport {
            if !(1..=MAX_STREAMS).contains(&streams) {
                return Err(bad(format!(
                    "`streams` must be 1..={MAX_STREAMS}, not {streams}"
                )));
            }
        }
        if self.max_rounds < 2 {
            return Err(bad("`max_rounds` must be at least 2".into()));
        }
        if self.timeout.is_zero() {
            return Err(bad("`timeout_ms` must be positive".into()));
        }
        if self.tls.is_some()
            && !matches!(
                self.transport,
                TransportKind::Classic | TransportKind::MultiTcp { .. }
            )
        {
            return Err(bad("TLS applies to classic and multi-tcp only".into()));
        }
        if self.max_bandwidth == Some(0) {
            return Err(bad(
                "`max_bandwidth` must be positive (leave it out for none)".into(),
            ));
        }
        Ok(endpoint)
    }

    /// The engine's options for this request (cancel token and progress callback left at
    /// their defaults). Connecting takes at most 10 s of the timeout; the user's timeout
    /// bounds every other wait, the wait for `Ready` and `Resumed` too.
    pub fn engine_options(&self) -> MigrateOptions {
        MigrateOptions {
            transport: self.transport,
            downtime_limit: self.downtime_limit,
            max_rounds: self.max_rounds,
            on_no_converge: self.on_no_converge,
            bandwidth_limit: self.max_bandwidth,
            connect_timeout: self.timeout.min(Duration::from_secs(10)),
            io_timeout: self.timeout,
            ack_timeout: self.timeout,
            ..MigrateOptions::default()
        }
    }
}

/// A [`Duration`] as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Command, Reply> {
        Request::parse(&v.to_string()).map(|r| r.command)
    }

    fn class(r: Result<Command, Reply>) -> ErrorClass {
        match r {
            Err(Reply::Error { error, .. }) => error.class,
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    #[test]
    fn every_name_round_trips_through_serde() {
        for name in Command::names() {
            let cmd = if *name == "migrate" {
                Command::Migrate(MigrationRequest::to("127.0.0.1:1"))
            } else if *name == "set-dirty-rate" {
                Command::SetDirtyRate(SetDirtyRate { pages_per_s: 100 })
            } else {
                Command::from_parts(name, None).expect(name)
            };
            assert_eq!(&cmd.name(), name);
            let line = serde_json::to_string(&cmd).expect("serialises");
            assert_eq!(Request::parse(&line).expect("parses").command, cmd);
        }
        assert_eq!(Command::names().len(), 10);
    }

    #[test]
    fn unit_commands_take_no_or_empty_arguments_only() {
        assert_eq!(parse(json!({"execute": "stop"})).ok(), Some(Command::Stop));
        assert_eq!(
            parse(json!({"execute": "stop", "arguments": {}})).ok(),
            Some(Command::Stop)
        );
        assert_eq!(
            class(parse(
                json!({"execute": "stop", "arguments": {"now": true}})
            )),
            ErrorClass::GenericError
        );
        assert_eq!(
            class(parse(json!({"execute": "stop", "arguments": 3}))),
            ErrorClass::GenericError
        );
        assert_eq!(
            class(parse(json!({"execute": "self-destruct"}))),
            ErrorClass::CommandNotFound
        );
        assert_eq!(
            class(parse(json!({"execute": 5}))),
            ErrorClass::GenericError
        );
        assert_eq!(
            class(parse(json!({"arguments": {}}))),
            ErrorClass::GenericError
        );
        assert_eq!(
            class(parse(json!({"execute": "stop", "extra": 1}))),
            ErrorClass::GenericError
        );
        assert_eq!(
            class(Request::parse("[1, 2]").map(|r| r.command)),
            ErrorClass::GenericError
        );
        assert_eq!(
            class(Request::parse("nope").map(|r| r.command)),
            ErrorClass::GenericError
        );
    }

    #[test]
    fn set_dirty_rate_takes_its_rate_and_nothing_else() {
        assert_eq!(
            parse(json!({"execute": "set-dirty-rate", "arguments": {"pages_per_s": 500}})).ok(),
            Some(Command::SetDirtyRate(SetDirtyRate { pages_per_s: 500 }))
        );
        for bad in [
            json!({"execute": "set-dirty-rate"}),
            json!({"execute": "set-dirty-rate", "arguments": {}}),
            json!({"execute": "set-dirty-rate", "arguments": {"pages_per_s": -1}}),
            json!({"execute": "set-dirty-rate", "arguments": {"pages_per_s": 5, "x": 1}}),
        ] {
            assert_eq!(class(parse(bad.clone())), ErrorClass::GenericError, "{bad}");
        }
    }

    #[test]
    fn the_id_is_kept_even_when_the_command_is_bad() {
        let r = Request::parse(r#"{"execute": "query-status", "id": "abc"}"#).expect("ok");
        assert_eq!(r.id, Some(json!("abc")));
        match Request::parse(r#"{"execute": "nope", "id": 7}"#) {
            Err(Reply::Error { id, .. }) => assert_eq!(id, Some(json!(7))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn migrate_arguments_are_typed_and_checked() {
        let cmd = parse(json!({"execute": "migrate", "arguments": {
            "uri": "127.0.0.1:4444", "transport": {"kind": "multi-tcp", "streams": 3},
            "downtime_limit_ms": 50, "on_no_converge": "force"
        }}))
        .expect("valid");
        let Command::Migrate(r) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(r.transport, TransportKind::MultiTcp { streams: 3 });
        assert_eq!(r.downtime_limit, Duration::from_millis(50));
        assert_eq!(r.on_no_converge, OnNoConverge::Force);
        // Left-out members take the one default.
        let d = MigrationRequest::default();
        assert_eq!(
            (r.max_rounds, r.timeout, r.max_bandwidth),
            (d.max_rounds, d.timeout, d.max_bandwidth)
        );
        assert!(r.validate().is_ok());

        let base = || json!({"uri": "127.0.0.1:4444"});
        let with = |k: &str, v: Value| {
            let mut a = base();
            a[k] = v;
            a
        };
        // Rejected while parsing.
        for bad in [
            json!({"uri": 5}),
            with("transport", json!({"kind": "carrier-pigeon"})),
            with("transport", json!("classic")),
            with("streams", json!(2)),
            with("on_no_converge", json!("maybe")),
            with("downtime_limit_ms", json!(-1)),
            with("bogus", json!(1)),
        ] {
            let r = parse(json!({"execute": "migrate", "arguments": bad.clone()}));
            assert_eq!(class(r), ErrorClass::GenericError, "{bad}");
        }
        // Parsed, then refused by validate().
        for bad in [
            json!({}),
            json!({"uri": "nowhere"}),
            with("transport", json!({"kind": "multi-tcp", "streams": 0})),
            with("transport", json!({"kind": "multi-tcp", "streams": 65})),
            with("max_rounds", json!(1)),
            with("timeout_ms", json!(0)),
            with("max_bandwidth", json!(0)),
        ] {
            let cmd =
                parse(json!({"execute": "migrate", "arguments": bad.clone()})).expect("parses");
            let Command::Migrate(r) = cmd else { panic!() };
            assert!(r.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_have_the_qmp_shape() {
        let ok = Reply::Return {
            value: json!({}),
            id: Some(json!(1)),
        };
        assert_eq!(ok.to_line(), r#"{"return":{},"id":1}"#);
        let err = Reply::error(None, CommandError::generic("no"));
        assert_eq!(
            err.to_line(),
            r#"{"error":{"class":"GenericError","desc":"no"}}"#
        );
        let back: Reply = serde_json::from_str(&err.to_line()).expect("parses");
        assert_eq!(back, err);
        let st = serde_json::to_value(MigrateState::Active { progress: None }).expect("json");
        assert_eq!(st, json!({"status": "active", "progress": null}));
    }
}
