//! `panel license`, `panel credential` and `panel audit`: license keys, the credential store
//! and its audit log. `license keygen` and `license issue` are the authority's offline tools.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use panel_domain::{CredentialKind, Secret};
use panel_service::views::PutOutcome;
use panel_service::{CredentialInput, Panel};
use panel_vault::license::{self, IssuedTo};
use panel_vault::{AuthorityKeyPair, AuthorityPublicKey};
use zeroize::Zeroizing;

use crate::{CmdResult, Failed, actor, bad_input, output};

#[derive(Subcommand)]
pub enum LicenseCommand {
    /// Create a license authority key pair: DIR/authority.key (secret, mode 0600) and DIR/authority.pub.
    Keygen {
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
    /// Sign a license key with an authority key and print it (run by the license authority).
    Issue(IssueArgs),
    /// Add a license key (verified against the trusted authorities first).
    Add {
        /// The key text (or use --file)
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        key: Option<String>,
        /// Read the key from FILE ('-' for standard input)
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// List license keys: features, issued to, expiry, authority, and whether each is valid now.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a license key by id (as `panel license list` shows it).
    Remove { id: String },
}

#[derive(Args)]
pub struct IssueArgs {
    /// The authority's private key file (authority.key)
    #[arg(long, value_name = "FILE")]
    authority_key: PathBuf,
    /// A feature to grant, e.g. credential-storage (repeat for more)
    #[arg(long = "feature", value_name = "NAME", required = true)]
    features: Vec<String>,
    /// The organization the key is issued to
    #[arg(long, value_name = "ORG")]
    to: String,
    /// Grant the features only to a Panel whose From address is in this domain
    #[arg(long)]
    domain: Option<String>,
    /// Last day of validity, YYYY-MM-DD (valid through that day, UTC), or an RFC 3339 time [default: never]
    #[arg(long, value_name = "DATE")]
    expires: Option<String>,
    /// Mark the key as a trial
    #[arg(long)]
    trial: bool,
}

#[derive(Subcommand)]
pub enum CredentialCommand {
    /// Store or replace a credential (needs a license with credential-storage). The secret is
    /// read from standard input, never from the command line.
    Set(Box<CredentialSetArgs>),
    /// List stored credentials (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a credential (refused while the relay settings use it).
    Delete {
        /// The credential's name
        name: String,
    },
    /// Generate a new master key and re-wrap every stored credential with it, while services run.
    RotateMasterKey,
}

#[derive(Args)]
pub struct CredentialSetArgs {
    /// The credential's name, referenced by `panel smtp set --credential NAME`
    name: String,
    /// password, microsoft-client-secret, microsoft-certificate or google-service-account
    #[arg(long, default_value = "password")]
    kind: String,
    /// The relay account (password credentials)
    #[arg(long)]
    username: Option<String>,
    /// The application (client) id of a Microsoft Entra app registration
    #[arg(long)]
    client_id: Option<String>,
    /// The Microsoft Entra directory (tenant) id or domain
    #[arg(long)]
    tenant: Option<String>,
    /// Read the password or client secret from standard input (one line)
    #[arg(long, visible_alias = "secret-stdin")]
    password_stdin: bool,
    /// The Google service account key file (JSON), or for microsoft-certificate the app's private
    /// key and certificate in one PEM file
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Who changed what: credentials, licenses, relay settings, accounts, cancelled messages.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

/// The trusted authorities: the config file's list plus `PANEL_LICENSE_AUTHORITIES`.
pub fn authorities(from_file: &[String]) -> Result<Vec<AuthorityPublicKey>, Failed> {
    let env = std::env::var("PANEL_LICENSE_AUTHORITIES").unwrap_or_default();
    from_file
        .iter()
        .map(String::as_str)
        .chain(env.split(',').map(str::trim).filter(|s| !s.is_empty()))
        .map(|k| AuthorityPublicKey::parse(k).map_err(|e| bad_input(format!("license authorities: {e}"))))
        .collect()
}

/// Offline authority tools: no database needed.
pub fn offline(cmd: &LicenseCommand) -> Option<CmdResult> {
    match cmd {
        LicenseCommand::Keygen { out_dir } => Some(keygen(out_dir)),
        LicenseCommand::Issue(args) => Some(issue(args)),
        _ => None,
    }
}

fn keygen(dir: &Path) -> CmdResult {
    let fail = |what: &Path, e: std::io::Error| Failed(1, format!("cannot write {}: {e}", what.display()));
    std::fs::create_dir_all(dir).map_err(|e| fail(dir, e))?;
    let pair = AuthorityKeyPair::generate();
    let key_path = dir.join("authority.key");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&key_path).map_err(|e| fail(&key_path, e))?;
    std::io::Write::write_all(&mut file, pair.to_file_text().as_bytes()).map_err(|e| fail(&key_path, e))?;
    let pub_path = dir.join("authority.pub");
    std::fs::write(&pub_path, format!("{}\n", pair.public())).map_err(|e| fail(&pub_path, e))?;
    println!("Authority key pair written:");
    println!("  private key  {} (keep it offline; it signs license keys)", key_path.display());
    println!("  public key   {}: {}", pub_path.display(), pair.public());
    println!("Trust it in Panel with license.authorities in panel.toml or PANEL_LICENSE_AUTHORITIES.");
    Ok(ExitCode::SUCCESS)
}

fn issue(a: &IssueArgs) -> CmdResult {
    let text = Zeroizing::new(
        std::fs::read_to_string(&a.authority_key)
            .map_err(|e| bad_input(format!("--authority-key {}: {e}", a.authority_key.display())))?,
    );
    let pair = AuthorityKeyPair::from_file_text(&text)
        .map_err(|e| bad_input(format!("--authority-key {}: {e}", a.authority_key.display())))?;
    for f in &a.features {
        license::validate_feature(f).map_err(|e| bad_input(format!("--feature: {e}")))?;
    }
    if a.to.trim().is_empty() {
        return Err(bad_input("--to: give the organization the key is issued to"));
    }
    let domain = a
        .domain
        .as_deref()
        .map(|d| {
            panel_domain::settings::validate_host("domain", d).map_err(|e| bad_input(format!("--domain {}", e.message)))
        })
        .transpose()?;
    let expires = a
        .expires
        .as_deref()
        .map(|e| license::parse_expiry(e).map_err(|m| bad_input(format!("--expires: {m}"))))
        .transpose()?;
    let to = IssuedTo { organization: a.to.trim().to_string(), domain };
    println!("{}", pair.issue(to, a.features.clone(), expires, a.trial));
    Ok(ExitCode::SUCCESS)
}

pub async fn license(panel: Panel, cmd: LicenseCommand) -> CmdResult {
    match cmd {
        LicenseCommand::Keygen { .. } | LicenseCommand::Issue(_) => unreachable!("handled offline"),
        LicenseCommand::Add { key, file } => {
            let text = match (key, file) {
                (Some(k), _) => k,
                (None, Some(f)) if f.as_os_str() == "-" => read_stdin()?.to_string(),
                (None, Some(f)) => {
                    std::fs::read_to_string(&f).map_err(|e| bad_input(format!("--file {}: {e}", f.display())))?
                }
                (None, None) => return Err(bad_input("give the key, or --file FILE")),
            };
            let l = panel.add_license(&text, &actor()).await?;
            let expiry = l.expires_at.map_or("never expires".to_string(), |t| format!("expires {}", output::time(&t)));
            println!(
                "License {} added: issued to {}, features {}, {expiry}.",
                l.id,
                l.issued_to.organization,
                l.features.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        LicenseCommand::List { json } => {
            output::licenses(&panel.licenses().await?, json);
            Ok(ExitCode::SUCCESS)
        }
        LicenseCommand::Remove { id } => {
            panel.remove_license(&id, &actor()).await?;
            println!("License {id} removed.");
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn credential(panel: Panel, cmd: CredentialCommand) -> CmdResult {
    match cmd {
        CredentialCommand::Set(a) => {
            let kind = CredentialKind::parse(&a.kind).ok_or_else(|| {
                bad_input(format!(
                    "--kind '{}' is not a credential kind; use one of {}",
                    a.kind,
                    CredentialKind::ALL.join(", ")
                ))
            })?;
            let secret = match (&a.key_file, a.password_stdin) {
                (Some(_), true) => return Err(bad_input("give either --key-file or --password-stdin, not both")),
                (Some(f), false) => Zeroizing::new(
                    std::fs::read_to_string(f).map_err(|e| bad_input(format!("--key-file {}: {e}", f.display())))?,
                ),
                (None, true) => read_stdin()?,
                (None, false) => {
                    return Err(bad_input(
                        "give the secret on standard input with --password-stdin (or --key-file for a Google service account key \
                         or a Microsoft certificate credential)",
                    ));
                }
            };
            let name = a.name.clone();
            let input = CredentialInput {
                name: a.name,
                kind,
                username: a.username.or(a.client_id),
                tenant: a.tenant,
                secret: Secret::from(secret),
            };
            let outcome = panel.set_credential(input, &actor()).await?;
            let verb = if outcome == PutOutcome::Created { "stored" } else { "replaced" };
            println!(
                "Credential {name} {verb} (encrypted with the master key in {}).",
                panel.master_key_file().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        CredentialCommand::List { json } => {
            output::credentials(&panel.credentials().await?, json);
            Ok(ExitCode::SUCCESS)
        }
        CredentialCommand::Delete { name } => {
            panel.delete_credential(&name, &actor()).await?;
            println!("Credential {name} deleted.");
            Ok(ExitCode::SUCCESS)
        }
        CredentialCommand::RotateMasterKey => {
            let (old, new, moved) = panel.rotate_master_key(&actor()).await?;
            println!(
                "Master key rotated: {} -> {new}; {moved} credential(s) re-wrapped. {} now holds only the new key; \
                 back it up.",
                old.join(", "),
                panel.master_key_file().display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub async fn audit(panel: Panel, cmd: AuditCommand) -> CmdResult {
    let AuditCommand::List { limit, json } = cmd;
    output::audit(&panel.audit_log(limit.clamp(1, 10_000)).await?, json);
    Ok(ExitCode::SUCCESS)
}

/// The secret from standard input: everything up to the end, without the final line break.
pub fn read_stdin() -> Result<Zeroizing<String>, Failed> {
    let mut buf = Zeroizing::new(String::new());
    std::io::stdin().read_to_string(&mut buf).map_err(|e| bad_input(format!("cannot read standard input: {e}")))?;
    let trimmed = buf.trim_end_matches(['\r', '\n']).len();
    buf.truncate(trimmed);
    Ok(buf)
}
