//! The HTTP server: hyper's HTTP/1 connections under limits. Every connection costs a file
//! descriptor, and the relay connections and the database need descriptors too: slow or idle
//! clients must never take them all (1,100 slow connections used to stop the UI, the API, the
//! health endpoints and mail delivery itself with "Too many open files").
//!
//! - A request's headers must arrive within `header_timeout`, and a keep-alive connection idle
//!   for that long is closed (hyper's header-read timer also runs while waiting for the next
//!   request on a kept-alive connection).
//! - At most `max_connections` are served at once; the next ones wait in the listen backlog,
//!   costing no descriptor of ours, until one ends. The cap is fitted below the process's
//!   descriptor limit, keeping `RESERVED_DESCRIPTORS` for everything else.
//! - At most `max_per_ip` from one address; more from it are closed at once, so one client
//!   cannot hold every slot.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::proxies::{Cidr, client_address};

/// Descriptors kept for what is not HTTP besides the relay connections (one per worker slot):
/// the database pool and its listener, the wake-up socket, log and key files, Kerberos, DNS.
pub const RESERVED_DESCRIPTORS: u64 = 192;

/// The client a request is from: the peer, or behind a trusted proxy the address it forwarded.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub max_per_ip: usize,
    pub header_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits { max_connections: 512, max_per_ip: 64, header_timeout: Duration::from_secs(10) }
    }
}

impl HttpLimits {
    /// The limits that fit into `descriptors` (the process's limit) with `relay_connections`
    /// (the worker's concurrency) and `RESERVED_DESCRIPTORS` kept, and what was lowered.
    pub fn fitted(self, descriptors: u64, relay_connections: usize) -> (HttpLimits, Option<String>) {
        let reserved = RESERVED_DESCRIPTORS + relay_connections as u64;
        let budget = usize::try_from(descriptors.saturating_sub(reserved)).unwrap_or(usize::MAX).max(16);
        if self.max_connections <= budget {
            return (self, None);
        }
        let lowered = HttpLimits {
            max_connections: budget,
            max_per_ip: self.max_per_ip.min(budget),
            header_timeout: self.header_timeout,
        };
        let why = format!(
            "http.max_connections lowered from {} to {budget}: the process may open {descriptors} files and \
             {reserved} are kept for the relay and the database; raise LimitNOFILE",
            self.max_connections
        );
        (lowered, Some(why))
    }
}

/// Raises this process's soft limit on open files to its hard limit (systemd's default soft
/// limit is 1,024 while the hard one is far higher) and returns the limit in force.
pub fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Connections open per client address; a slot is given back when its connection ends.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn take(table: &Arc<PerIp>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut open = table.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot { table: table.clone(), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Logs a refusal at most every ten seconds: a flood must not become a flood of log lines.
fn warn_now(last: &AtomicI64) -> bool {
    let now = chrono::Utc::now().timestamp();
    let before = last.load(Ordering::Relaxed);
    now - before >= 10 && last.compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
}

/// Serves `app` on `listener` under `limits` until `shutdown` resolves; then stops accepting and
/// lets the requests in flight finish.
pub async fn serve(
    app: axum::Router,
    listener: tokio::net::TcpListener,
    limits: HttpLimits,
    trusted: Arc<[Cidr]>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = Arc::new(PerIp::default());
    let last_warning = AtomicI64::new(0);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors despite the reserve (or a transient network error):
                    // wait a moment instead of spinning.
                    if warn_now(&last_warning) {
                        tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Every client of a trusted proxy shares its address: the proxy is not limited per address.
        let proxy = trusted.iter().any(|c| c.contains(peer.ip()));
        let ip_slot = match proxy {
            true => None,
            false => match PerIp::take(&per_ip, peer.ip(), limits.max_per_ip) {
                Some(s) => Some(s),
                None => {
                    if warn_now(&last_warning) {
                        tracing::warn!(client = %peer.ip(), limit = limits.max_per_ip, "too many HTTP connections from one address; closing the newest");
                    }
                    continue;
                }
            },
        };
        let app = app.clone();
        let mut stop = stop_rx.clone();
        let trusted = trusted.clone();
        connections.spawn(async move {
            let _held = (slot, ip_slot);
            let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                let forwarded = request.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok());
                let client = ClientAddr(client_address(peer.ip(), forwarded, &trusted));
                request.extensions_mut().insert(client);
                request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                app.clone().oneshot(request)
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = async { drop(stop.wait_for(|s| *s).await) } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(client = %peer, error = %e, "HTTP connection ended");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_fits_below_the_descriptor_limit() {
        let wanted = HttpLimits::default();
        assert_eq!(wanted.fitted(65_536, 4), (wanted, None));
        // systemd's default soft limit, with the reserve and four relay connections kept.
        let (fitted, why) = wanted.fitted(512, 64);
        assert_eq!((fitted.max_connections, fitted.max_per_ip), (256, 64));
        assert!(why.unwrap().contains("LimitNOFILE"));
        assert_eq!(wanted.fitted(100, 4).0.max_connections, 16, "never none");
    }

    #[test]
    fn one_address_gets_at_most_its_share_and_gives_slots_back() {
        let table = Arc::new(PerIp::default());
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| PerIp::take(&table, ip, 3).unwrap()).collect();
        assert!(PerIp::take(&table, ip, 3).is_none());
        assert!(PerIp::take(&table, "127.0.0.3".parse().unwrap(), 3).is_some(), "others are not affected");
        drop(held);
        assert!(PerIp::take(&table, ip, 3).is_some());
        assert!(table.0.lock().unwrap().len() <= 1, "emptied entries are removed");
    }
}
