//! `panel`: the Panel Service (`serve`), service mode (`worker`) and the admin commands.
//! Exit codes: 0 ok, 1 the operation failed (e.g. not delivered), 2 bad input.

mod admin;
mod automation;
mod config;
mod messages;
mod output;
mod serve;
mod smtp;
mod trust;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use panel_service::{OpsError, Panel, SecretsConfig};

use crate::config::FileConfig;
use crate::messages::{MessagesCommand, SendArgs, messages, send};
use crate::serve::{WorkerArgs, http_limits, retention_policy, serve, trusted_proxies, worker_config};
use crate::smtp::{SmtpCommand, smtp};
use panel_web::HttpLimits;

#[derive(Parser)]
#[command(name = "panel", version, about = "Delivers identity workflow and schedule email through your SMTP relay.")]
struct Cli {
    /// TOML configuration file [default: DATA_DIR/panel.toml when it exists, else /etc/panel/panel.toml when it exists]
    #[arg(long, global = true, env = "PANEL_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the embedded database [default: ./panel-data]
    #[arg(long, global = true, env = "PANEL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL [default: sqlite://DATA_DIR/panel.db]
    #[arg(long, global = true, env = "PANEL_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Master key file for stored credentials [default: DATA_DIR/master.key]
    #[arg(long, global = true, env = "PANEL_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
    /// Log filter, e.g. info, debug, panel_service=debug [default: info]
    #[arg(long, global = true, env = "PANEL_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log lines as text or json (one JSON object per line, for log shippers) [default: text]
    #[arg(long, global = true, env = "PANEL_LOG_FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum BouncesCommand {
    /// Read the bounce mailbox of the config file's [bounces] once, now: match what is new,
    /// move it to the processed folder, leave the rest.
    Fetch {
        #[arg(long)]
        json: bool,
    },
    /// List received reports, newest first: the message each is about, what the remote server
    /// said, or why it matched no message.
    List {
        /// Only those that matched no message (no token, or a token that does not verify)
        #[arg(long)]
        unmatched: bool,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
// In the order a new user meets them (the README's): start the service, make an admin, set up
// the relay, send, read the log; then automation; then operations and trust.
enum Command {
    /// Run the Panel Service: REST API, health endpoints, the step worker and the scheduler.
    Serve {
        /// Address to listen on [default: 127.0.0.1:8025]
        #[arg(long, env = "PANEL_LISTEN")]
        listen: Option<String>,
        /// Also take bounces by SMTP on this address (e.g. 0.0.0.0:2526), for the bounce domain
        /// only (panel smtp set --bounce-domain); route that domain to it on the relay
        #[arg(long, env = "PANEL_BOUNCE_LISTEN", value_name = "ADDRESS:PORT")]
        bounce_listen: Option<String>,
        /// The bounce listener's certificate (PEM chain): STARTTLS is offered with it
        #[arg(long, env = "PANEL_BOUNCE_TLS_CERT", value_name = "FILE", requires = "bounce_tls_key")]
        bounce_tls_cert: Option<std::path::PathBuf>,
        /// The private key of --bounce-tls-cert (PEM)
        #[arg(long, env = "PANEL_BOUNCE_TLS_KEY", value_name = "FILE", requires = "bounce_tls_cert")]
        bounce_tls_key: Option<std::path::PathBuf>,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Admin accounts for the web UI and API, and API tokens for scripts.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Relay settings, connection check and the Test Message.
    #[command(subcommand)]
    Smtp(SmtpCommand),
    /// The mail tester: send an ad-hoc message through the queue and the relay.
    Send(Box<SendArgs>),
    /// The message log.
    #[command(subcommand)]
    Messages(MessagesCommand),
    /// What came back after the relay's 250: bounces, delay notices and auto-replies received
    /// for the bounce domain, and those that matched no message.
    #[command(subcommand)]
    Bounces(BouncesCommand),
    /// Message templates (Jinja syntax, sandboxed): set, list, show, delete, render a preview.
    #[command(subcommand)]
    Template(automation::TemplateCommand),
    /// Workflows: steps that run when an event arrives (e.g. user.created).
    #[command(subcommand)]
    Workflow(automation::DefinitionCommand),
    /// Events for workflows.
    #[command(subcommand)]
    Event(automation::EventCommand),
    /// Schedules: steps that run at set times (cron or weekly rules, in a time zone).
    #[command(subcommand)]
    Schedule(automation::ScheduleCommand),
    /// Run inline steps now (for outside tools, e.g. a test runner reporting results).
    Dispatch(automation::DispatchArgs),
    /// Runs of schedules, workflows and dispatches.
    #[command(subcommand)]
    Run(automation::RunCommand),
    /// Running Panel Services and workers.
    #[command(subcommand)]
    Services(ServicesCommand),
    /// Service mode: run the step worker and the scheduler without the web UI and API.
    Worker {
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// License keys: authority tools (keygen, issue) and the keys this installation uses.
    #[command(subcommand)]
    License(trust::LicenseCommand),
    /// Stored credentials for the relay (encrypted; need a license with credential-storage).
    #[command(subcommand)]
    Credential(trust::CredentialCommand),
    /// The audit log: who changed settings, accounts, credentials and licenses, and who cancelled a message.
    #[command(subcommand)]
    Audit(trust::AuditCommand),
    /// Apply pending database migrations and exit (every command applies them on start too).
    Migrate,
    /// Shell completions: `panel completions bash > /etc/bash_completion.d/panel` (or zsh, fish).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The manual page (roff), for packagers: `panel man > panel.1`.
    #[command(hide = true)]
    Man,
}

#[derive(Args)]
struct JsonFlag {
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ServicesCommand {
    /// Panel Services and workers with a recent heartbeat.
    List(JsonFlag),
}

/// A command's failure: the message and the exit code.
struct Failed(u8, String);

impl From<OpsError> for Failed {
    fn from(e: OpsError) -> Self {
        Failed(e.kind().exit_code(), e.to_string())
    }
}

fn bad_input(msg: impl Into<String>) -> Failed {
    Failed(2, msg.into())
}

/// Who the audit log names for changes made from this command line.
fn actor() -> String {
    std::env::var("USER").map(|u| format!("cli:{u}")).unwrap_or_else(|_| "cli".into())
}

type CmdResult = Result<ExitCode, Failed>;

fn main() -> ExitCode {
    // Everything Panel creates (the database and its WAL, the master key, the data directory)
    // holds password hashes, sealed credentials or message content: its own user only.
    // SAFETY: umask only sets the process's file mode mask.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    // A command whose output goes into a closed pipe (`panel smtp show | head -1`) ends quietly,
    // as Unix tools do, instead of panicking on the failed write. Not the services: they must
    // never die of a peer that went away.
    if !matches!(cli.command, Command::Serve { .. } | Command::Worker { .. }) {
        // SAFETY: restores the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // Generated from the command definitions, before anything opens a database.
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "panel",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: writing the manual page: {e}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // A service's threads are decided before its runtime starts: from its configuration, read
    // here (once; `run` takes it as read).
    let resolved = match &cli.command {
        Command::Serve { worker, .. } | Command::Worker { worker } => {
            let threads = resolve(&cli).and_then(|mut resolved| {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let sqlite = resolved.database_url.starts_with("sqlite:");
                resolved.threads = Some(serve::runtime_threads(worker, &resolved.file, cores, sqlite)?);
                Ok(resolved)
            });
            match threads {
                Ok(resolved) => Some(resolved),
                Err(failed) => return failed.exit(),
            }
        }
        _ => None,
    };
    if let Some((threads, _)) = resolved.as_ref().and_then(|r| r.threads.as_ref()) {
        builder.worker_threads(*threads);
    }
    let runtime = builder.enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli, resolved)) {
        Ok(code) => code,
        Err(failed) => failed.exit(),
    }
}

impl Failed {
    /// Says why on stderr; the exit code.
    fn exit(self) -> ExitCode {
        let Failed(code, message) = self;
        eprintln!("error: {message}");
        ExitCode::from(code)
    }
}

struct Resolved {
    database_url: String,
    master_key_file: PathBuf,
    file: FileConfig,
    /// The config file a service watches for changes (it may appear later), and the text it
    /// loaded from it.
    config: serve::ConfigSource,
    /// Permissions tightened on an existing data directory, to log once logging runs.
    tightened: Vec<String>,
    /// A service's runtime threads and why that many (`serve::runtime_threads`), to log.
    threads: Option<(usize, String)>,
}

/// Makes the data directory 0700 and the SQLite files in it 0600 when they are looser (an
/// installation from before Panel set its umask, or a directory made by hand or by systemd's
/// StateDirectory=), and says what it changed.
fn tighten_data_dir(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut changed = Vec::new();
    let files = ["panel.db", "panel.db-wal", "panel.db-shm"].map(|f| (dir.join(f), 0o600));
    for (path, wanted) in std::iter::once((dir.to_path_buf(), 0o700)).chain(files) {
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 == 0 {
            continue;
        }
        match std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wanted)) {
            Ok(()) => changed.push(format!("{} was mode {mode:o}, now {wanted:o}", path.display())),
            Err(e) => changed.push(format!(
                "{} is mode {mode:o} (readable by other users) and cannot be changed: {e}",
                path.display()
            )),
        }
    }
    changed
}

/// The Debian package's config file, read when neither --config nor --data-dir is given and
/// ./panel-data has no panel.toml.
const SYSTEM_CONFIG: &str = "/etc/panel/panel.toml";

fn resolve(cli: &Cli) -> Result<Resolved, Failed> {
    let default_dir = cli.data_dir.clone().unwrap_or_else(|| PathBuf::from("panel-data"));
    let watched = cli.config.clone().unwrap_or_else(|| {
        // A packaged installation keeps its config in /etc (and names its data directory
        // there), so that `sudo -u panel panel ...` works from any directory.
        let local = default_dir.join("panel.toml");
        let system = Path::new(SYSTEM_CONFIG);
        if cli.data_dir.is_none() && !local.exists() && system.exists() { system.to_path_buf() } else { local }
    });
    let (file, text) = match cli.config.is_some() || watched.exists() {
        true => FileConfig::load(&watched).map(|(f, t)| (f, Some(t))).map_err(bad_input)?,
        false => (FileConfig::default(), None),
    };
    let config = serve::ConfigSource { path: watched, loaded: file.clone(), text };
    let data_dir = cli.data_dir.clone().or_else(|| file.data_dir.clone()).unwrap_or(default_dir);
    let mut tightened = Vec::new();
    let database_url = match cli.database_url.clone().or_else(|| file.database_url.clone()) {
        Some(url) => url,
        None => {
            // Only a command that sets Panel up (or runs it) makes a new data directory: a read
            // in the wrong directory must not answer from a fresh, empty database.
            if !data_dir.exists() && !sets_up(&cli.command) {
                let local_config = if Path::new("panel.toml").exists() {
                    " (./panel.toml is not read from here: give --config panel.toml)"
                } else {
                    ""
                };
                return Err(Failed(
                    1,
                    format!(
                        "no Panel data directory at {}: nothing is set up here. Run this where Panel's data is, or \
                         give --data-dir or PANEL_DATA_DIR{local_config}; a new installation starts with panel \
                         smtp set or panel serve",
                        data_dir.display()
                    ),
                ));
            }
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| Failed(1, format!("cannot create data directory {}: {e}", data_dir.display())))?;
            tightened = tighten_data_dir(&data_dir);
            // Absolute, so that every message naming the database says which directory it is in.
            let dir = std::path::absolute(&data_dir).unwrap_or(data_dir.clone());
            format!("sqlite://{}", dir.join("panel.db").display())
        }
    };
    let master_key_file = cli
        .master_key_file
        .clone()
        .or_else(|| file.master_key_file.clone())
        .unwrap_or_else(|| data_dir.join("master.key"));
    Ok(Resolved { database_url, master_key_file, file, config, tightened, threads: None })
}

/// What an admin running a command in the wrong place must be told: the database this command
/// opened when no running service uses it (its answers are not the service's), and a
/// `./panel.toml` that this command does not read.
async fn store_notes(panel: &Panel, resolved: &Resolved) -> Vec<String> {
    let mut notes = Vec::new();
    let local = Path::new("panel.toml");
    let read = resolved.config.text.as_ref().map(|_| &resolved.config.path);
    let same = |p: &PathBuf| std::fs::canonicalize(p).ok() == std::fs::canonicalize(local).ok();
    if local.exists() && !read.is_some_and(same) {
        let reads = read.map_or_else(|| "no config file".to_string(), |p| p.display().to_string());
        notes
            .push(format!("./panel.toml is not read (this command reads {reads}); give --config panel.toml to use it"));
    }
    if panel.live_services().await.is_ok_and(|s| s.is_empty()) {
        notes.push(format!(
            "no Panel Service or worker runs on the database {}; if yours runs, it uses another one: give its \
             --data-dir, --config or --database-url",
            panel_service::redact_url(&resolved.database_url)
        ));
    }
    notes
}

/// The commands that may create a new installation's data directory.
fn sets_up(command: &Command) -> bool {
    matches!(
        command,
        Command::Serve { .. }
            | Command::Worker { .. }
            | Command::Migrate
            | Command::Smtp(smtp::SmtpCommand::Set(_))
            | Command::Admin(admin::AdminCommand::Create { .. })
            | Command::License(trust::LicenseCommand::Add { .. })
            | Command::Credential(trust::CredentialCommand::Set(_))
    )
}

fn init_logging(filter: &str, format: &str) -> Result<(), Failed> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::fmt::Write as _;
    use tracing_subscriber::field::MakeExt as _;
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    match format {
        // Values from outside (a sign-in name, a relay's reply) are written with their control
        // characters escaped, so none can end the line and forge the next one.
        "text" => builder
            .fmt_fields(
                tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
                    if field.name() != "message" {
                        write!(w, "{field}=")?;
                    }
                    write!(Escaped(w), "{value:?}")
                })
                .delimited(" "),
            )
            .init(),
        "json" => builder.json().flatten_event(true).with_current_span(false).init(),
        other => return Err(bad_input(format!("--log-format '{other}' is not a log format; use text or json"))),
    }
    Ok(())
}

/// Writes text with control characters (other than tab) as escapes: `\n`, `\r`, `\u{1b}`.
struct Escaped<'a, W: std::fmt::Write>(&'a mut W);

impl<W: std::fmt::Write> std::fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for c in s.chars() {
            match c {
                '\t' => self.0.write_char(c)?,
                c if c.is_control() => write!(self.0, "{}", c.escape_default())?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Runs the command; a service's configuration comes `resolved` already (`main`).
async fn run(cli: Cli, resolved: Option<Resolved>) -> CmdResult {
    if let Command::License(cmd) = &cli.command
        && let Some(result) = trust::offline(cmd)
    {
        return result;
    }
    let resolved = match resolved {
        Some(resolved) => resolved,
        None => resolve(&cli)?,
    };
    let log_level = cli.log_level.clone().or_else(|| resolved.file.log_level.clone());
    let is_service = matches!(cli.command, Command::Serve { .. } | Command::Worker { .. });
    let log_format = cli.log_format.clone().or_else(|| resolved.file.log_format.clone());
    init_logging(
        log_level.as_deref().unwrap_or(if is_service { "info" } else { "warn" }),
        log_format.as_deref().unwrap_or("text"),
    )?;
    for change in &resolved.tightened {
        tracing::warn!("data directory permissions: {change}");
    }
    if let Some((threads, why)) = &resolved.threads {
        tracing::info!(threads, "runtime threads: {threads} ({why})");
    }
    let secrets = SecretsConfig {
        authorities: trust::authorities(&resolved.file.license.authorities)?,
        master_key_file: resolved.master_key_file.clone(),
    };
    let panel = Panel::open(&resolved.database_url, secrets).await.map_err(|e| {
        Failed(1, format!("cannot open the database {}: {e}", panel_service::redact_url(&resolved.database_url)))
    })?;
    if !matches!(cli.command, Command::Serve { .. } | Command::Worker { .. } | Command::Migrate) {
        for note in store_notes(&panel, &resolved).await {
            eprintln!("note: {note}");
        }
    }
    match cli.command {
        Command::Serve { listen, bounce_listen, bounce_tls_cert, bounce_tls_key, worker } => {
            let listen = listen.or(resolved.file.listen.clone()).unwrap_or_else(|| "127.0.0.1:8025".into());
            let config = worker_config(&worker, &resolved.file)?;
            let http = http_limits(&resolved.file, &config)?;
            let proxies = trusted_proxies(&resolved.file)?;
            let retention = retention_policy(&resolved.file)?;
            let mailbox = serve::bounce_mailbox(&resolved.file)?;
            let bounce_tls = bounce_tls_cert.zip(bounce_tls_key);
            let listeners = serve::Listeners { http: Some(listen), bounces: bounce_listen, bounce_tls, mailbox };
            serve(panel, listeners, config, http, proxies, retention, resolved.config).await
        }
        Command::Worker { worker } => {
            let config = worker_config(&worker, &resolved.file)?;
            let retention = retention_policy(&resolved.file)?;
            let mailbox = serve::bounce_mailbox(&resolved.file)?;
            let listeners = serve::Listeners { http: None, bounces: None, bounce_tls: None, mailbox };
            serve(panel, listeners, config, HttpLimits::default(), Vec::new(), retention, resolved.config).await
        }
        Command::Smtp(cmd) => smtp(panel, cmd).await,
        Command::Send(args) => send(panel, *args).await,
        Command::Messages(cmd) => messages(panel, cmd).await,
        Command::Bounces(BouncesCommand::Fetch { json }) => {
            let Some((mailbox, _)) = serve::bounce_mailbox(&resolved.file)? else {
                return Err(bad_input(
                    "no bounce mailbox is configured: set [bounces] imap_url and imap_password_file in the config file",
                ));
            };
            let pass = panel.read_bounce_mailbox(&mailbox).await?;
            match json {
                true => output::print_json(&pass),
                false => println!(
                    "Read {} new message(s): {} matched a message (moved to {}), {} left in {}.",
                    pass.read, pass.matched, mailbox.processed, pass.left, mailbox.url.folder
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bounces(BouncesCommand::List { unmatched, limit, json }) => {
            output::bounces(&panel.bounces(unmatched, limit).await?, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::License(cmd) => trust::license(panel, cmd).await,
        Command::Credential(cmd) => trust::credential(panel, cmd).await,
        Command::Audit(cmd) => trust::audit(panel, cmd).await,
        Command::Admin(cmd) => admin::admin(panel, cmd).await,
        Command::Template(cmd) => automation::template(panel, cmd).await,
        Command::Workflow(cmd) => automation::workflow(panel, cmd).await,
        Command::Schedule(cmd) => automation::schedule(panel, cmd).await,
        Command::Event(cmd) => automation::event(panel, cmd).await,
        Command::Dispatch(args) => automation::dispatch(panel, args).await,
        Command::Run(cmd) => automation::run(panel, cmd).await,
        Command::Completions { .. } | Command::Man => unreachable!("answered in main, before any database"),
        Command::Migrate => {
            let (applied, known) = panel.schema_version().await?;
            println!(
                "Database {} is at schema version {applied} of {known}; migrations are current.",
                panel_service::redact_url(&resolved.database_url)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Services(ServicesCommand::List(f)) => {
            let services = panel.live_services().await?;
            output::services(&services, f.json);
            Ok(ExitCode::SUCCESS)
        }
    }
}
