//! Configuration layers: built-in defaults, then the TOML file, then `PANEL_*` environment
//! variables, then command-line flags (clap merges the last two).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `panel.toml`. Unknown keys are an error that names them, so a typo never goes unnoticed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub listen: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    /// The master key file [default: DATA_DIR/master.key].
    pub master_key_file: Option<PathBuf>,
    /// Threads that run a service's async work (`serve::runtime_threads`).
    pub threads: Option<usize>,
    #[serde(default)]
    pub worker: WorkerSection,
    #[serde(default)]
    pub license: LicenseSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub web: WebSection,
    #[serde(default)]
    pub retention: RetentionSection,
    #[serde(default)]
    pub bounces: BouncesSection,
}

/// `[bounces]`: a mailbox that bounces land in (the From mailbox, when no bounce domain routes
/// them to the listener), read over IMAP. Only here, on the service's machine: it names a file
/// whose content is sent to the IMAP server as the password.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BouncesSection {
    /// `imaps://USER@HOST[:PORT][/FOLDER]`, or `imap://...` for STARTTLS (required).
    pub imap_url: Option<String>,
    pub imap_password_file: Option<PathBuf>,
    /// Or a stored credential: a password, or a Microsoft or Google app (XOAUTH2 as the mailbox).
    pub imap_credential: Option<String>,
    /// Overrides the provider's token endpoint for `imap_credential` (https; http to loopback only).
    pub imap_token_endpoint: Option<String>,
    /// PEM CA certificate(s) added to the system roots for the IMAP server's certificate.
    pub imap_ca_file: Option<PathBuf>,
    /// Where what matched a message is moved [default: Panel/Bounces].
    pub processed_folder: Option<String>,
    /// How often the service reads it [default: 1m].
    pub interval: Option<String>,
}

/// `[retention]`: how long message content, messages (with runs and events) and audit entries
/// are kept; each a duration or "never".
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    pub content: Option<String>,
    pub messages: Option<String>,
    pub audit: Option<String>,
}

/// `[http]`: how many clients the web server serves at once, and how long it waits for them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub header_timeout: Option<String>,
}

/// `[web]`: the reverse proxies in front of `panel serve` whose `X-Forwarded-For` names the
/// client (addresses or networks); nobody else's header is believed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSection {
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// `[license]`: the authorities whose keys this installation accepts. Only here or in
/// `PANEL_LICENSE_AUTHORITIES`, never in the database, so adding keys cannot mint trust.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseSection {
    #[serde(default)]
    pub authorities: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    pub concurrency: Option<usize>,
    pub lease: Option<String>,
    pub poll: Option<String>,
    pub idle_connection: Option<String>,
}

impl FileConfig {
    /// The file at `path`, with its text (what a running service compares the file with later).
    pub fn load(path: &Path) -> Result<(FileConfig, String), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
        Ok((FileConfig::parse(path, &text)?, text))
    }

    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| format!("config file {}: {e}", path.display()))
    }
}

impl FileConfig {
    /// The settings that differ between `started` (what a running service loaded) and `now`
    /// and that apply only at a restart: everything but `[license]`, which a running service
    /// reloads.
    pub fn restart_needed(started: &FileConfig, now: &FileConfig) -> Vec<&'static str> {
        let FileConfig {
            data_dir,
            database_url,
            listen,
            log_level,
            log_format,
            master_key_file,
            threads,
            worker,
            license: _,
            http,
            web,
            retention,
            bounces,
        } = started;
        let mut changed = Vec::new();
        let mut compare = |name, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        compare("data_dir", *data_dir != now.data_dir);
        compare("database_url", *database_url != now.database_url);
        compare("listen", *listen != now.listen);
        compare("log_level", *log_level != now.log_level);
        compare("log_format", *log_format != now.log_format);
        compare("master_key_file", *master_key_file != now.master_key_file);
        compare("threads", *threads != now.threads);
        compare("[worker]", *worker != now.worker);
        compare("[http]", *http != now.http);
        compare("[web]", *web != now.web);
        compare("[retention]", *retention != now.retention);
        compare("[bounces]", *bounces != now.bounces);
        changed
    }
}
