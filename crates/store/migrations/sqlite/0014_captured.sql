-- Captured (the recipient policy keeps the message and sends nothing) is a final state:
-- retention takes captured messages like the other finished ones.
DROP INDEX messages_finished;
CREATE INDEX messages_finished ON messages (updated_at) WHERE state IN ('delivered', 'partly_failed', 'failed', 'cancelled', 'captured');
