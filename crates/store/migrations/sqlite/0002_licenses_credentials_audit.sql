-- License keys as added (re-verified at every use), stored credentials (envelope-encrypted;
-- the master key is not in the database), and the audit log of who did what to them.
CREATE TABLE licenses (
    id        TEXT PRIMARY KEY,
    key       TEXT NOT NULL,
    added_at  INTEGER NOT NULL,
    added_by  TEXT NOT NULL
);

CREATE TABLE credentials (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    kind          TEXT NOT NULL,
    username      TEXT NOT NULL,
    attributes    TEXT NOT NULL DEFAULT '{}',
    master_key_id TEXT NOT NULL,
    wrapped_key   BLOB NOT NULL,
    ciphertext    BLOB NOT NULL,
    created_at    INTEGER NOT NULL,
    created_by    TEXT NOT NULL,
    updated_at    INTEGER NOT NULL,
    updated_by    TEXT NOT NULL,
    first_used_at INTEGER
);

CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_log_at ON audit_log (at);

-- Bumped by every change to licenses or credentials, so workers rebuild their relay state.
CREATE TABLE generations (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO generations (name, value) VALUES ('secrets', 0);

-- The master key every stored credential is wrapped with. A credential sealed under any other
-- key is refused on write, so a rotation cannot race a concurrent `credential set`.
CREATE TABLE master_key (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    key_id TEXT NOT NULL
);
