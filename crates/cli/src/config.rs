//! Configuration layers: built-in defaults, then the TOML file, then `PANEL_*` environment
//! variables, then command-line flags (clap merges the last two).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `panel.toml`. Unknown keys are an error that names them, so a typo never goes unnoticed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub listen: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    /// The master key file [default: DATA_DIR/master.key].
    pub master_key_file: Option<PathBuf>,
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
}

/// `[retention]`: how long message content, messages (with runs and events) and audit entries
/// are kept; each a duration or "never".
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    pub content: Option<String>,
    pub messages: Option<String>,
    pub audit: Option<String>,
}

/// `[http]`: how many clients the web server serves at once, and how long it waits for them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub header_timeout: Option<String>,
}

/// `[web]`: the reverse proxies in front of `panel serve` whose `X-Forwarded-For` names the
/// client (addresses or networks); nobody else's header is believed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSection {
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// `[license]`: the authorities whose keys this installation accepts. Only here or in
/// `PANEL_LICENSE_AUTHORITIES`, never in the database, so adding keys cannot mint trust.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseSection {
    #[serde(default)]
    pub authorities: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    pub concurrency: Option<usize>,
    pub lease: Option<String>,
    pub poll: Option<String>,
    pub idle_connection: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }
}
