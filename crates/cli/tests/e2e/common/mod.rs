//! Running the `panel` binary as a user would: a data directory per test, CLI calls, and a
//! worker or service process that is killed when the test ends.

#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use panel_testlab::{LAB_PASSWORD, LAB_USER, PostfixLab, Proxy, TestDatabase};

/// The password of the accounts the tests create.
pub const ADMIN_PASSWORD: &str = "test-admin-password-1";

/// API tokens of the services started by `Env::start`, by port.
static API_TOKENS: std::sync::Mutex<std::collections::BTreeMap<u16, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

pub struct Env {
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
    /// Set for an environment on PostgreSQL: every command gets it as PANEL_DATABASE_URL.
    pub database: Option<TestDatabase>,
    /// Extra environment for every command (e.g. KRB5_CONFIG, KRB5CCNAME).
    pub vars: Vec<(String, String)>,
    /// A data directory on its own small tmpfs (`on_tmpfs`), unmounted when the test ends.
    tmpfs: Option<PathBuf>,
    /// When set, every command runs with at most this many open files (soft and hard), as
    /// under systemd's default limit.
    pub nofile: Option<u64>,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

impl Env {
    /// A fresh data directory with a fast worker configuration (short lease, poll and idle time).
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("panel.toml"),
            "[worker]\nlease = \"3s\"\npoll = \"200ms\"\nidle_connection = \"1s\"\n",
        )
        .unwrap();
        Env { dir, children: Vec::new(), database: None, vars: Vec::new(), tmpfs: None, nofile: None }
    }

    /// Like `new`, on a fresh PostgreSQL database; `None` when no server runs (test skipped).
    pub fn postgres() -> Option<Env> {
        let database = TestDatabase::create()?;
        let mut env = Env::new();
        env.database = Some(database);
        Some(env)
    }

    /// Like `new`, with the data directory on a tmpfs of `kib` KiB of its own, so a test can fill
    /// the disk under the database. Mounting needs root (CAP_SYS_ADMIN), as CI has; elsewhere the
    /// test is skipped, or fails under PANEL_TEST_REAL=1.
    pub fn on_tmpfs(kib: u64) -> Option<Env> {
        let mut env = Env::new();
        let data = env.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k,mode=0700"), "tmpfs"])
            .arg(&data)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !mounted {
            assert!(std::env::var_os("PANEL_TEST_REAL").is_none(), "PANEL_TEST_REAL=1 but tmpfs cannot be mounted");
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        env.tmpfs = Some(data);
        Some(env)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The data directory (PANEL_DATA_DIR): `path()`, or the tmpfs below it.
    pub fn data_dir(&self) -> &Path {
        self.tmpfs.as_deref().unwrap_or(self.dir.path())
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = match self.nofile {
            None => Command::new(env!("CARGO_BIN_EXE_panel")),
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(env!("CARGO_BIN_EXE_panel"));
                c
            }
        };
        c.args(args)
            .env("PANEL_DATA_DIR", self.data_dir())
            .env("PANEL_CONFIG", self.path().join("panel.toml"))
            .env_remove("PANEL_DATABASE_URL");
        if let Some(db) = &self.database {
            c.env("PANEL_DATABASE_URL", &db.url);
        }
        c.envs(self.vars.iter().map(|(k, v)| (k, v)));
        c
    }

    pub fn panel(&self, args: &[&str]) -> Run {
        let Output { status, stdout, stderr } = self.command(args).output().expect("panel runs");
        Run {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into(),
            stderr: String::from_utf8_lossy(&stderr).into(),
        }
    }

    /// Runs with `input` on standard input.
    pub fn panel_stdin(&self, args: &[&str], input: &str) -> Run {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("panel runs");
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let Output { status, stdout, stderr } = child.wait_with_output().unwrap();
        Run {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into(),
            stderr: String::from_utf8_lossy(&stderr).into(),
        }
    }

    /// Creates a license authority in `DIR/authority` and trusts it in panel.toml.
    pub fn trust_authority(&self) -> PathBuf {
        let dir = self.path().join("authority");
        self.ok(&["license", "keygen", "--out-dir", dir.to_str().unwrap()]);
        let public = std::fs::read_to_string(dir.join("authority.pub")).unwrap();
        let config = self.path().join("panel.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!("\n[license]\nauthorities = [\"{}\"]\n", public.trim()));
        std::fs::write(config, text).unwrap();
        dir.join("authority.key")
    }

    /// Issues a key with the authority made by `trust_authority`.
    pub fn issue(&self, extra: &[&str]) -> String {
        let key = self.path().join("authority/authority.key");
        let mut args = vec!["license", "issue", "--authority-key", key.to_str().unwrap(), "--to", "Contoso"];
        args.extend(extra);
        self.ok(&args).stdout.trim().to_string()
    }

    /// Trusts an authority and adds a key granting credential-storage; returns the key's id.
    pub fn license(&self) -> String {
        self.trust_authority();
        let key = self.issue(&["--feature", "credential-storage"]);
        self.ok(&["license", "add", &key]);
        self.ok(&["license", "list", "--json"]).json()[0]["id"].as_str().unwrap().to_string()
    }

    /// Stores the lab's relay account as credential `name`.
    pub fn store_lab_credential(&self, name: &str) {
        let r =
            self.panel_stdin(&["credential", "set", name, "--username", LAB_USER, "--password-stdin"], LAB_PASSWORD);
        assert_eq!(r.code, 0, "credential set failed: {}{}", r.stdout, r.stderr);
    }

    /// Runs and asserts exit 0.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.panel(args);
        assert_eq!(r.code, 0, "panel {args:?} failed:\n{}\n{}", r.stdout, r.stderr);
        r
    }

    /// Starts `panel worker` (or any long-running command) in the background.
    pub fn spawn(&mut self, args: &[&str]) -> u32 {
        let pid = self.start(args);
        self.wait_for_services(self.children.len());
        pid
    }

    /// Starts a long-running command and returns at once; see `wait_for_pid`. For `serve
    /// --listen 127.0.0.1:PORT`, an admin API token is made first, and `http(PORT, ...)` sends it.
    pub fn start(&mut self, args: &[&str]) -> u32 {
        if args.first() == Some(&"serve")
            && let Some(port) = args.iter().find_map(|a| a.strip_prefix("127.0.0.1:")).and_then(|p| p.parse().ok())
        {
            let token = self.api_token("tester", "admin");
            API_TOKENS.lock().unwrap().insert(port, token);
        }
        let log = std::fs::File::create(self.path().join(format!("service-{}.log", self.children.len()))).unwrap();
        let child = self.command(args).stdout(Stdio::null()).stderr(log).spawn().expect("spawn panel");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Starts `panel serve` on `port` as a new installation's first start, with no API token
    /// made for it (that would make an admin); returns the file its standard output goes to.
    pub fn start_first_serve(&mut self, port: u16) -> std::path::PathBuf {
        let out = self.path().join(format!("serve-{}.out", self.children.len()));
        let log = std::fs::File::create(self.path().join(format!("service-{}.log", self.children.len()))).unwrap();
        let child = self
            .command(&["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn panel");
        self.children.push(child);
        out
    }

    /// Starts `panel serve` on a free loopback port and waits until it runs; returns the port
    /// (`http(port, ...)` sends the admin token `start` made for it).
    ///
    /// A free port can be taken by another test between the check and the bind: when the
    /// service says "Address already in use", it is started again on another port.
    pub fn serve(&mut self) -> u16 {
        self.serve_with(&[])
    }

    /// `panel serve` with `extra` arguments (e.g. `--bounce-listen`); returns its HTTP port.
    pub fn serve_with(&mut self, extra: &[&str]) -> u16 {
        for _ in 0..5 {
            let port = panel_testlab::free_port();
            let listen = format!("127.0.0.1:{port}");
            let mut args = vec!["serve", "--listen", &listen];
            args.extend_from_slice(extra);
            let pid = self.start(&args);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let child = self.children.iter_mut().find(|c| c.id() == pid).expect("our child");
                if child.try_wait().unwrap().is_some() {
                    let logs = self.service_logs();
                    assert!(logs.contains("Address already in use"), "panel serve ended: {logs}");
                    self.children.retain(|c| c.id() != pid);
                    break;
                }
                let services = self.ok(&["services", "list", "--json"]).json();
                if services.as_array().unwrap().iter().any(|s| s["pid"] == pid) {
                    return port;
                }
                assert!(Instant::now() < deadline, "panel serve did not register: {}", self.service_logs());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("no free port for panel serve in five tries");
    }

    /// An API token of account `name` with `role` (created with a fixed password if new).
    pub fn api_token(&self, name: &str, role: &str) -> String {
        if !self.ok(&["admin", "list", "--json"]).stdout.contains(&format!("\"name\": \"{name}\"")) {
            let r = self.panel_stdin(&["admin", "create", name, "--role", role, "--password-stdin"], ADMIN_PASSWORD);
            assert_eq!(r.code, 0, "{}", r.stderr);
        }
        self.ok(&["admin", "token", name]).stdout.trim().to_string()
    }

    /// Waits until the service with process id `pid` heartbeats; returns its service id.
    pub fn wait_for_pid(&self, pid: u32) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let services = self.ok(&["services", "list", "--json"]).json();
            if let Some(s) = services.as_array().unwrap().iter().find(|s| s["pid"] == pid) {
                return s["id"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "service {pid} did not register: {}", self.service_logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal (STOP, CONT, KILL, ...) to one of our processes.
    pub fn signal(&self, pid: u32, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn wait_for_services(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = self.ok(&["services", "list", "--json"]);
            if r.json().as_array().unwrap().len() >= n {
                return;
            }
            assert!(Instant::now() < deadline, "service did not register: {}", self.service_logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill_9(&mut self, pid: u32) {
        let child = self.children.iter_mut().find(|c| c.id() == pid).expect("our child");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    pub fn service_logs(&self) -> String {
        let mut s = String::new();
        for i in 0..self.children.len() {
            s.push_str(&std::fs::read_to_string(self.path().join(format!("service-{i}.log"))).unwrap_or_default());
        }
        s
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    /// Relay settings for one of the lab's ports.
    pub fn configure(&self, lab: &PostfixLab, port: u16, security: &str, extra: &[&str]) {
        let mut args = vec!["--command-timeout", "5", "--connect-timeout", "3"];
        let ca = lab.ca_file.display().to_string();
        if security != "none" && !extra.contains(&"--pin-sha256") && !extra.contains(&"--no-ca") {
            args.extend(["--ca-file", &ca, "--tls-server-name", "localhost"]);
        }
        args.extend(extra.iter().filter(|a| **a != "--no-ca"));
        self.smtp_set(port, security, &args);
    }

    /// Relay settings for a plain SMTP server on loopback (a sink or a test double).
    pub fn relay_on(&self, port: u16, extra: &[&str]) {
        self.smtp_set(port, "none", extra);
    }

    /// `panel smtp set` for a relay on 127.0.0.1 with the tests' From and Fallback recipient.
    fn smtp_set(&self, port: u16, security: &str, extra: &[&str]) {
        self.smtp_set_on("127.0.0.1", port, security, extra);
    }

    /// `panel smtp set` for a relay at `host` with the tests' From and Fallback recipient.
    pub fn smtp_set_on(&self, host: &str, port: u16, security: &str, extra: &[&str]) {
        let port = port.to_string();
        let mut args = vec![
            "smtp",
            "set",
            "--host",
            host,
            "--port",
            &port,
            "--security",
            security,
            "--from",
            "Identity Panel <panel@example.org>",
            "--fallback-recipient",
            "ops@example.org",
        ];
        args.extend(extra);
        self.ok(&args);
    }

    pub fn password_args(&self, password: &str) -> Vec<String> {
        let file = self.write("relay-password", password);
        vec![
            "--auth".into(),
            "password".into(),
            "--username".into(),
            LAB_USER.into(),
            "--password-file".into(),
            file.display().to_string(),
        ]
    }

    pub fn message(&self, id: i64) -> serde_json::Value {
        self.ok(&["messages", "show", &id.to_string(), "--json"]).json()
    }

    /// Polls message `id` until `pred` holds.
    pub fn wait_message(
        &self,
        id: i64,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.message(id);
            if pred(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "message {id} did not reach the expected state: {m:#}\n{}",
                self.service_logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(data) = &self.tmpfs {
            let _ = Command::new("umount").arg(data).status();
        }
    }
}

pub fn id_of(run: &Run) -> i64 {
    run.json()["id"].as_i64().unwrap_or_else(|| panic!("no id in {}", run.stdout))
}

/// One HTTP/1.1 request to the service on loopback, with the admin API token `Env::start`
/// made for that port; returns the status and the body.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let token = API_TOKENS.lock().unwrap().get(&port).cloned();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let (status, _, body) = http_with(port, method, path, &auth, body);
    (status, body)
}

/// The Authorization header line (with its CRLF) of the admin token `Env::start` made for `port`.
pub fn bearer(port: u16) -> String {
    let token = API_TOKENS.lock().unwrap().get(&port).cloned().expect("a token for this port");
    format!("Authorization: Bearer {token}\r\n")
}

/// A request with extra header lines (each ending in CRLF); returns status, headers and body.
pub fn http_with(port: u16, method: &str, path: &str, headers: &str, body: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Write::write_fmt(&mut s, format_args!( "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_string(), body.to_string())
}
