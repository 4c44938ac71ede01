-- PostgreSQL's migration 22 adds the check a message sent on a kept token owner is written under.
-- SQLite keeps no token owners (a token read there is an in-process read, nothing to save), so it
-- has nothing to add; the migration keeps both databases' schema versions equal.
SELECT 1;
