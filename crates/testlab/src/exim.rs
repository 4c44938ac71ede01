//! A private Exim 4.96 on loopback, beside Postfix. Debian's exim4 packages conflict with
//! postfix (both are the mail-transport-agent), so `.ci/run` unpacks them with `dpkg -x` into
//! `PANEL_EXIM_ROOT` (default /opt/panel-mta/exim) instead of installing them. The daemon runs
//! from its own configuration and spool in a private mount namespace, where bind-mounted copies
//! of /etc/passwd and /etc/group add its Debian-exim user and its own /usr/sbin is in place (it
//! re-executes itself from there), so the host's files never change and nothing binds port 25.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{LAB_PASSWORD, LAB_USER, free_port, make_certificates, require};

/// The uid and gid the lab's Debian-exim user gets inside its namespace.
const EXIM_ID: u32 = 64_990;
/// Recipients Exim takes in one transaction; the next get a real `452`.
pub const EXIM_RECIPIENTS_MAX: usize = 3;
/// Exim's message size limit, announced as `SIZE 51200`.
pub const EXIM_SIZE_LIMIT: u64 = 50 * 1024;

pub struct EximLab {
    dir: tempfile::TempDir,
    daemon: Child,
    /// Relays for 127.0.0.1 without authentication (STARTTLS offered, optional).
    pub plain_port: u16,
    /// STARTTLS, then AUTH PLAIN/LOGIN required.
    pub submission_port: u16,
    /// Implicit TLS, then AUTH required.
    pub smtps_port: u16,
    pub ca_file: PathBuf,
}

fn root() -> PathBuf {
    std::env::var_os("PANEL_EXIM_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/opt/panel-mta/exim"))
}

impl EximLab {
    /// `None` (the test skips) when the unpacked Exim is not there, unless PANEL_TEST_REAL=1.
    pub fn start() -> Option<EximLab> {
        let sbin = root().join("usr/sbin");
        if !require("Exim (unpacked by .ci/run into PANEL_EXIM_ROOT)", sbin.join("exim4").exists()) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["spool", "log", "mail", "tls"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        let ca_file = make_certificates(&d.join("tls"));
        with_users(d, &[("Debian-exim", EXIM_ID)]);
        let (plain_port, submission_port, smtps_port) = (free_port(), free_port(), free_port());
        fs::write(d.join("exim.conf"), config(d, plain_port, submission_port, smtps_port)).unwrap();
        fs::set_permissions(d.join("exim.conf"), fs::Permissions::from_mode(0o644)).unwrap();
        // The daemon drops to Debian-exim for its spool, log, Maildir and TLS key.
        let chown = Command::new("chown")
            .args(["-R", &format!("{EXIM_ID}:{EXIM_ID}")])
            .args(["spool", "log", "mail", "tls"].map(|s| d.join(s)))
            .status()
            .unwrap();
        assert!(chown.success());
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        let daemon = spawn_private(
            d,
            &format!("mount --bind {} /usr/sbin", sbin.display()),
            &format!("/usr/sbin/exim4 -C {} -bdf -q1m", d.join("exim.conf").display()),
            &d.join("daemon.log"),
        );
        let lab = EximLab { dir, daemon, plain_port, submission_port, smtps_port, ca_file };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Ready when the daemon says it listens (a probe connection would be logged as a
        // dropped session, which the tests look for).
        while !lab.log().contains("daemon started") {
            assert!(Instant::now() < deadline, "Exim did not start: {}", lab.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(lab)
    }

    /// The main log and the daemon's own output.
    pub fn log(&self) -> String {
        let main = fs::read_to_string(self.dir.path().join("log/mainlog")).unwrap_or_default();
        let daemon = fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        format!("{main}{daemon}")
    }

    /// Waits until `count` delivered messages contain `needle`.
    pub fn wait_for_messages(&self, needle: &str, count: usize, timeout: Duration) -> Vec<String> {
        wait_for_maildir(&self.dir.path().join("mail/inbox"), needle, count, timeout)
    }
}

/// Waits until `count` messages in the Maildir `dir` contain `needle` (or `timeout` passes).
pub(crate) fn wait_for_maildir(dir: &Path, needle: &str, count: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let found: Vec<String> = maildir_messages(dir).into_iter().filter(|m| m.contains(needle)).collect();
        if found.len() >= count || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for EximLab {
    fn drop(&mut self) {
        // `sh` execs Exim, so the child is the daemon itself.
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// Starts `command` in a private mount namespace where `dir`'s passwd and group copies (see
/// `with_users`) stand for the host's, after the daemon's own `mounts`; its standard error goes
/// to `log`. `sh` execs the daemon, so the child is the daemon itself.
pub(crate) fn spawn_private(dir: &Path, mounts: &str, command: &str, log: &Path) -> Child {
    let script = format!(
        "mount --bind {p} /etc/passwd && mount --bind {g} /etc/group && {mounts} && exec {command}",
        p = dir.join("passwd").display(),
        g = dir.join("group").display(),
    );
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .expect("unshare runs")
}

/// Copies of /etc/passwd and /etc/group in `dir` with `users` (each with its own group) added,
/// to be bind-mounted over the originals inside a daemon's private mount namespace.
pub(crate) fn with_users(dir: &Path, users: &[(&str, u32)]) {
    let mut passwd = fs::read_to_string("/etc/passwd").unwrap();
    let mut group = fs::read_to_string("/etc/group").unwrap();
    for (name, id) in users {
        passwd.push_str(&format!("{name}:x:{id}:{id}::/nonexistent:/usr/sbin/nologin\n"));
        group.push_str(&format!("{name}:x:{id}:\n"));
    }
    fs::write(dir.join("passwd"), passwd).unwrap();
    fs::write(dir.join("group"), group).unwrap();
}

pub(crate) fn maildir_messages(dir: &Path) -> Vec<String> {
    ["new", "cur"]
        .iter()
        .filter_map(|sub| fs::read_dir(dir.join(sub)).ok())
        .flat_map(|entries| entries.flatten())
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .collect()
}

fn config(d: &Path, plain: u16, submission: u16, smtps: u16) -> String {
    // Exim's own braces everywhere: placeholders are filled in by name, not by format!.
    const TEMPLATE: &str = r#"primary_hostname = exim.test
exim_user = Debian-exim
exim_group = Debian-exim
never_users = root
spool_directory = @DIR@/spool
log_file_path = @DIR@/log/%slog
log_selector = +tls_peerdn +smtp_connection
daemon_smtp_ports = @PLAIN@ : @SUBMISSION@ : @SMTPS@
tls_on_connect_ports = @SMTPS@
local_interfaces = <; 127.0.0.1 ; ::1
tls_certificate = @DIR@/tls/server.pem
tls_privatekey = @DIR@/tls/server.key
tls_advertise_hosts = *
recipients_max = @MAX@
recipients_max_reject = false
message_size_limit = @SIZE@
acl_smtp_rcpt = acl_rcpt

begin acl
acl_rcpt:
  accept authenticated = *
  accept condition = ${if eq{$received_port}{@PLAIN@}}
         hosts = <; 127.0.0.1 ; ::1
  deny message = authentication required

begin authenticators
plain:
  driver = plaintext
  public_name = PLAIN
  server_prompts = :
  server_condition = ${if and{{eq{$auth2}{@USER@}}{eq{$auth3}{@PASSWORD@}}}}
  server_advertise_condition = ${if def:tls_in_cipher}
login:
  driver = plaintext
  public_name = LOGIN
  server_prompts = Username:: : Password::
  server_condition = ${if and{{eq{$auth1}{@USER@}}{eq{$auth2}{@PASSWORD@}}}}
  server_advertise_condition = ${if def:tls_in_cipher}

begin routers
all:
  driver = accept
  transport = maildir

begin transports
maildir:
  driver = appendfile
  directory = @DIR@/mail/inbox
  maildir_format
  envelope_to_add
  return_path_add
  user = Debian-exim
  group = Debian-exim
"#;
    TEMPLATE
        .replace("@DIR@", &d.display().to_string())
        .replace("@PLAIN@", &plain.to_string())
        .replace("@SUBMISSION@", &submission.to_string())
        .replace("@SMTPS@", &smtps.to_string())
        .replace("@MAX@", &EXIM_RECIPIENTS_MAX.to_string())
        .replace("@SIZE@", &EXIM_SIZE_LIMIT.to_string())
        .replace("@USER@", LAB_USER)
        .replace("@PASSWORD@", LAB_PASSWORD)
}
