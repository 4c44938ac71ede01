-- Urgent mail (0: a password reset, the Test Message) is claimed before bulk mail (1: a
-- schedule's reminders); the due index leads with it so a claim reads the urgent ones first.
ALTER TABLE messages ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0;
DROP INDEX messages_due;
CREATE INDEX messages_due ON messages (priority, next_attempt_at, id) WHERE state IN ('queued', 'retrying');
