-- Retention: a message's content (text, HTML, attachments: often password-reset links) is
-- removed some days after its final state, keeping headers, recipients and attempts; later the
-- whole message goes. content_removed_at says when the content went.
ALTER TABLE messages ADD COLUMN content_removed_at BIGINT;
CREATE INDEX messages_finished ON messages (updated_at) WHERE state IN ('delivered', 'partly_failed', 'failed');
CREATE INDEX runs_started ON runs (started_at);
CREATE INDEX events_received ON events (received_at);
