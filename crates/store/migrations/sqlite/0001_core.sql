-- Relay settings: every save is a new version; the newest is in force.
CREATE TABLE relay_settings (
    version   INTEGER PRIMARY KEY,
    doc       TEXT    NOT NULL,
    saved_at  INTEGER NOT NULL,
    saved_by  TEXT    NOT NULL
);

-- The message log and the send queue in one table: a message waiting to be sent is a step.
CREATE TABLE messages (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    origin           TEXT    NOT NULL,
    state            TEXT    NOT NULL,
    content          TEXT    NOT NULL,
    from_addr        TEXT    NOT NULL,
    subject          TEXT    NOT NULL,
    message_id       TEXT    NOT NULL,
    used_fallback    INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    -- Start of the give-up window: enqueue time, reset by a manual retry.
    window_start     INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    interrupted      INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    claim_token      INTEGER NOT NULL DEFAULT 0,
    failure_class    TEXT,
    last_error       TEXT
);
CREATE INDEX messages_due ON messages (next_attempt_at, id) WHERE state IN ('queued', 'retrying');
CREATE INDEX messages_leased ON messages (lease_expires_at) WHERE state = 'sending';
CREATE INDEX messages_state ON messages (state, id);

CREATE TABLE recipients (
    message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    kind       TEXT    NOT NULL,
    address    TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    reply      TEXT,
    PRIMARY KEY (message_id, position)
);

CREATE TABLE attempts (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id       INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    started_at       INTEGER NOT NULL,
    finished_at      INTEGER NOT NULL,
    service_id       TEXT    NOT NULL,
    relay            TEXT    NOT NULL,
    settings_version INTEGER NOT NULL,
    outcome          TEXT    NOT NULL,
    stage            TEXT    NOT NULL,
    code             INTEGER,
    enhanced_code    TEXT,
    reply            TEXT,
    detail           TEXT    NOT NULL,
    hint             TEXT,
    recipients       TEXT    NOT NULL
);
CREATE INDEX attempts_message ON attempts (message_id, id);

-- Running Panel Services and workers; each heartbeats while it runs.
CREATE TABLE services (
    id           TEXT    PRIMARY KEY,
    kind         TEXT    NOT NULL,
    host         TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    version      TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    listen       TEXT,
    wake_port    INTEGER
);
