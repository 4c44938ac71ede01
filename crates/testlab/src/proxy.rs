//! A TCP forwarder in front of the real relay, for outage tests: stop it and the relay is
//! "down" (connection refused), start it again on the same port and the relay is back.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct Proxy {
    pub port: u16,
    target: u16,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A stopped proxy on a free port; `start` opens it.
    pub fn new(target: u16) -> Proxy {
        let port = crate::free_port();
        Proxy { port, target, task: None }
    }

    pub async fn start(&mut self) {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], self.port))).await.expect("proxy port");
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Stops accepting; the port refuses connections until `start`.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}
