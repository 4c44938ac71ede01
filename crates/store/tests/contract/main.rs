//! The store's contract tests in one binary: each `contract!` test runs once on SQLite and once
//! on PostgreSQL.

#[macro_use]
mod common;

mod accounts;
mod automation;
mod queue;
mod retention;
mod secrets;
