-- What comes back after the relay's 250: each report Panel received for its bounce domain, matched
-- to its message (message_id) or kept unmatched (message_id NULL, with why). Bounced is a final
-- state: retention takes those messages like the other finished ones.
CREATE TABLE bounces (
    id          BIGSERIAL PRIMARY KEY,
    received_at BIGINT NOT NULL,
    message_id  BIGINT REFERENCES messages (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    recipient   TEXT,
    status      TEXT,
    diagnostic  TEXT,
    remote_mta  TEXT,
    reporting_mta TEXT,
    envelope_to TEXT NOT NULL,
    subject     TEXT NOT NULL,
    reason      TEXT,
    report      TEXT NOT NULL
);
CREATE INDEX bounces_message ON bounces (message_id);
CREATE INDEX bounces_received ON bounces (received_at);
-- The key that signs each message's VERP token: made once, shared by every service.
CREATE TABLE bounce_key (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    key TEXT NOT NULL
);
DROP INDEX messages_finished;
CREATE INDEX messages_finished ON messages (updated_at) WHERE state IN ('delivered', 'partly_failed', 'failed', 'cancelled', 'captured', 'bounced');
-- A bounce read from a mailbox has no VERP token: it is matched by the Message-ID it returns.
CREATE INDEX messages_message_id ON messages (message_id);
-- How far each bounce mailbox was read (its UIDVALIDITY and the last UID taken), so that what
-- Panel leaves there is not read again.
CREATE TABLE mailbox_marks (
    mailbox  TEXT PRIMARY KEY,
    validity BIGINT NOT NULL,
    last_uid BIGINT NOT NULL
);
