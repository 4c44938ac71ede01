-- A key is unique where it is given: each message, event and run without one (nearly all of
-- them) wrote a NULL into its table's unique index of keys, for an entry no lookup ever
-- finds. The indexes now hold the keys only; an insert that names a key names the index by
-- its condition.
DROP INDEX messages_idempotency_key;
CREATE UNIQUE INDEX messages_idempotency_key ON messages (idempotency_key) WHERE idempotency_key IS NOT NULL;
ALTER TABLE events DROP CONSTRAINT events_idempotency_key_key;
CREATE UNIQUE INDEX events_idempotency_key ON events (idempotency_key) WHERE idempotency_key IS NOT NULL;
ALTER TABLE runs DROP CONSTRAINT runs_fire_key_key;
CREATE UNIQUE INDEX runs_fire_key ON runs (fire_key) WHERE fire_key IS NOT NULL;
