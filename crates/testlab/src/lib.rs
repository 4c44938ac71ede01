//! A private Postfix instance for tests: never the system one, loopback only, delivering every
//! accepted message into one Maildir that tests read back. Needs root and the Debian packages
//! postfix, sasl2-bin, libsasl2-modules and openssl (`.ci/run` installs them).
//!
//! Without Postfix, `PostfixLab::start` returns `None` after printing a notice, so a laptop's
//! `cargo test` passes; with `PANEL_TEST_REAL=1` (set by `.ci/run`) a missing component fails.

mod browser;
mod dovecot;
mod exim;
mod graph;
pub mod kerberos;
mod oauth;
mod opensmtpd;
pub mod postgres;
mod proxy;
mod sink;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use browser::{Browser, Element};
pub use dovecot::{DovecotLab, IMAP_PASSWORD, IMAP_USER};
pub use exim::{EXIM_RECIPIENTS_MAX, EXIM_SIZE_LIMIT, EximLab};
pub use graph::{GraphDouble, GraphMessage};
pub use kerberos::Kdc;
pub use oauth::{EntraCertificate, ServiceAccount, TokenServer, XOAuthSmtp};
pub use opensmtpd::OpenSmtpdLab;
pub use postgres::TestDatabase;
pub use proxy::Proxy;
pub use sink::RecordingSink;

/// A number unique within this process, for names of per-test resources.
pub fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

pub const LAB_USER: &str = "panel";
pub const LAB_PASSWORD: &str = "lab-password-not-secret";
pub const LAB_HOSTNAME: &str = "lab.panel.test";
/// Recipients starting with this are refused with 550 5.1.1.
pub const REJECT_PREFIX: &str = "reject-";

pub struct PostfixLab {
    dir: tempfile::TempDir,
    /// Relays only for 127.0.0.1 (IP allow-listing); STARTTLS offered but optional; no AUTH.
    pub plain_port: u16,
    /// STARTTLS required, then AUTH PLAIN/LOGIN required.
    pub submission_port: u16,
    /// Implicit TLS, then AUTH required.
    pub smtps_port: u16,
    pub ca_file: PathBuf,
    /// SHA-256 fingerprint of the server certificate, hex.
    pub cert_sha256: String,
    deferred: Mutex<Vec<String>>,
}

/// True when a missing component must fail the test run instead of skipping.
pub fn real_required() -> bool {
    std::env::var("PANEL_TEST_REAL").is_ok_and(|v| v == "1")
}

/// Returns `None` (test should skip) when a required component is absent and skipping is allowed.
pub fn require(component: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if real_required() {
        panic!("{component} is required (PANEL_TEST_REAL=1) but not available; run .ci/run or install it");
    }
    eprintln!(
        "SKIPPED: {component} is not available on this machine; the test needing it did not run (set PANEL_TEST_REAL=1 to make this an error)"
    );
    false
}

/// A loopback port nothing listens on now, and that no other caller in this process has been
/// given: the kernel hands a port it just freed to the next `bind(0)` readily, so two labs
/// started at once could otherwise both be told the same port, and the loser's client would
/// talk to the winner's daemon.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<std::collections::HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(Default::default);
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if given.insert(port) {
            return port;
        }
    }
}

pub(crate) fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn id_of(flag: &str, name: &str) -> String {
    let out = Command::new("id").args([flag, name]).output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl PostfixLab {
    pub fn start() -> Option<PostfixLab> {
        PostfixLab::start_with(None, None)
    }

    /// A lab that relays every accepted message to `127.0.0.1:port` instead of its Maildir:
    /// the durable peer of the benchmarks (accept, queue with fsync, deliver).
    pub fn start_relaying_to(port: u16) -> Option<PostfixLab> {
        PostfixLab::start_with(Some(port), None)
    }

    /// A lab like an Exchange relay: AUTH also offers GSSAPI (Kerberos, accepting with the
    /// keytab of `smtp/localhost` in `kdc`'s realm) and NTLM (against the lab user's password).
    pub fn start_exchange_like(kdc: &Kdc) -> Option<PostfixLab> {
        let gssapi = Path::new("/usr/lib/x86_64-linux-gnu/sasl2/libgssapiv2.so.2").exists();
        if !require("Cyrus SASL's GSSAPI plugin (libsasl2-modules-gssapi-mit)", gssapi) {
            return None;
        }
        PostfixLab::start_with(None, Some(kdc))
    }

    fn start_with(relay_to: Option<u16>, kdc: Option<&Kdc>) -> Option<PostfixLab> {
        let installed = Path::new("/usr/sbin/postfix").exists() && Path::new("/usr/sbin/saslpasswd2").exists();
        if !require("Postfix (postfix, sasl2-bin)", installed) {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("panel-postfix-").tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["conf", "queue", "data", "log", "mail", "sasl", "tls"] {
            fs::create_dir_all(root.join(sub)).unwrap();
            fs::set_permissions(root.join(sub), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let (uid, gid) = (id_of("-u", "postfix"), id_of("-g", "postfix"));
        run(Command::new("chown").args(["-R", "postfix:postfix"]).arg(root.join("mail")).arg(root.join("data")));

        let ca_file = make_certificates(&root.join("tls"));
        let cert_sha256 = fingerprint(&root.join("tls/server.pem"));

        // SASL users in a private sasldb; the realm must be Postfix's myhostname.
        let sasldb = root.join("sasl/sasldb2");
        // Debian's smtpd looks for CONFIG_DIR/sasl/smtpd.conf whatever cyrus_sasl_config_path says.
        fs::create_dir_all(root.join("conf/sasl")).unwrap();
        let (mechanisms, keytab) = match kdc {
            None => ("PLAIN LOGIN", String::new()),
            Some(k) => {
                let keytab = k.keytab("smtp/localhost");
                run(Command::new("chown").arg("postfix:postfix").arg(&keytab));
                ("PLAIN LOGIN NTLM GSSAPI", format!("keytab: {}\n", keytab.display()))
            }
        };
        fs::write(
            root.join("conf/sasl/smtpd.conf"),
            format!(
                "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {}\nmech_list: {mechanisms}\n{keytab}",
                sasldb.display()
            ),
        )
        .unwrap();
        let kerberos_env = match kdc {
            None => String::new(),
            Some(k) => format!(
                "import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C KRB5_CONFIG={} KRB5_KTNAME={}\n",
                k.krb5_conf.display(),
                keytab.trim_start_matches("keytab: ").trim()
            ),
        };
        set_sasl_password(&sasldb, LAB_PASSWORD);

        fs::write(root.join("conf/rcpt_access"), rcpt_access(&[])).unwrap();
        fs::write(root.join("conf/vmailbox"), "/^/ sink/\n").unwrap();

        let r = root.display();
        // Unique to this instance (its directory's name), so a greeting proves whose port it is.
        let banner = format!("panel-lab-{}", root.file_name().unwrap().to_string_lossy());
        let transport = match relay_to {
            None => "default_transport = virtual\nrelay_transport = virtual".to_string(),
            Some(p) => format!(
                "default_transport = smtp\nrelay_transport = smtp\nrelayhost = [127.0.0.1]:{p}\nsmtp_tls_security_level = none"
            ),
        };
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {r}/queue
data_directory = {r}/data
maillog_file = {r}/log/postfix.log
maillog_file_prefixes = {r}
myhostname = {LAB_HOSTNAME}
smtpd_banner = $myhostname ESMTP {banner}
mydomain = panel.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
alias_maps =
alias_database =
virtual_mailbox_domains =
{transport}
virtual_mailbox_maps = regexp:{r}/conf/vmailbox
virtual_mailbox_base = {r}/mail
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access regexp:{r}/conf/rcpt_access
smtpd_delay_reject = no
smtpd_peername_lookup = no
local_header_rewrite_clients =
always_add_missing_headers = no
message_drop_headers =
smtputf8_enable = yes
biff = no
smtpd_tls_cert_file = {r}/tls/server.pem
smtpd_tls_key_file = {r}/tls/server.key
smtpd_tls_security_level = may
smtpd_sasl_type = cyrus
cyrus_sasl_config_path = {r}/conf/sasl
smtpd_sasl_path = smtpd
smtpd_sasl_auth_enable = no
smtpd_tls_auth_only = yes
smtpd_sasl_authenticated_header = yes
smtpd_client_connection_rate_limit = 0
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
{kerberos_env}"
        );
        fs::write(root.join("conf/main.cf"), main_cf).unwrap();
        let auth = "-o smtpd_sasl_auth_enable=yes -o smtpd_relay_restrictions=permit_sasl_authenticated,reject";
        // With Kerberos the STARTTLS port is smtp/localhost (Cyrus accepts as smtp/MYHOSTNAME);
        // password users stay in the lab's realm.
        let auth = match kdc {
            None => auth.to_string(),
            Some(_) => format!("{auth} -o myhostname=localhost -o smtpd_sasl_local_domain={LAB_HOSTNAME}"),
        };
        // The ports are free when chosen but not reserved: should another process take one before
        // Postfix binds it, the lab starts again on other ports instead of a test talking to a
        // stranger.
        let conf = root.join("conf");
        for _ in 0..3 {
            let (plain_port, submission_port, smtps_port) = (free_port(), free_port(), free_port());
            fs::write(conf.join("master.cf"), master_cf(plain_port, submission_port, smtps_port, &auth)).unwrap();
            if owns_its_ports(&conf, &root, [plain_port, submission_port, smtps_port], &banner) {
                let deferred = Mutex::new(Vec::new());
                return Some(PostfixLab {
                    dir,
                    plain_port,
                    submission_port,
                    smtps_port,
                    ca_file,
                    cert_sha256,
                    deferred,
                });
            }
            let _ = Command::new("postfix").arg("-c").arg(&conf).arg("stop").output();
        }
        panic!("the Postfix lab found no free ports in three tries");
    }
}

fn master_cf(plain_port: u16, submission_port: u16, smtps_port: u16, auth: &str) -> String {
    format!(
        "127.0.0.1:{plain_port} inet n - n - - smtpd
127.0.0.1:{submission_port} inet n - n - - smtpd -o smtpd_tls_security_level=encrypt -o smtpd_tls_auth_only=yes {auth}
127.0.0.1:{smtps_port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes {auth}
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
virtual unix - n n - - virtual
smtp unix - - n - - smtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"
    )
}

fn wait_for_port(port: u16, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "postfix did not open port {port}; log:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first line a server on `port` sends, or "" when it sends none within 10 s.
fn greeting(port: u16) -> String {
    use std::io::BufRead;
    let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let _ = std::io::BufReader::new(stream).read_line(&mut line);
    line
}

/// Sets the lab user's password in `sasldb` (creating it), readable by Postfix's smtpd.
fn set_sasl_password(sasldb: &Path, password: &str) {
    let mut child = Command::new("saslpasswd2")
        .args(["-p", "-c", "-f"])
        .arg(sasldb)
        .args(["-u", LAB_HOSTNAME, LAB_USER])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("saslpasswd2");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "saslpasswd2 failed");
    run(Command::new("chown").arg("postfix:postfix").arg(sasldb));
}

/// Starts the Postfix of `conf` and tells whether every port is this instance's: the start
/// succeeded, the master is running and the plain port greets with this lab's own banner.
fn owns_its_ports(conf: &Path, root: &Path, ports: [u16; 3], banner: &str) -> bool {
    let postfix = |arg: &str| Command::new("postfix").arg("-c").arg(conf).arg(arg).output().expect("postfix");
    let start = postfix("start");
    if !start.status.success() {
        eprintln!("postfix start failed, trying other ports: {}", String::from_utf8_lossy(&start.stderr));
        return false;
    }
    let log = || fs::read_to_string(root.join("log/postfix.log")).unwrap_or_default();
    for port in ports {
        wait_for_port(port, &log);
    }
    postfix("status").status.success() && greeting(ports[0]).contains(banner)
}

impl PostfixLab {
    fn postfix(&self, args: &[&str]) {
        let mut cmd = Command::new("postfix");
        cmd.arg("-c").arg(self.dir.path().join("conf")).args(args);
        let out = cmd.output().expect("postfix");
        assert!(
            out.status.success(),
            "postfix {args:?} failed: {}{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Sends mail for `domain` to 127.0.0.1:`port` (as a relay routes a bounce domain to the
    /// service that takes its bounces), whatever else the lab does with mail.
    /// With `encrypt`, only over TLS (STARTTLS, Postfix's `encrypt` policy), logged.
    pub fn route_domain(&self, domain: &str, port: u16, encrypt: bool) {
        let table = self.config_dir().join("transport");
        fs::write(&table, format!("{domain} smtp:[127.0.0.1]:{port}\n")).unwrap();
        let mut settings = vec![format!("transport_maps = texthash:{}", table.display())];
        if encrypt {
            let policy = self.config_dir().join("tls_policy");
            fs::write(&policy, format!("[127.0.0.1]:{port} encrypt\n")).unwrap();
            settings.push(format!("smtp_tls_policy_maps = texthash:{}", policy.display()));
            settings.push("smtp_tls_loglevel = 1".into());
        }
        let out = Command::new("postconf")
            .arg("-c")
            .arg(self.config_dir())
            .arg("-e")
            .args(&settings)
            .output()
            .expect("postconf");
        assert!(out.status.success(), "postconf failed: {}", String::from_utf8_lossy(&out.stderr));
        self.postfix(&["reload"]);
    }

    /// Takes every recipient, also the `reject-` ones (a relay that passes mail on, leaving the
    /// refusal to the server behind it).
    pub fn accept_every_recipient(&self) {
        fs::write(self.dir.path().join("conf/rcpt_access"), "").unwrap();
        self.postfix(&["reload"]);
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Stops the relay, as an outage would: its ports refuse connections until `resume`.
    pub fn stop(&self) {
        self.postfix(&["stop"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.plain_port)).is_ok() {
            assert!(Instant::now() < deadline, "postfix still accepts connections after stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the relay again after `stop`, and waits until every port accepts connections.
    pub fn resume(&self) {
        self.postfix(&["start"]);
        let log = || self.log();
        for port in [self.plain_port, self.submission_port, self.smtps_port] {
            wait_for_port(port, &log);
        }
    }

    /// Changes the lab user's password on the relay's side (as a relay admin resetting or
    /// unlocking the account would); smtpd reads the database at each AUTH.
    pub fn set_password(&self, password: &str) {
        set_sasl_password(&self.dir.path().join("sasl/sasldb2"), password);
    }

    /// The instance's configuration directory (for `postqueue -c DIR -p`).
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log/postfix.log")).unwrap_or_default()
    }

    pub fn maildir(&self) -> PathBuf {
        self.dir.path().join("mail/sink")
    }

    /// Every delivered message (one file per recipient), as text.
    pub fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(entries) = fs::read_dir(self.maildir().join(sub)) {
                for e in entries.flatten() {
                    if let Ok(text) = fs::read_to_string(e.path()) {
                        out.push(text);
                    }
                }
            }
        }
        out
    }

    /// Messages whose text contains `needle` (e.g. a unique subject or address).
    pub fn messages_with(&self, needle: &str) -> Vec<String> {
        self.messages().into_iter().filter(|m| m.contains(needle)).collect()
    }

    /// Waits until `count` messages contain `needle`; the 250 comes before the Maildir write.
    pub fn wait_for_messages(&self, needle: &str, count: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.messages_with(needle);
            if found.len() >= count || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes the relay answer `451 4.3.0` to RCPT for `address` until `undefer`.
    pub fn defer(&self, address: &str) {
        let mut list = self.deferred.lock().unwrap();
        list.push(address.to_string());
        self.write_access(&list);
    }

    pub fn undefer(&self, address: &str) {
        let mut list = self.deferred.lock().unwrap();
        list.retain(|a| a != address);
        self.write_access(&list);
    }

    fn write_access(&self, deferred: &[String]) {
        fs::write(self.dir.path().join("conf/rcpt_access"), rcpt_access(deferred)).unwrap();
        // New smtpd processes read the new table; a running session keeps the old one.
        self.postfix(&["reload"]);
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn rcpt_access(deferred: &[String]) -> String {
    let mut s = format!("/^{REJECT_PREFIX}/ 550 5.1.1 Mailbox unavailable\n");
    for a in deferred {
        let escaped: String =
            a.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_string() } else { format!("\\{c}") }).collect();
        s.push_str(&format!("/^{escaped}$/ 451 4.3.0 Temporary lookup failure, try again later\n"));
    }
    s
}

impl Drop for PostfixLab {
    fn drop(&mut self) {
        let _ = Command::new("postfix").arg("-c").arg(self.dir.path().join("conf")).arg("stop").output();
    }
}

/// A test CA and a server certificate for localhost, 127.0.0.1 and ::1 (`dir/server.pem`,
/// `dir/server.key`). Returns the CA file.
pub fn make_certificates(dir: &Path) -> PathBuf {
    let d = |f: &str| dir.join(f);
    let openssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Panel Test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    fs::write(
        d("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    fs::set_permissions(d("server.key"), fs::Permissions::from_mode(0o600)).unwrap();
    d("ca.pem")
}

fn fingerprint(cert: &Path) -> String {
    let out =
        Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(cert).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().rsplit('=').next().unwrap().replace(':', "").to_ascii_lowercase()
}
