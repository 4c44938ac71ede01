//! `panel`: the Panel Service (`serve`), service mode (`worker`) and the admin commands.
//! Exit codes: 0 ok, 1 the operation failed (e.g. not delivered), 2 bad input.

mod admin;
mod automation;
mod config;
mod output;
mod smtp;
mod trust;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use panel_domain::message::Draft;
use panel_domain::{MessageState, Origin};
use panel_service::supervisor::Supervisor;
use panel_service::views::RetryResult;
use panel_service::wake::Waker;
use panel_service::{OpsError, Panel, SecretsConfig, WorkerConfig};
use tokio::sync::watch;

use crate::config::FileConfig;

#[derive(Parser)]
#[command(name = "panel", version, about = "Delivers identity workflow and schedule email through your SMTP relay.")]
struct Cli {
    /// TOML configuration file [default: DATA_DIR/panel.toml when it exists]
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
enum Command {
    /// Run the Panel Service: REST API, health endpoints, the step worker and the scheduler.
    Serve {
        /// Address to listen on [default: 127.0.0.1:8025]
        #[arg(long, env = "PANEL_LISTEN")]
        listen: Option<String>,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Service mode: run the step worker and the scheduler without the web UI and API.
    Worker {
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Relay settings, connection check and the Test Message.
    #[command(subcommand)]
    Smtp(SmtpCommand),
    /// The mail tester: send an ad-hoc message through the queue and the relay.
    Send(Box<SendArgs>),
    /// The message log.
    #[command(subcommand)]
    Messages(MessagesCommand),
    /// Running Panel Services and workers.
    #[command(subcommand)]
    Services(ServicesCommand),
    /// License keys: authority tools (keygen, issue) and the keys this installation uses.
    #[command(subcommand)]
    License(trust::LicenseCommand),
    /// Stored credentials for the relay (encrypted; need a license with credential-storage).
    #[command(subcommand)]
    Credential(trust::CredentialCommand),
    /// The audit log of license and credential changes.
    #[command(subcommand)]
    Audit(trust::AuditCommand),
    /// Admin accounts for the web UI and API, and API tokens for scripts.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Message templates (Jinja syntax, sandboxed): set, list, show, delete, render a preview.
    #[command(subcommand)]
    Template(automation::TemplateCommand),
    /// Workflows: steps that run when an event arrives (e.g. user.created).
    #[command(subcommand)]
    Workflow(automation::DefinitionCommand),
    /// Schedules: steps that run at set times (cron or weekly rules, in a time zone).
    #[command(subcommand)]
    Schedule(automation::ScheduleCommand),
    /// Events for workflows.
    #[command(subcommand)]
    Event(automation::EventCommand),
    /// Run inline steps now (for outside tools, e.g. a test runner reporting results).
    Dispatch(automation::DispatchArgs),
    /// Runs of schedules, workflows and dispatches.
    #[command(subcommand)]
    Run(automation::RunCommand),
    /// Apply pending database migrations and exit (every command applies them on start too).
    Migrate,
}

#[derive(Args)]
struct WorkerArgs {
    /// Messages delivered at once [default: 4]
    #[arg(long, env = "PANEL_WORKER_CONCURRENCY")]
    concurrency: Option<usize>,
}

#[derive(Subcommand)]
enum SmtpCommand {
    /// Store relay settings. Only the fields given change; '' clears a field. The first call needs
    /// --host, --from and --fallback-recipient.
    Set(Box<SetArgs>),
    /// Print the relay settings in force.
    Show(JsonFlag),
    /// Connect to the relay now and report every stage; sends nothing. Exit 0 only when a
    /// message to the Fallback recipient would be accepted.
    Check(JsonFlag),
    /// Enqueue the Test Message to the Fallback recipient (or --to) and print its id.
    Test {
        /// Send the test to this address instead of the Fallback recipient
        #[arg(long)]
        to: Option<String>,
        /// Wait up to SECS for the outcome; exit 0 only when delivered
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct JsonFlag {
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SetArgs {
    #[command(flatten)]
    settings: smtp::SettingFlags,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SendArgs {
    /// Recipient (repeat for more); with no recipient at all the Fallback recipient is used
    #[arg(long)]
    to: Vec<String>,
    #[arg(long)]
    cc: Vec<String>,
    #[arg(long)]
    bcc: Vec<String>,
    #[arg(long)]
    reply_to: Option<String>,
    #[arg(long)]
    subject: String,
    /// Plain-text body
    #[arg(long, conflicts_with = "text_file", required_unless_present = "text_file")]
    text: Option<String>,
    /// File with the plain-text body
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// File with an HTML alternative body
    #[arg(long)]
    html_file: Option<PathBuf>,
    /// Create the message once per KEY: sending again with the same key returns the same message
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Wait up to SECS for the outcome; exit 0 only when delivered
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum MessagesCommand {
    /// List messages, newest first.
    List {
        /// queued, sending, retrying, delivered or failed
        #[arg(long)]
        status: Option<String>,
        /// test_message, mail_tester, schedule, workflow or dispatch
        #[arg(long)]
        origin: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show one message with its recipients and every attempt.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Put a failed message back in the queue, or every failed one with --status failed.
    Retry {
        /// The message to retry
        #[arg(required_unless_present = "status", conflicts_with_all = ["status", "since"])]
        id: Option<i64>,
        /// Bulk retry of the dead letters: only `failed` is accepted
        #[arg(long)]
        status: Option<String>,
        /// With --status failed: only messages that failed within this long (e.g. 2h) or since this RFC 3339 time
        #[arg(long, requires = "status")]
        since: Option<String>,
    },
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
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(Failed(code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

struct Resolved {
    database_url: String,
    master_key_file: PathBuf,
    file: FileConfig,
}

fn resolve(cli: &Cli) -> Result<Resolved, Failed> {
    let default_dir = cli.data_dir.clone().unwrap_or_else(|| PathBuf::from("panel-data"));
    let config_path = cli.config.clone().or_else(|| Some(default_dir.join("panel.toml")).filter(|p| p.exists()));
    let file = match config_path {
        Some(p) => FileConfig::load(&p).map_err(bad_input)?,
        None => FileConfig::default(),
    };
    let data_dir = cli.data_dir.clone().or_else(|| file.data_dir.clone()).unwrap_or(default_dir);
    let database_url = match cli.database_url.clone().or_else(|| file.database_url.clone()) {
        Some(url) => url,
        None => {
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| Failed(1, format!("cannot create data directory {}: {e}", data_dir.display())))?;
            format!("sqlite://{}", data_dir.join("panel.db").display())
        }
    };
    let master_key_file = cli
        .master_key_file
        .clone()
        .or_else(|| file.master_key_file.clone())
        .unwrap_or_else(|| data_dir.join("master.key"));
    Ok(Resolved { database_url, master_key_file, file })
}

fn init_logging(filter: &str, format: &str) -> Result<(), Failed> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        "text" => builder.init(),
        "json" => builder.json().flatten_event(true).with_current_span(false).init(),
        other => return Err(bad_input(format!("--log-format '{other}' is not a log format; use text or json"))),
    }
    Ok(())
}

async fn run(cli: Cli) -> CmdResult {
    if let Command::License(cmd) = &cli.command
        && let Some(result) = trust::offline(cmd)
    {
        return result;
    }
    let resolved = resolve(&cli)?;
    let log_level = cli.log_level.clone().or_else(|| resolved.file.log_level.clone());
    let is_service = matches!(cli.command, Command::Serve { .. } | Command::Worker { .. });
    let log_format = cli.log_format.clone().or_else(|| resolved.file.log_format.clone());
    init_logging(
        log_level.as_deref().unwrap_or(if is_service { "info" } else { "warn" }),
        log_format.as_deref().unwrap_or("text"),
    )?;
    let secrets = SecretsConfig {
        authorities: trust::authorities(&resolved.file.license.authorities)?,
        master_key_file: resolved.master_key_file.clone(),
    };
    let panel = Panel::open(&resolved.database_url, secrets).await.map_err(|e| {
        Failed(1, format!("cannot open the database {}: {e}", panel_service::redact_url(&resolved.database_url)))
    })?;
    match cli.command {
        Command::Serve { listen, worker } => {
            let listen = listen.or(resolved.file.listen.clone()).unwrap_or_else(|| "127.0.0.1:8025".into());
            serve(panel, Some(listen), worker_config(&worker, &resolved.file)?).await
        }
        Command::Worker { worker } => serve(panel, None, worker_config(&worker, &resolved.file)?).await,
        Command::Smtp(cmd) => smtp(panel, cmd).await,
        Command::Send(args) => send(panel, *args).await,
        Command::Messages(cmd) => messages(panel, cmd).await,
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

fn worker_config(args: &WorkerArgs, file: &FileConfig) -> Result<WorkerConfig, Failed> {
    let mut c = WorkerConfig::default();
    if let Some(n) = args.concurrency.or(file.worker.concurrency) {
        if n == 0 || n > 256 {
            return Err(bad_input(format!("worker concurrency {n} is out of range; use 1-256")));
        }
        c.concurrency = n;
    }
    let duration = |name: &str, v: &Option<String>| -> Result<Option<Duration>, Failed> {
        v.as_deref()
            .map(|s| panel_domain::duration::parse(s).map_err(|e| bad_input(format!("worker.{name}: {e}"))))
            .transpose()
    };
    if let Some(d) = duration("lease", &file.worker.lease)? {
        c.lease = d.max(Duration::from_secs(3));
    }
    if let Some(d) = duration("poll", &file.worker.poll)? {
        c.poll = d.max(Duration::from_millis(50));
    }
    if let Some(d) = duration("idle_connection", &file.worker.idle_connection)? {
        c.idle_connection = d;
    }
    Ok(c)
}

async fn serve(mut panel: Panel, listen: Option<String>, config: WorkerConfig) -> CmdResult {
    // A missing or wrong master key stops the service here, with the reason, not at first use.
    let key = panel.open_vault().await.map_err(|e| Failed(1, format!("cannot start: {e}")))?;
    tracing::info!(file = %panel.master_key_file().display(), key, "master key loaded");
    let waker = Waker::default();
    panel.local_waker = Some(waker.clone());
    let wake_port = waker.listen().await.map_err(|e| Failed(1, format!("cannot open the wake-up socket: {e}")))?;
    panel
        .listen_for_wakes(waker.clone())
        .await
        .map_err(|e| Failed(1, format!("cannot listen for wake-ups on the database: {e}")))?;
    let listener = match &listen {
        None => None,
        Some(addr) => {
            let parsed: SocketAddr = addr
                .parse()
                .map_err(|_| bad_input(format!("--listen '{addr}' is not ADDRESS:PORT, e.g. 127.0.0.1:8025")))?;
            let l = tokio::net::TcpListener::bind(parsed)
                .await
                .map_err(|e| Failed(1, format!("cannot listen on {addr}: {e}")))?;
            if !panel_web::is_loopback(&parsed) {
                tracing::warn!(%addr, "the UI and API are served over plain HTTP; put a TLS-terminating proxy in front (it should set X-Forwarded-Proto: https)");
            }
            if panel.admins().await?.is_empty() {
                tracing::warn!(
                    "no admin account exists yet, so nobody can sign in; create one: panel admin create NAME --role admin"
                );
            }
            Some(l)
        }
    };
    let kind = if listen.is_some() { "serve" } else { "worker" };
    let handle = panel.register_service(kind, listen.clone(), Some(wake_port)).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Supervisor::default();
    let (p, id, w, rx) = (panel.clone(), handle.info.id.clone(), waker.clone(), stop_rx.clone());
    tasks.spawn("worker", async move {
        panel_service::run_worker(p, id, config, w, rx).await;
        Ok(())
    });
    let (p, id, rx) = (panel.clone(), handle.info.id.clone(), stop_rx.clone());
    tasks.spawn("scheduler", async move {
        panel_service::run_scheduler(p, id, rx).await;
        Ok(())
    });
    if let Some(l) = listener {
        let mut rx = stop_rx.clone();
        let panel = panel.clone();
        tasks.spawn("web server", async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            panel_web::serve(panel, l, shutdown).await.map_err(|e| e.to_string())
        });
    }
    match &listen {
        Some(addr) => tracing::info!(service = %handle.info.id, %addr, "Panel Service running"),
        None => tracing::info!(service = %handle.info.id, "Panel worker running (service mode)"),
    }
    let ended = tokio::select! {
        _ = shutdown_signal() => None,
        why = tasks.first_end() => Some(why),
    };
    match &ended {
        None => tracing::info!("shutting down"),
        Some(why) => tracing::error!(reason = %why, "a task of the service ended; stopping the service"),
    }
    let _ = stop_tx.send(true);
    for problem in tasks.finish().await {
        tracing::error!(reason = %problem, "while stopping");
    }
    handle.stop().await;
    match ended {
        None => Ok(ExitCode::SUCCESS),
        Some(why) => Err(Failed(1, format!("{why}; the service stopped so that its supervisor (systemd) restarts it"))),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn smtp(panel: Panel, cmd: SmtpCommand) -> CmdResult {
    match cmd {
        SmtpCommand::Set(args) => {
            let json = args.json;
            let patch = args.settings.patch().map_err(OpsError::Invalid)?;
            let update = panel.update_settings(&patch, &actor()).await?;
            output::settings_saved(&update, json);
            Ok(ExitCode::SUCCESS)
        }
        SmtpCommand::Show(f) => {
            let stored = panel.stored_settings().await?.ok_or(OpsError::NotConfigured)?;
            let effective = panel.settings().await?.map(|(_, s)| s);
            output::settings(&stored, effective.as_ref(), f.json);
            Ok(ExitCode::SUCCESS)
        }
        SmtpCommand::Check(f) => {
            let report = panel.check().await?;
            output::check(&report, f.json);
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        SmtpCommand::Test { to, wait, json } => {
            let id = panel.enqueue_test(to.as_deref()).await?;
            after_enqueue(&panel, id, "Test message", wait, json).await
        }
    }
}

async fn send(panel: Panel, a: SendArgs) -> CmdResult {
    let read = |p: &PathBuf, field: &str| {
        std::fs::read_to_string(p).map_err(|e| bad_input(format!("{field}: cannot read {}: {e}", p.display())))
    };
    let text = match (&a.text, &a.text_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => read(f, "text_file")?,
        (None, None) => return Err(bad_input("give the body with --text or --text-file")),
    };
    let html = a.html_file.as_ref().map(|f| read(f, "html_file")).transpose()?;
    let draft = Draft {
        to: a.to,
        cc: a.cc,
        bcc: a.bcc,
        reply_to: a.reply_to,
        subject: a.subject,
        text,
        html,
        ..Default::default()
    };
    let (id, created) = panel.enqueue_draft(Origin::MailTester, &draft, a.idempotency_key.as_deref()).await?;
    if !created && !a.json {
        println!("Message {id} already exists for this idempotency key; nothing new was queued.");
    }
    after_enqueue(&panel, id, "Message", a.wait, a.json).await
}

/// Prints the id, warns when nothing will process the queue, and optionally waits for the outcome.
async fn after_enqueue(panel: &Panel, id: i64, what: &str, wait: Option<u64>, json: bool) -> CmdResult {
    let running = !panel.live_services().await?.is_empty();
    let Some(secs) = wait else {
        output::enqueued(id, what, running, json);
        return Ok(ExitCode::SUCCESS);
    };
    if !json {
        println!("{what} {id} queued.");
        if !running {
            output::no_service_notice();
        }
    }
    let detail = panel.wait_for(id, Duration::from_secs(secs)).await?;
    output::outcome(&detail, running, json);
    Ok(if detail.state == MessageState::Delivered { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn messages(panel: Panel, cmd: MessagesCommand) -> CmdResult {
    match cmd {
        MessagesCommand::List { status, origin, limit, json } => {
            let filter = panel_service::ops::message_filter(status.as_deref(), origin.as_deref(), None, None, limit)
                .map_err(|e| bad_input(e.to_string()))?;
            let list = panel.messages(&filter).await?;
            output::message_list(&list, json);
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Show { id, json } => {
            let detail = panel.message(id).await?;
            output::message(&detail, json);
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Retry { id: None, status, since } => {
            if status.as_deref() != Some("failed") {
                return Err(bad_input("--status: only failed messages can be retried; use --status failed"));
            }
            let since = since
                .as_deref()
                .map(panel_service::ops::parse_since)
                .transpose()
                .map_err(|e| bad_input(e.to_string()))?;
            let n = panel.retry_failed(since).await?;
            println!("{n} failed message(s) queued again.");
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Retry { id: Some(id), .. } => match panel.retry(id).await? {
            RetryResult::Requeued => {
                println!("Message {id} is queued again.");
                Ok(ExitCode::SUCCESS)
            }
            RetryResult::NotFound => Err(OpsError::NotFound(id).into()),
            RetryResult::NotFailed { state } => {
                Err(bad_input(format!("message {id} is {state}; only failed messages can be retried")))
            }
        },
    }
}
