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

        self.connect_to(&addrs, t).await
    }

    async fn connect_to(&self, addrs: &[std::net::SocketAddr], t: &mut Transcript) -> Result<Connection, Failure> {
        let s = &self.settings;
        // RFC 5321 5.1: each address of the name in order, within this one attempt, until one
        // greets; a refused or silent connection, or a greeting that fails (421 on one address
        // of a dual-stack name), moves on to the next.
        let mut last = None;
        for (i, addr) in addrs.iter().enumerate() {
            let more = i + 1 < addrs.len();
            let stream = match timeout(s.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    let f =
                        Failure::new(Stage::Tcp, FailureKind::ConnectionRefused, format!("{addr}: connection refused"));
                    last = Some(self.next_address(f, more, t));
                    continue;
                }
                Ok(Err(e)) => {
                    last = Some(self.next_address(
                        Failure::new(Stage::Tcp, FailureKind::Io, format!("{addr}: {e}")),
                        more,
                        t,
                    ));
                    continue;
                }
                Err(_) => {
                    let f = Failure::new(
                        Stage::Tcp,
                        FailureKind::Timeout,
                        format!("{addr}: no answer within {}s", s.connect_timeout.as_secs()),
                    );
                    last = Some(self.next_address(f, more, t));
                    continue;
                }
            };
            stream.set_nodelay(true).ok();
            t.ok(Stage::Tcp, format!("connected to {addr}"), None);

            let mut conn = Connection {
                io: BufReader::new(Stream::Plain(stream)),
                data_timeout: s.data_timeout,
                max_recipients: s.recipients_per_transaction,
                ..Connection::closed(s.command_timeout)
            };
            if s.security == Security::Tls {
                conn = self.handshake(conn, true, t).await?;
            }
            // A session that fails after it opened (a refused password, no STARTTLS) still ends
            // with QUIT and a clean close.
            match self.session(&mut conn, t).await {
                Ok(()) => return Ok(conn),
                Err(f) => {
                    conn.quit(None).await;
                    if f.stage != Stage::Greeting || !more {
                        return Err(f);
                    }
                    let detail = format!("{addr}: {}", f.detail);
                    last = Some(self.next_address(Failure { detail, ..f }, more, t));
                }
            }
        }
        Err(last.unwrap_or_else(|| Failure::new(Stage::Dns, FailureKind::Dns, format!("{} has no address", s.host))))
    }

    /// Whether the server on this (silent, plain) connection speaks TLS: a ClientHello gets TLS
    /// back (a handshake, or an alert or certificate Panel would refuse) rather than SMTP text
    /// or nothing. Used only to name a failure; the connection is spent afterwards.
    async fn answers_tls(&self, conn: &mut Connection) -> bool {
        let spent = Connection::spent(self.settings.command_timeout);
        let Stream::Plain(tcp) = std::mem::replace(conn, spent).io.into_inner() else { return false };
        let Ok((config, _)) = TlsTrust::system().client_config() else { return false };
        let Ok(name) = tls::server_name(self.settings.tls_name()) else { return false };
        let probe = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
        match timeout(std::time::Duration::from_secs(5), probe).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).is_some_and(|e| {
                matches!(
                    e,
                    rustls::Error::InvalidCertificate(_)
                        | rustls::Error::AlertReceived(_)
                        | rustls::Error::PeerIncompatible(_)
                        | rustls::Error::PeerMisbehaved(_)
                )
            }),
            Err(_) => false,
        }
    }

    /// Records a failure on one address in the transcript when another address follows.
    fn next_address(&self, f: Failure, more: bool, t: &mut Transcript) -> Failure {
        if more {
            let mut shown = f.clone();
            shown.detail = format!("{}; trying the next address", f.detail);
            t.failed(&shown);
        }
        f
    }

    /// Greeting, EHLO, STARTTLS and authentication on an open connection.
    async fn session(&self, conn: &mut Connection, t: &mut Transcript) -> Result<(), Failure> {
        let s = &self.settings;
        let greeting = match conn.read(Stage::Greeting).await {
            Ok(g) => g,
            // Silence where a greeting belongs may be a server waiting for our TLS ClientHello.
            Err(f) if f.kind == FailureKind::Timeout && s.security != Security::Tls => {
                return Err(match self.answers_tls(conn).await {
                    true => Failure::new(
                        Stage::Greeting,
                        FailureKind::TlsModeMismatch,
                        format!("{}; the port answers a TLS handshake instead: it expects implicit TLS", f.detail),
                    ),
                    false => f,
                });
            }
            Err(f) => return Err(f),
        };
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
                let plain = std::mem::replace(conn, Connection::spent(s.command_timeout));
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
            max_recipients: conn.max_recipients,
            ..Connection::closed(conn.timeout)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use panel_domain::SettingsDoc;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    /// A one-connection SMTP double on `ip`: greets with `greeting`, answers EHLO and QUIT.
    async fn double(ip: &str, greeting: &'static str) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read).lines();
            let mut heard = Vec::new();
            write.write_all(format!("{greeting}\r\n").as_bytes()).await.unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                heard.push(line.clone());
                let reply = if line.starts_with("EHLO") { "250 double.test" } else { "221 bye" };
                let _ = write.write_all(format!("{reply}\r\n").as_bytes()).await;
                if line == "QUIT" {
                    break;
                }
            }
            heard
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_421_greeting_on_the_first_address_moves_on_to_the_next_within_one_attempt() {
        // A dual-stack name's first address says 421; the next one greets.
        let (busy, busy_heard) = double("127.0.0.2", "421 4.3.2 too busy, try another").await;
        let (good, _) = double("127.0.0.1", "220 double.test ESMTP").await;
        let doc = SettingsDoc {
            host: Some("relay.test".into()),
            security: Some("none".into()),
            from: Some("p@example.org".into()),
            fallback_recipient: Some("o@example.org".into()),
            ..SettingsDoc::default()
        };
        let relay = Relay::new(Arc::new(RelaySettings::validate(&doc).unwrap()), None).unwrap();
        let mut t = Transcript::default();
        let conn = relay.connect_to(&[busy, good], &mut t).await.expect("the second address greets");
        assert!(conn.is_reusable());
        let failed: Vec<_> = t.events.iter().filter(|e| !e.ok).map(|e| e.detail.clone()).collect();
        assert_eq!(failed.len(), 1, "{t:#?}");
        assert!(
            failed[0].starts_with(&format!("{busy}: ")) && failed[0].ends_with("trying the next address"),
            "{failed:?}"
        );
        assert!(t.events.iter().any(|e| e.ok && e.detail == format!("connected to {good}")), "{t:#?}");
        assert_eq!(busy_heard.await.unwrap(), ["QUIT"], "the refusing address is left with QUIT");
        // With no address left, the last failure is the attempt's.
        let (busy, _) = double("127.0.0.2", "421 4.3.2 too busy").await;
        let f = relay.connect_to(&[busy], &mut Transcript::default()).await.err().expect("nothing greets");
        assert_eq!((f.stage, f.reply.map(|r| r.code)), (Stage::Greeting, Some(421)));
    }
}
