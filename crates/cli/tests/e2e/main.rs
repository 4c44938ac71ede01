//! The end-to-end tests in one binary (one link instead of nine): the `panel` binary against
//! real Postfix, PostgreSQL, an MIT KDC and headless Chromium, one module per area. Each test
//! starts the components it needs; `common` has the shared helpers.

mod common;

mod automation;
mod bounces;
mod cli;
mod credentials;
mod faults;
mod graph;
mod held;
mod integrated_auth;
mod interop;
mod limits;
mod oauth;
mod openapi;
mod policy;
mod postgres;
mod relay_lab;
mod routes;
mod web_ui;
