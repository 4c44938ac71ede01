//! A fresh PostgreSQL database per test on the server at 127.0.0.1:5432 (trust auth, as this
//! machine kind runs it), dropped when the test ends. `PANEL_TEST_POSTGRES` overrides the
//! server URL. Without a server the test is skipped, or fails under `PANEL_TEST_REAL=1`.

use std::process::Command;

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/test";

pub struct TestDatabase {
    /// `postgres://...` of the fresh database.
    pub url: String,
    name: String,
    server: String,
}

fn psql(server: &str, sql: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .args([server, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_string()) }
}

impl TestDatabase {
    pub fn create() -> Option<TestDatabase> {
        let server = std::env::var("PANEL_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_SERVER.into());
        let reachable = psql(&server, "SELECT 1");
        if !crate::require(&format!("PostgreSQL at {server}"), reachable.is_ok()) {
            return None;
        }
        let name = format!("panel_test_{}_{}", std::process::id(), crate::unique());
        psql(&server, &format!("CREATE DATABASE {name}")).expect("create the test database");
        let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
        Some(TestDatabase { url: format!("{base}/{name}"), name, server })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Err(e) = psql(&self.server, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}
