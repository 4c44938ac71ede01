//! `panel serve` and `panel worker`: the worker, the scheduler and (for serve) the web server,
//! under a supervisor; a task that ends stops the process with the reason.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use panel_service::retention::RetentionPolicy;
use panel_service::supervisor::Supervisor;
use panel_service::wake::Waker;
use panel_service::{Panel, WorkerConfig};
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

pub(crate) async fn serve(
    mut panel: Panel,
    listen: Option<String>,
    config: WorkerConfig,
    http: HttpLimits,
    proxies: Vec<panel_web::proxies::Cidr>,
    retention: RetentionPolicy,
) -> CmdResult {
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
