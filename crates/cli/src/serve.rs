//! `panel serve` and `panel worker`: the worker, the scheduler and (for serve) the web server,
//! under a supervisor; a task that ends stops the process with the reason.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use panel_service::retention::RetentionPolicy;
use panel_service::supervisor::Supervisor;
use panel_service::wake::Waker;
use panel_service::{ConfigReport, ConfigReporter, Panel, WorkerConfig};
use panel_web::HttpLimits;
use tokio::sync::watch;

use std::process::ExitCode;

use crate::config::FileConfig;
use crate::{CmdResult, Failed, bad_input};

#[derive(Args)]
pub(crate) struct WorkerArgs {
    /// Messages delivered at once [default: 4]
    #[arg(long, env = "PANEL_WORKER_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Threads that run the service's work: web server, worker, scheduler [default: one per
    /// core, less one with SQLite; at least 1]
    #[arg(long, env = "PANEL_THREADS")]
    threads: Option<usize>,
}

/// Most threads `threads` takes: far past any gain (the work waits on the network and the
/// database), well short of a process's memory going to thread stacks.
const MOST_THREADS: usize = 1024;

/// How many threads run a service's async work, and why that many (for the start-up log):
/// `--threads`, `PANEL_THREADS` or the file's `threads`; else one per core of `cores`, less
/// one with SQLite, whose writer runs every write on a thread of its own besides these. With
/// one per core there, they and the writer took turns on the cores and a message's request,
/// commit and delivery moved from thread to thread: on 2 cores one thread made ~6 context
/// switches per message ~4, and delivered 4-18 % more single API messages per second and 2-19 %
/// more events, for 12-17 % and 9-14 % less CPU each, the bulk API within its noise (README,
/// Performance). PostgreSQL's work runs in its own processes, usually on another machine: one
/// per core.
pub(crate) fn runtime_threads(
    args: &WorkerArgs,
    file: &FileConfig,
    cores: usize,
    sqlite: bool,
) -> Result<(usize, String), Failed> {
    let cores = cores.max(1);
    match args.threads.or(file.threads) {
        Some(n) if !(1..=MOST_THREADS).contains(&n) => Err(bad_input(format!(
            "threads {n} is out of range; use 1-{MOST_THREADS}, or leave it unset for one per core (less one with SQLite)"
        ))),
        Some(n) => Ok((n, "as configured".into())),
        None if sqlite => Ok(((cores - 1).max(1), format!("{cores} cores, less one for SQLite's writer"))),
        None => Ok((cores, "one per core".into())),
    }
}

pub(crate) fn worker_config(args: &WorkerArgs, file: &FileConfig) -> Result<WorkerConfig, Failed> {
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

/// `[web] trusted_proxies`, every entry checked (all problems at once).
pub(crate) fn trusted_proxies(file: &FileConfig) -> Result<Vec<panel_web::proxies::Cidr>, Failed> {
    let (ok, bad): (Vec<_>, Vec<_>) =
        file.web.trusted_proxies.iter().map(|t| panel_web::proxies::Cidr::parse(t)).partition(Result::is_ok);
    if !bad.is_empty() {
        let why: Vec<String> = bad.into_iter().filter_map(Result::err).collect();
        return Err(bad_input(format!("web.trusted_proxies: {}", why.join("; "))));
    }
    Ok(ok.into_iter().filter_map(Result::ok).collect())
}

/// The web server's limits from `[http]`, fitted into this process's descriptor limit (raised to
/// its hard limit first).
pub(crate) fn http_limits(file: &FileConfig, worker: &WorkerConfig) -> Result<HttpLimits, Failed> {
    let mut limits = HttpLimits::default();
    let section = &file.http;
    for (name, value, field) in [
        ("max_connections", section.max_connections, &mut limits.max_connections),
        ("max_connections_per_ip", section.max_connections_per_ip, &mut limits.max_per_ip),
    ] {
        if let Some(n) = value {
            if !(1..=100_000).contains(&n) {
                return Err(bad_input(format!("http.{name} {n} is out of range; use 1-100000")));
            }
            *field = n;
        }
    }
    if let Some(t) = &section.header_timeout {
        let d = panel_domain::duration::parse(t).map_err(|e| bad_input(format!("http.header_timeout: {e}")))?;
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&d) {
            return Err(bad_input(format!("http.header_timeout {t} is out of range; use 1s-10m")));
        }
        limits.header_timeout = d;
    }
    let (limits, lowered) = limits.fitted(panel_web::raise_descriptor_limit(), worker.concurrency);
    if let Some(why) = lowered {
        tracing::warn!("{why}");
    }
    Ok(limits)
}

/// `[retention]`: each a duration of at least a day, or "never".
pub(crate) fn retention_policy(file: &FileConfig) -> Result<RetentionPolicy, Failed> {
    let mut policy = RetentionPolicy::default();
    let section = &file.retention;
    for (name, value, field) in [
        ("content", &section.content, &mut policy.content),
        ("messages", &section.messages, &mut policy.messages),
        ("audit", &section.audit, &mut policy.audit),
    ] {
        let Some(v) = value else { continue };
        if v.trim().eq_ignore_ascii_case("never") {
            *field = None;
            continue;
        }
        let d =
            panel_domain::duration::parse(v).map_err(|e| bad_input(format!("retention.{name}: {e}; or \"never\"")))?;
        if d < Duration::from_secs(86_400) {
            return Err(bad_input(format!(
                "retention.{name} '{v}' is shorter than a day; use 1d or more, or \"never\""
            )));
        }
        *field = Some(d);
    }
    Ok(policy)
}

/// `[bounces]` as the service uses it: the mailbox and how often to read it; `None` when no
/// `imap_url` is set. Every problem at once, each naming its key.
pub(crate) fn bounce_mailbox(file: &FileConfig) -> Result<Option<(panel_service::BounceMailbox, Duration)>, Failed> {
    let section = &file.bounces;
    let Some(url) = &section.imap_url else {
        let others = section.imap_password_file.is_some()
            || section.imap_credential.is_some()
            || section.processed_folder.is_some();
        return match others {
            true => Err(bad_input("bounces: imap_url is required with the other [bounces] keys")),
            false => Ok(None),
        };
    };
    let mut problems = Vec::new();
    let parsed =
        panel_domain::bounce::ImapUrl::parse(url).map_err(|e| problems.push(format!("bounces.imap_url: {e}"))).ok();
    let token_endpoint = section.imap_token_endpoint.as_deref().and_then(|u| {
        panel_domain::EndpointUrl::parse(u).map_err(|e| problems.push(format!("bounces.imap_token_endpoint: {e}"))).ok()
    });
    let auth = match (&section.imap_password_file, &section.imap_credential) {
        (Some(_), Some(_)) => {
            problems.push("bounces: give imap_password_file or imap_credential, not both".to_string());
            None
        }
        (None, None) => {
            problems.push(
                "bounces: imap_password_file (a file holding the mailbox's password) or imap_credential \
                 (a stored credential) is required"
                    .to_string(),
            );
            None
        }
        (Some(f), None) => match std::fs::read_to_string(f) {
            Ok(p) => Some(panel_service::MailboxAuth::Password(zeroize::Zeroizing::new(
                p.trim_end_matches(['\r', '\n']).to_string(),
            ))),
            Err(e) => {
                problems.push(format!("bounces.imap_password_file: cannot read {}: {e}", f.display()));
                None
            }
        },
        (None, Some(name)) => Some(panel_service::MailboxAuth::Credential { name: name.clone(), token_endpoint }),
    };
    let interval = match &section.interval {
        None => Duration::from_secs(60),
        Some(v) => match panel_domain::duration::parse(v) {
            Ok(d) if d >= Duration::from_secs(5) => d,
            Ok(_) => {
                problems.push(format!("bounces.interval '{v}' is shorter than 5s"));
                Duration::from_secs(60)
            }
            Err(e) => {
                problems.push(format!("bounces.interval: {e}"));
                Duration::from_secs(60)
            }
        },
    };
    let processed = section.processed_folder.clone().unwrap_or_else(|| "Panel/Bounces".into());
    if processed.trim().is_empty() || processed.chars().any(char::is_control) {
        problems.push("bounces.processed_folder must be a folder name".into());
    }
    match (parsed, auth) {
        (Some(url), Some(auth)) if problems.is_empty() => {
            let ca_file = section.imap_ca_file.clone();
            Ok(Some((panel_service::BounceMailbox { url, auth, ca_file, processed }, interval)))
        }
        _ => Err(bad_input(problems.join("; "))),
    }
}

/// Reads the bounce mailbox every `interval` until `stop`; a failed pass is logged and tried
/// again at the next one.
async fn read_mailbox_every(
    panel: Panel,
    mailbox: panel_service::BounceMailbox,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = panel.read_bounce_mailbox(&mailbox).await {
            tracing::warn!(error = %e, "could not read the bounce mailbox; trying again at the next interval");
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The config file a service loaded, watched while it runs.
pub(crate) struct ConfigSource {
    /// `--config`, or DATA_DIR/panel.toml (watched even when absent at start: it may appear).
    pub path: PathBuf,
    /// What the service runs with.
    pub loaded: FileConfig,
    /// The file's text as loaded; `None` when there was none.
    pub text: Option<String>,
}

/// How often a service looks at its config file; SIGHUP makes it look at once.
const CONFIG_POLL: Duration = Duration::from_secs(2);
/// A config file is a few lines; a larger one is not read (and said so).
const CONFIG_MAX: u64 = 1024 * 1024;

impl ConfigSource {
    fn report(&self, panel: &Panel, note: Option<String>) -> ConfigReport {
        ConfigReport {
            file: self.text.as_ref().map(|_| self.path.display().to_string()),
            authorities: panel.authorities().iter().map(|a| a.id()).collect(),
            note,
        }
    }

    /// The file's text now: `None` when it does not exist.
    fn read(&self) -> Result<Option<String>, String> {
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
            Ok(m) if m.len() > CONFIG_MAX => return Err(format!("it is larger than {CONFIG_MAX} bytes")),
            Ok(_) => {}
        }
        std::fs::read_to_string(&self.path).map(Some).map_err(|e| e.to_string())
    }
}

/// Watches the config file while the service runs (every `CONFIG_POLL`, and at once on
/// SIGHUP). `[license] authorities` apply at once: licenses are judged by the new trust and
/// held mail goes again. Any other change needs a restart, and the service says so where the
/// admin looks (`services list`, the dashboard, `smtp check`) until the file matches what it
/// runs with again. A file that cannot be read or parsed changes nothing and is reported.
async fn watch_config(panel: Panel, reporter: ConfigReporter, source: ConfigSource, mut stop: watch::Receiver<bool>) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let mut hangup: Option<()> = None;
    let file = source.path.display().to_string();
    let mut seen = source.text.clone();
    let mut license = source.loaded.license.clone();
    let mut published: Option<String> = None;
    loop {
        let signalled = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(CONFIG_POLL) => false,
            _ = hangup_signal(&mut hangup) => true,
        };
        let text = source.read();
        if signalled {
            tracing::info!(%file, "SIGHUP: re-reading the config file");
        } else if matches!(&text, Ok(t) if *t == seen) {
            continue;
        }
        let now = match text {
            Err(e) => Err(format!("config file {file} cannot be read: {e}")),
            Ok(t) => {
                seen = t.clone();
                match t {
                    None => Ok(FileConfig::default()),
                    Some(t) => FileConfig::parse(&source.path, &t),
                }
            }
        };
        let mut notes = Vec::new();
        match now {
            Err(e) => notes.push(format!("{e}; still running with the file as it was loaded")),
            Ok(now) => {
                if now.license != license {
                    match crate::trust::authorities(&now.license.authorities) {
                        Ok(keys) => {
                            let trusted = keys.len();
                            match panel.reload_authorities(keys).await {
                                Ok(released) => {
                                    tracing::info!(%file, trusted, released, "license authorities reloaded from the config file");
                                    license = now.license.clone();
                                }
                                Err(e) => notes.push(format!("license.authorities were not applied: {e}")),
                            }
                        }
                        Err(e) => notes.push(format!("license.authorities in {file} were not applied: {}", e.1)),
                    }
                }
                let restart = FileConfig::restart_needed(&source.loaded, &now);
                if !restart.is_empty() {
                    notes.push(format!(
                        "restart needed: {} changed in {file} since this service started (license.authorities apply \
                         without one)",
                        restart.join(", ")
                    ));
                }
            }
        }
        let note = (!notes.is_empty()).then(|| notes.join("; "));
        if note != published {
            match &note {
                Some(n) => tracing::warn!(%file, "{n}"),
                None => tracing::info!(%file, "the service runs with what its config file says"),
            }
            published = note.clone();
        }
        reporter.report(source.report(&panel, note)).await;
    }
}

#[cfg(unix)]
async fn hangup_signal(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn hangup_signal(_: &mut Option<()>) {
    std::future::pending().await
}

/// What `panel serve` listens on: the web UI and API, and the bounce listener (SMTP); and the
/// bounce mailbox it reads (`[bounces]`), with how often.
pub(crate) struct Listeners {
    pub http: Option<String>,
    pub bounces: Option<String>,
    /// The bounce listener's certificate and key: STARTTLS is offered with them.
    pub bounce_tls: Option<(PathBuf, PathBuf)>,
    pub mailbox: Option<(panel_service::BounceMailbox, Duration)>,
}

pub(crate) async fn serve(
    mut panel: Panel,
    listeners: Listeners,
    config: WorkerConfig,
    http: HttpLimits,
    proxies: Vec<panel_web::proxies::Cidr>,
    retention: RetentionPolicy,
    source: ConfigSource,
) -> CmdResult {
    // A missing or wrong master key stops the service here, with the reason, not at first use.
    let key = panel.open_vault().await.map_err(|e| Failed(1, format!("cannot start: {e}")))?;
    tracing::info!(file = %panel.master_key_file().display(), key, "master key loaded");
    let Listeners { http: listen, bounces, bounce_tls, mailbox } = listeners;
    let bounce_tls = match (&bounces, bounce_tls) {
        (_, None) => None,
        (None, Some(_)) => return Err(bad_input("--bounce-tls-cert and --bounce-tls-key need --bounce-listen")),
        (Some(_), Some((cert, key))) => Some(
            panel_relay::inbound::server_tls(&cert, &key).map_err(|e| bad_input(format!("--bounce-tls-cert: {e}")))?,
        ),
    };
    // Bound before anything runs, so a taken port stops the start with the reason.
    let bounce_listener = match &bounces {
        None => None,
        Some(addr) => {
            let parsed: SocketAddr = addr
                .parse()
                .map_err(|_| bad_input(format!("--bounce-listen '{addr}' is not ADDRESS:PORT, e.g. 0.0.0.0:2526")))?;
            let l = tokio::net::TcpListener::bind(parsed)
                .await
                .map_err(|e| Failed(1, format!("cannot listen for bounces on {addr}: {e}")))?;
            Some(l)
        }
    };
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
            if let Some(token) = panel.open_setup().await? {
                // The first start: a one-time link to make the first admin in the browser, on
                // the loopback address when the service listens there (or on every address).
                let port = l.local_addr().map(|a| a.port()).unwrap_or(parsed.port());
                let host = match parsed.ip() {
                    ip if ip.is_unspecified() || ip.is_loopback() => "127.0.0.1".to_string(),
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                };
                let link = format!("http://{host}:{port}/setup/{token}");
                println!(
                    "No admin account exists yet. Open this link within an hour to create the first one \
                     (it works once):\n\n    {link}\n\nOr, in a script: panel admin create NAME --role admin"
                );
                tracing::warn!(%link, "no admin account exists yet; the setup link makes the first one (once, within an hour)");
            }
            Some(l)
        }
    };
    let kind = if listen.is_some() { "serve" } else { "worker" };
    let handle = panel.register_service(kind, listen.clone(), Some(wake_port), source.report(&panel, None)).await?;
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
    let (p, reporter, rx) = (panel.clone(), handle.config_reporter(), stop_rx.clone());
    tasks.spawn("config watcher", async move {
        watch_config(p, reporter, source, rx).await;
        Ok(())
    });
    let (p, rx) = (panel.clone(), stop_rx.clone());
    tasks.spawn("retention janitor", async move {
        panel_service::retention::run_janitor(p, retention, rx).await;
        Ok(())
    });
    if let Some(l) = listener {
        let mut rx = stop_rx.clone();
        let panel = panel.clone();
        tasks.spawn("web server", async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            panel_web::serve(panel, l, http, proxies, shutdown).await.map_err(|e| e.to_string())
        });
    }
    if let Some((mailbox, interval)) = mailbox {
        let (p, rx) = (panel.clone(), stop_rx.clone());
        tracing::info!(mailbox = %mailbox.name(), "reading bounces from the mailbox");
        tasks.spawn("bounce mailbox", async move {
            read_mailbox_every(p, mailbox, interval, rx).await;
            Ok(())
        });
    }
    if let Some(l) = bounce_listener {
        let rx = stop_rx.clone();
        let handler = std::sync::Arc::new(panel_service::BounceHandler(panel.clone()));
        let name = panel_relay::local_hostname();
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "taking bounces by SMTP for the bounce domain");
        }
        tasks.spawn("bounce listener", async move {
            panel_relay::inbound::serve_inbound(l, name, Default::default(), bounce_tls, handler, rx).await;
            Ok(())
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

pub(crate) async fn shutdown_signal() {
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
