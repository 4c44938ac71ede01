//! The dialer: relay settings prepared for connecting (the TLS trust loaded once per settings
//! version), and the way to an authenticated session: TCP, greeting, EHLO, STARTTLS or implicit
//! TLS, AUTH. The session itself (transactions, QUIT) is `connection.rs`.

use std::sync::Arc;

use panel_domain::{Failure, FailureKind, RelaySettings, Security, Stage};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::auth::{self, CredentialSource};
use crate::connection::{Connection, Stream, Transcript, local_hostname, relay_address};
use crate::tls::{self, TlsInfo, TlsTrust};

/// The relay settings prepared for connecting: the TLS trust is loaded once per settings version.
#[derive(Clone)]
pub struct Relay {
    pub settings: Arc<RelaySettings>,
    trust: Option<TlsTrust>,
    helo: String,
    credentials: Option<Arc<dyn CredentialSource>>,
}

impl Relay {
    /// `credentials` resolves stored credentials and OAuth2 tokens when the settings use them.
    pub fn new(settings: Arc<RelaySettings>, credentials: Option<Arc<dyn CredentialSource>>) -> Result<Relay, Failure> {
        let trust = match settings.security {
            Security::None => None,
            _ => Some(TlsTrust::load(settings.ca_file.as_deref(), settings.pin_sha256)?),
        };
        let helo = settings.helo_name.clone().unwrap_or_else(local_hostname);
        Ok(Relay { settings, trust, helo, credentials })
    }

    /// `host:port`, as shown in logs and attempts.
    pub fn address(&self) -> String {
        relay_address(&self.settings)
    }

    /// Opens a connection ready for MAIL FROM, recording each stage in `transcript`.
    pub async fn connect(&self, transcript: &mut Transcript) -> Result<Connection, Failure> {
        let result = self.connect_inner(transcript).await;
        if let Err(f) = &result {
            transcript.failed(f);
        }
        result
    }

    async fn connect_inner(&self, t: &mut Transcript) -> Result<Connection, Failure> {
        let s = &self.settings;
        let addrs: Vec<_> = match timeout(s.connect_timeout, tokio::net::lookup_host((s.host.as_str(), s.port))).await {
            Err(_) => {
                return Err(Failure::new(
                    Stage::Dns,
                    FailureKind::Timeout,
                    format!("resolving {} took longer than {:?}", s.host, s.connect_timeout),
                ));
            }
            Ok(Err(e)) => {
                return Err(Failure::new(Stage::Dns, FailureKind::Dns, format!("cannot resolve {}: {e}", s.host)));
            }
            Ok(Ok(a)) => a.collect(),
        };
        t.ok(
            Stage::Dns,
            format!("{} -> {}", s.host, addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ")),
            None,
        );

        let mut last = None;
        let mut tcp = None;
        for addr in &addrs {
            match timeout(s.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    tcp = Some((stream, *addr));
                    break;
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    last = Some(Failure::new(
                        Stage::Tcp,
                        FailureKind::ConnectionRefused,
                        format!("{addr}: connection refused"),
                    ));
                }
                Ok(Err(e)) => last = Some(Failure::new(Stage::Tcp, FailureKind::Io, format!("{addr}: {e}"))),
                Err(_) => {
                    last = Some(Failure::new(
                        Stage::Tcp,
                        FailureKind::Timeout,
                        format!("{addr}: no answer within {}s", s.connect_timeout.as_secs()),
                    ));
                }
            }
        }
        let Some((stream, addr)) = tcp else {
            return Err(last
                .unwrap_or_else(|| Failure::new(Stage::Dns, FailureKind::Dns, format!("{} has no address", s.host))));
        };
        stream.set_nodelay(true).ok();
        t.ok(Stage::Tcp, format!("connected to {addr}"), None);

        let mut conn = Connection {
            io: BufReader::new(Stream::Plain(stream)),
            data_timeout: s.data_timeout,
            ..Connection::closed(s.command_timeout)
        };
        if s.security == Security::Tls {
            conn = self.handshake(conn, true, t).await?;
        }
        // A session that fails after it opened (a refused password, no STARTTLS) still ends
        // with QUIT and a clean close.
        match self.session(&mut conn, t).await {
            Ok(()) => Ok(conn),
            Err(f) => {
                conn.quit(None).await;
                Err(f)
            }
        }
    }

    /// Greeting, EHLO, STARTTLS and authentication on an open connection.
    async fn session(&self, conn: &mut Connection, t: &mut Transcript) -> Result<(), Failure> {
        let s = &self.settings;
        let greeting = conn.read(Stage::Greeting).await?;
        if greeting.code != 220 {
            return Err(Failure::reply(Stage::Greeting, greeting));
        }
        t.ok(Stage::Greeting, greeting.one_line(), Some(&greeting));
        conn.ehlo(&self.helo, t).await?;

        let offered = conn.extensions.has("STARTTLS");
        match s.security {
            Security::Starttls if !offered => {
                return Err(Failure::new(
                    Stage::Ehlo,
                    FailureKind::StarttlsNotOffered,
                    "the relay did not offer STARTTLS",
                ));
            }
            Security::Starttls | Security::Opportunistic if offered => {
                let reply = conn.command(Stage::Starttls, "STARTTLS").await?;
                if reply.code != 220 {
                    return Err(Failure::reply(Stage::Starttls, reply));
                }
                if !conn.io.buffer().is_empty() {
                    // Anything sent before the handshake could be injected by a man in the middle.
                    return Err(Failure::new(
                        Stage::Starttls,
                        FailureKind::Protocol,
                        "the relay sent data after its STARTTLS reply; refusing (possible command injection)",
                    ));
                }
                t.ok(Stage::Starttls, reply.one_line(), Some(&reply));
                // Until the handshake gives the connection back, a failure leaves nothing to QUIT.
                let gone = Connection { broken: true, ..Connection::closed(s.command_timeout) };
                let plain = std::mem::replace(conn, gone);
                *conn = self.handshake(plain, false, t).await?;
                conn.ehlo(&self.helo, t).await?;
            }
            _ => {}
        }
        if let Some(name) = s.auth.credential().filter(|_| !s.credential_attached) {
            return Err(Failure::new(
                Stage::Auth,
                FailureKind::Credential,
                format!(
                    "the stored credential '{name}' was detached when the relay's host, port or security changed, \
                     so it is not sent to {}; confirm it for this relay with: panel smtp set --credential {name}",
                    relay_address(s)
                ),
            ));
        }
        auth::authenticate(conn, s, self.credentials.as_deref(), t).await
    }

    async fn handshake(&self, conn: Connection, implicit: bool, t: &mut Transcript) -> Result<Connection, Failure> {
        let trust = self.trust.as_ref().expect("TLS modes load their trust");
        let (config, verifier) = trust.client_config()?;
        let name = tls::server_name(self.settings.tls_name())?;
        let Stream::Plain(tcp) = conn.io.into_inner() else { unreachable!("handshake runs once, on a plain stream") };
        let connector = tokio_rustls::TlsConnector::from(config);
        let stream = match timeout(self.settings.command_timeout, connector.connect(name, tcp)).await {
            Err(_) => {
                return Err(Failure::new(
                    Stage::Tls,
                    FailureKind::Timeout,
                    format!("the TLS handshake did not finish within {}s", self.settings.command_timeout.as_secs()),
                ));
            }
            Ok(Err(e)) => {
                let failure = tls::handshake_failure(&e, &verifier, implicit);
                if let Some(cert) = verifier.seen_certificate() {
                    let mut info = TlsInfo { verification: failure.detail.clone(), ..Default::default() };
                    tls::describe_certificate(&cert, &mut info);
                    t.tls = Some(info);
                }
                return Err(failure);
            }
            Ok(Ok(s)) => s,
        };
        let (_, session) = stream.get_ref();
        let mut info = TlsInfo {
            protocol: session
                .protocol_version()
                .map(|v| format!("{v:?}").replace("TLSv1_", "TLSv1."))
                .unwrap_or_default(),
            cipher_suite: session.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default(),
            verification: if self.settings.pin_sha256.is_some() { "pinned fingerprint matches" } else { "trusted" }
                .into(),
            ..Default::default()
        };
        if let Some(cert) = session.peer_certificates().and_then(|c| c.first()) {
            tls::describe_certificate(cert, &mut info);
        }
        t.ok(
            Stage::Tls,
            format!("{} {}, certificate {} ({})", info.protocol, info.cipher_suite, info.subject, info.verification),
            None,
        );
        t.tls = Some(info);
        Ok(Connection {
            io: BufReader::new(Stream::Tls(Box::new(stream))),
            encrypted: true,
            data_timeout: conn.data_timeout,
            ..Connection::closed(conn.timeout)
        })
    }
}
