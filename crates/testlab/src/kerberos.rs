//! A private MIT Kerberos KDC for a test realm, on a free loopback port: its database, stash and
//! configuration live in a temporary directory, and principals get keytabs on request.
//! Needs Debian's krb5-kdc and krb5-admin-server (kdb5_util, kadmin.local, krb5kdc).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REALM: &str = "PANEL.TEST";

pub struct Kdc {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The krb5.conf clients (Panel, Postfix) must use: `KRB5_CONFIG=...`.
    pub krb5_conf: PathBuf,
    child: Child,
}

impl Kdc {
    /// `None` (test skipped) when the KDC packages are missing, unless PANEL_TEST_REAL=1.
    pub fn start() -> Option<Kdc> {
        let installed = ["/usr/sbin/krb5kdc", "/usr/sbin/kdb5_util", "/usr/sbin/kadmin.local"]
            .iter()
            .all(|p| Path::new(p).exists());
        if !crate::require("MIT Kerberos KDC (krb5-kdc, krb5-admin-server)", installed) {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("panel-kdc-").tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path().display().to_string();
        let port = crate::free_port();
        let krb5_conf = dir.path().join("krb5.conf");
        fs::write(
            &krb5_conf,
            format!(
                "[libdefaults]
    default_realm = {REALM}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    rdns = false
    dns_canonicalize_hostname = false
    udp_preference_limit = 1
    default_ccache_name = FILE:{d}/default.ccache
[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{port}
    }}
[domain_realm]
    localhost = {REALM}
"
            ),
        )
        .unwrap();
        fs::write(
            dir.path().join("kdc.conf"),
            format!(
                "[kdcdefaults]
    kdc_ports = {port}
    kdc_tcp_ports = {port}
[realms]
    {REALM} = {{
        database_name = {d}/principal
        key_stash_file = {d}/stash
        acl_file = {d}/kadm5.acl
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }}
[logging]
    kdc = FILE:{d}/kdc.log
"
            ),
        )
        .unwrap();
        fs::write(dir.path().join("kadm5.acl"), "").unwrap();
        let kdc = |cmd: &str| {
            let mut c = Command::new(cmd);
            c.env("KRB5_CONFIG", dir.path().join("krb5.conf")).env("KRB5_KDC_PROFILE", dir.path().join("kdc.conf"));
            c
        };
        crate::run(kdc("kdb5_util").args(["-r", REALM, "create", "-s", "-P", "kdc-master-password"]));
        let child =
            kdc("krb5kdc").args(["-n", "-r", REALM]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let k = Kdc { dir, port, krb5_conf, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the KDC did not open port {port}: {}", k.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(k)
    }

    fn kadmin(&self, query: &str) {
        crate::run(
            Command::new("kadmin.local")
                .env("KRB5_CONFIG", &self.krb5_conf)
                .env("KRB5_KDC_PROFILE", self.dir.path().join("kdc.conf"))
                .args(["-r", REALM, "-q", query]),
        );
    }

    /// Adds `principal` with a random key and writes its keytab to a new file in the KDC's
    /// directory (readable by everyone: it is a test realm).
    pub fn keytab(&self, principal: &str) -> PathBuf {
        self.kadmin(&format!("addprinc -randkey {principal}"));
        let path = self.dir.path().join(format!("{}.keytab", principal.replace(['/', '@'], "_")));
        self.kadmin(&format!("ktadd -k {} {principal}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    /// A path in the KDC's directory (for credential caches).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("kdc.log")).unwrap_or_default()
    }
}

impl Drop for Kdc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
