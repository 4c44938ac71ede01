//! A private OpenSMTPD 6.8 on loopback (IPv4 and IPv6), unpacked like Exim (`exim.rs`) into
//! `PANEL_OPENSMTPD_ROOT` (default /opt/panel-mta/opensmtpd), since the package conflicts with
//! postfix. Its paths are compiled in (/var/spool/smtpd, /run/smtpd.sock,
//! /var/lib/opensmtpd/empty, /usr/libexec/opensmtpd), so its private mount namespace puts fresh
//! tmpfs mounts on /var/spool, /run and /var/lib and its own /usr/libexec in place, besides the
//! passwd/group copies with its users. Plain only: Debian 12's build fails TLS with OpenSSL 3.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::exim::{spawn_private, wait_for_maildir, with_users};
use crate::{free_port, require};

pub struct OpenSmtpdLab {
    dir: tempfile::TempDir,
    daemon: Child,
    /// Relays for loopback on 127.0.0.1 and ::1, no TLS, no AUTH.
    pub port: u16,
}

fn root() -> PathBuf {
    std::env::var_os("PANEL_OPENSMTPD_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/panel-mta/opensmtpd"))
}

impl OpenSmtpdLab {
    /// `None` (the test skips) when the unpacked OpenSMTPD is not there, unless PANEL_TEST_REAL=1.
    pub fn start() -> Option<OpenSmtpdLab> {
        let root = root();
        if !require("OpenSMTPD (unpacked by .ci/run into PANEL_OPENSMTPD_ROOT)", root.join("usr/sbin/smtpd").exists()) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("mail")).unwrap();
        with_users(d, &[("opensmtpd", 64_991), ("opensmtpq", 64_992)]);
        let chown = Command::new("chown").arg("64991:64991").arg(d.join("mail")).status().unwrap();
        assert!(chown.success());
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        let port = free_port();
        let inbox = d.join("mail/inbox");
        fs::write(
            d.join("smtpd.conf"),
            format!(
                "table virt {{ \"@\" = opensmtpd }}\nlisten on 127.0.0.1 port {port}\nlisten on ::1 port {port}\n\
                 action \"inbox\" maildir \"{}\" virtual <virt>\nmatch from local for any action \"inbox\"\n",
                inbox.display()
            ),
        )
        .unwrap();
        fs::set_permissions(d.join("smtpd.conf"), fs::Permissions::from_mode(0o644)).unwrap();
        let daemon = spawn_private(
            d,
            &format!(
                "mount -t tmpfs tmpfs /var/spool && mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /var/lib \
                 && mkdir -p /var/lib/opensmtpd/empty && mount --bind {} /usr/libexec",
                root.join("usr/libexec").display()
            ),
            &format!("{} -d -f {}", root.join("usr/sbin/smtpd").display(), d.join("smtpd.conf").display()),
            &d.join("smtpd.log"),
        );
        let lab = OpenSmtpdLab { dir, daemon, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !lab.log().contains("starting") {
            assert!(Instant::now() < deadline, "OpenSMTPD did not start: {}", lab.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        // It logs "starting" before it listens: wait for the port without opening a session.
        let listening = || fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.contains(&format!(":{port:04X} ")));
        while !listening() {
            assert!(Instant::now() < deadline, "OpenSMTPD does not listen: {}", lab.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(lab)
    }

    /// OpenSMTPD's own log (`-d`: to standard error).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("smtpd.log")).unwrap_or_default()
    }

    /// Waits until `count` delivered messages contain `needle`.
    pub fn wait_for_messages(&self, needle: &str, count: usize, timeout: Duration) -> Vec<String> {
        wait_for_maildir(&self.dir.path().join("mail/inbox"), needle, count, timeout)
    }
}

impl Drop for OpenSmtpdLab {
    fn drop(&mut self) {
        // smtpd forks its processes; they share the namespace and die with their parent.
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}
