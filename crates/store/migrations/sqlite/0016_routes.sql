-- Which route (the primary relay or a standby) an attempt used: the message log shows it, and
-- the dashboard reads each route's latest attempt for its state (hence the index).
ALTER TABLE attempts ADD COLUMN route TEXT;
CREATE INDEX attempts_route ON attempts (route, id);
-- The sending limits are each route's (a mailbox's limit is its own): the budget is counted
-- per route.
ALTER TABLE send_log ADD COLUMN route TEXT NOT NULL DEFAULT 'primary';
CREATE INDEX send_log_route_at ON send_log (route, at);
