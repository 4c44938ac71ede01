//! The service layer in process, one binary: a harness (`Panel` on a temporary SQLite with a
//! manual clock, the worker in the test's runtime, the in-process recording sink) and the tests
//! of the worker's and the scheduler's rules that need no real relay.

mod harness;

mod accounts;
mod events;
mod recipients;
mod retention;
mod schedules;
mod worker;
