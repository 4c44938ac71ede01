-- Moves on with every change to a template, workflow or schedule (saved, deleted, enabled or
-- disabled), in the transaction that makes it: a service keeps the enabled workflows and their
-- templates in memory and reads them again only when this has moved.
INSERT INTO generations (name, value) VALUES ('definitions', 0);
