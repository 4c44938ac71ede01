//! A private Dovecot IMAP server on loopback (Debian's `dovecot-imapd`, its own config file and
//! ports, never the system instance): one user whose Maildir the test fills, as a mailbox that
//! bounces land in. IMAPS on one port, IMAP with STARTTLS required on the other.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{free_port, make_certificates, require, run, unique};

pub const IMAP_USER: &str = "bounces@panel.test";
pub const IMAP_PASSWORD: &str = "imap-lab-password-not-secret";

pub struct DovecotLab {
    dir: tempfile::TempDir,
    pub imaps_port: u16,
    pub imap_port: u16,
    pub ca_file: PathBuf,
}

impl DovecotLab {
    pub fn start() -> Option<DovecotLab> {
        DovecotLab::start_with(None)
    }

    /// Signing in with XOAUTH2 too: each token is checked at `introspection_url` (RFC 7662,
    /// Dovecot's oauth2 passdb), and must name the lab's user.
    pub fn start_with_oauth(introspection_url: &str) -> Option<DovecotLab> {
        DovecotLab::start_with(Some(introspection_url))
    }

    fn start_with(introspection: Option<&str>) -> Option<DovecotLab> {
        if !require("Dovecot (dovecot-imapd)", Path::new("/usr/sbin/dovecot").exists()) {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("panel-dovecot-").tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["run", "state", "tls", "home"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        let ca_file = make_certificates(&root.join("tls"));
        let maildir = root.join("home").join(IMAP_USER).join("Maildir");
        for sub in ["new", "cur", "tmp"] {
            fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        run(Command::new("chown").args(["-R", "nobody:nogroup"]).arg(root.join("home")));
        fs::write(root.join("users"), format!("{IMAP_USER}:{{PLAIN}}{IMAP_PASSWORD}::::::\n")).unwrap();
        let r = root.display();
        let (mechanisms, oauth_passdb) = match introspection {
            None => ("plain login", String::new()),
            Some(url) => {
                let conf = format!(
                    "introspection_mode = post\nintrospection_url = {url}\nusername_attribute = username\n\
                     active_attribute = active\nactive_value = true\nforce_introspection = yes\n"
                );
                fs::write(root.join("oauth2.conf"), conf).unwrap();
                let passdb =
                    format!("passdb {{\n  driver = oauth2\n  mechanisms = xoauth2\n  args = {r}/oauth2.conf\n}}\n");
                ("plain login xoauth2", passdb)
            }
        };
        for _ in 0..3 {
            let (imaps_port, imap_port) = (free_port(), free_port());
            let conf = format!(
                "base_dir = {r}/run
state_dir = {r}/state
log_path = {r}/dovecot.log
instance_name = panel-dovecot-{n}
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{r}/tls/server.pem
ssl_key = <{r}/tls/server.key
disable_plaintext_auth = yes
auth_mechanisms = {mechanisms}
{oauth_passdb}passdb {{
  driver = passwd-file
  args = scheme=PLAIN {r}/users
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={r}/home/%u
}}
first_valid_uid = 1
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
",
                n = unique()
            );
            fs::write(root.join("dovecot.conf"), conf).unwrap();
            // The daemon keeps what it inherits open: no pipes, or waiting for them never ends.
            let status = Command::new("dovecot")
                .arg("-c")
                .arg(root.join("dovecot.conf"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("dovecot");
            assert!(status.success(), "dovecot did not start: {}", log(&root));
            let deadline = Instant::now() + Duration::from_secs(15);
            let up = loop {
                let both =
                    [imaps_port, imap_port].iter().all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok());
                if both || Instant::now() > deadline {
                    break both;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if up {
                return Some(DovecotLab { dir, imaps_port, imap_port, ca_file });
            }
            stop(&root);
        }
        panic!("the Dovecot lab found no free ports in three tries:\n{}", log(&root));
    }

    /// Puts a message into the user's INBOX (as the MTA delivering a bounce there would).
    pub fn deliver(&self, raw: &str) {
        let name = format!("{}.{}.panel-lab", unique(), std::process::id());
        let tmp = self.maildir().join("tmp").join(&name);
        fs::write(&tmp, raw.replace("\r\n", "\n").replace('\n', "\r\n")).unwrap();
        run(Command::new("chown").arg("nobody:nogroup").arg(&tmp));
        fs::rename(&tmp, self.maildir().join("new").join(&name)).unwrap();
    }

    /// The messages in a folder (`""`: the INBOX), as files in its Maildir.
    pub fn count(&self, folder: &str) -> usize {
        let dir = match folder {
            "" => self.maildir(),
            f => self.maildir().join(format!(".{}", f.replace('/', "."))),
        };
        ["new", "cur"].iter().map(|s| fs::read_dir(dir.join(s)).map(|d| d.count()).unwrap_or(0)).sum()
    }

    fn maildir(&self) -> PathBuf {
        self.dir.path().join("home").join(IMAP_USER).join("Maildir")
    }

    pub fn log(&self) -> String {
        log(self.dir.path())
    }
}

fn log(root: &Path) -> String {
    fs::read_to_string(root.join("dovecot.log")).unwrap_or_default()
}

fn stop(root: &Path) {
    let _ = Command::new("doveadm").arg("-c").arg(root.join("dovecot.conf")).arg("stop").output();
}

impl Drop for DovecotLab {
    fn drop(&mut self) {
        stop(self.dir.path());
    }
}
