-- fastmig controller schema, version 1. Written in the subset SQLite and PostgreSQL share:
-- BIGINT, DOUBLE PRECISION and TEXT columns only; booleans are 0/1 BIGINTs; JSON is TEXT.
-- Ids are chosen by the controller (no AUTOINCREMENT/SERIAL, which differ between the two).

-- Every host the controller manages, as its last report described it.
CREATE TABLE hosts (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,             -- active | standby
    reachable BIGINT NOT NULL,       -- 1 when the last report arrived
    host_type TEXT NOT NULL,         -- fastmig_sim::setup::HostType as JSON
    migration_address TEXT NOT NULL,
    last_report_ms BIGINT NOT NULL
);

-- One utilisation sample per host per interval (the detectors' history).
CREATE TABLE host_samples (
    host TEXT NOT NULL,
    interval_no BIGINT NOT NULL,
    time_ms BIGINT NOT NULL,
    utilization DOUBLE PRECISION NOT NULL, -- requested MIPS / capacity
    vm_count BIGINT NOT NULL,
    PRIMARY KEY (host, interval_no)
);

-- Every VM and where it runs.
CREATE TABLE vms (
    name TEXT PRIMARY KEY,
    host TEXT,                       -- NULL while unknown
    spec TEXT NOT NULL,              -- proto::StartVm as JSON
    status TEXT NOT NULL,            -- the VM process's RunStatus
    demand DOUBLE PRECISION NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- One demand sample per VM per interval (the selectors' history).
CREATE TABLE vm_samples (
    vm TEXT NOT NULL,
    interval_no BIGINT NOT NULL,
    host TEXT NOT NULL,
    demand DOUBLE PRECISION NOT NULL,      -- fraction of the VM's MIPS
    dirty_rate_pps DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (vm, interval_no)
);

-- One row per interval: what ran, what it decided, how long deciding took.
CREATE TABLE decisions (
    id BIGINT PRIMARY KEY,           -- the interval number
    time_ms BIGINT NOT NULL,
    policy TEXT NOT NULL,
    decision_us BIGINT NOT NULL,
    hosts BIGINT NOT NULL,
    vms BIGINT NOT NULL,
    unreachable BIGINT NOT NULL,
    overloaded BIGINT NOT NULL,
    migrations_ordered BIGINT NOT NULL,
    summary TEXT NOT NULL            -- controller::Decision as JSON
);

-- Every migration ordered, by the policy or by an operator.
CREATE TABLE migrations (
    id BIGINT PRIMARY KEY,
    vm TEXT NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    transport TEXT NOT NULL,         -- TransportKind as JSON
    state TEXT NOT NULL,             -- ordered | running | in-doubt | done | failed
    origin TEXT NOT NULL,            -- policy | operator | evacuation
    decision BIGINT,                 -- the interval that ordered it (NULL for operators)
    predicted_s DOUBLE PRECISION,
    predicted_downtime_s DOUBLE PRECISION,
    measured_s DOUBLE PRECISION,
    measured_downtime_s DOUBLE PRECISION,
    summary TEXT,                    -- MigrationSummary as JSON when the source sent one
    error TEXT,
    started_ms BIGINT NOT NULL,
    ended_ms BIGINT
);

CREATE INDEX migrations_by_state ON migrations (state);

-- Operator orders received over the API and what became of them.
CREATE TABLE orders (
    id BIGINT PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,              -- place-vm | migrate | standby | wake
    body TEXT NOT NULL,              -- the request as JSON
    outcome TEXT NOT NULL            -- accepted, or the refusal
);
