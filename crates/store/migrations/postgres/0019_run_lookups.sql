-- A run's messages are found by the message ids its steps hold, and an event's runs by their
-- start (an event's runs start at the instant it is received, in its transaction) through
-- runs_started: these two indexes only cost every event they were written for (two of the ten
-- index entries an event through a workflow wrote).
DROP INDEX messages_run;
DROP INDEX runs_by_event;
