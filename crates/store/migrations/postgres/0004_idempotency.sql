-- A step enqueued with an idempotency key exists once, however many services enqueue it at once.
ALTER TABLE messages ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX messages_idempotency_key ON messages (idempotency_key);
