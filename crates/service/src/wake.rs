//! Wake-ups: a worker sleeps until a step is enqueued instead of polling fast. Inside one process
//! a `Notify` does it; on SQLite another process (the CLI) pokes the running services' loopback
//! UDP port; on PostgreSQL every service LISTENs and every enqueue NOTIFYs, across hosts.
//! A slow poll stays as the safety net, so a lost wake-up only delays, never loses, a step.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct Waker {
    notify: Arc<Notify>,
    /// The loopback port it listens on, once `listen` ran: an enqueue in this process wakes
    /// its worker directly and does not poke its own port as well.
    port: Arc<std::sync::OnceLock<u16>>,
}

impl Waker {
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    pub async fn woken(&self) {
        self.notify.notified().await;
    }

    /// Listens on an ephemeral loopback port; returns the port to register.
    pub async fn listen(&self) -> std::io::Result<u16> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = socket.local_addr()?.port();
        let _ = self.port.set(port);
        let notify = self.notify.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 16];
            while socket.recv_from(&mut buf).await.is_ok() {
                notify.notify_one();
            }
        });
        Ok(port)
    }

    /// The port `listen` opened, if it ran.
    pub fn port(&self) -> Option<u16> {
        self.port.get().copied()
    }
}

/// How long a service leaves mail another service enqueued to that service's own workers
/// before it looks too. The enqueuing service wakes its workers at its commit; the others hear
/// of it by a NOTIFY at about the same time, and with all of them claiming at every enqueue
/// most of their claims came back empty (the mail was taken), each a round trip and a wake-up
/// of a process and of its database connection. Looking a moment later, once for all the
/// wake-ups of that moment, still takes whatever the enqueuing service leaves (its workers are
/// busy), a few ms later.
pub const HAND_OFF: std::time::Duration = std::time::Duration::from_millis(10);

/// Forwards PostgreSQL wake-ups to `waker` for as long as the process runs (no-op on SQLite):
/// another service's after `HAND_OFF` (all of them within it as one), this store's own not at
/// all (its workers were woken at the commit).
pub async fn listen_shared(store: &panel_store::Store, waker: Waker) -> panel_store::Result<()> {
    let Some(mut subscription) = store.subscribe_wakes().await? else { return Ok(()) };
    let waiting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        loop {
            match subscription.next().await {
                Ok(panel_store::WakeFrom::ThisStore) => {}
                Ok(panel_store::WakeFrom::Another) => {
                    if !waiting.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        let (waiting, waker) = (waiting.clone(), waker.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(HAND_OFF).await;
                            waiting.store(false, std::sync::atomic::Ordering::Release);
                            waker.wake();
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "wake-up channel lost; reconnecting (the poll covers the gap)");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(())
}

/// Pokes the given loopback ports; best effort. One socket serves every poke of the process
/// (an enqueue is not worth a socket of its own); a plain one, since a datagram to loopback
/// does not block and the socket outlives any one runtime.
pub fn poke(ports: impl IntoIterator<Item = u16>) {
    static SOCKET: std::sync::OnceLock<Option<std::net::UdpSocket>> = std::sync::OnceLock::new();
    let mut ports = ports.into_iter().peekable();
    if ports.peek().is_none() {
        return;
    }
    let socket = SOCKET.get_or_init(|| {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
        socket.set_nonblocking(true).ok()?;
        Some(socket)
    });
    let Some(socket) = socket else { return };
    for port in ports {
        let _ = socket.send_to(b"wake", SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
}
