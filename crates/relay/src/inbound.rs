//! Panel's bounce listener: a small SMTP server that takes mail for the bounce domain only
//! (the relay routes that domain to it), refuses everything else with 550 and never relays.
//! Every input is bounded: line length, recipients, message size, time per command, and the
//! connections at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// What the listener asks of the service.
pub trait InboundHandler: Send + Sync + 'static {
    /// The bounce domain in force (none: every recipient is refused).
    fn domain(&self) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>>;
    /// A received message for `recipients`: `Ok` once it is stored (250), else why (451).
    fn deliver(
        &self,
        recipients: Vec<String>,
        data: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// Bounds of one session.
#[derive(Debug, Clone, Copy)]
pub struct InboundLimits {
    pub max_line: usize,
    pub max_recipients: usize,
    pub max_message: usize,
    pub command_timeout: Duration,
    pub max_connections: usize,
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits {
            // RFC 5321 4.5.3.1: 512 for a command line, 1000 for a text line; a little room.
            max_line: 4096,
            max_recipients: 100,
            max_message: panel_domain::bounce::MAX_REPORT,
            command_timeout: Duration::from_secs(300),
            max_connections: 64,
        }
    }
}

/// The listener's certificate for STARTTLS: a PEM chain and its private key (TLS 1.2 and 1.3).
pub fn server_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("the certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("the certificate {} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("the key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
    Ok(Arc::new(config))
}

/// Serves until `shutdown` turns true. `name` is the host name in the greeting; with `tls`,
/// STARTTLS is offered (RFC 3207).
pub async fn serve_inbound(
    listener: TcpListener,
    name: String,
    limits: InboundLimits,
    tls: Option<Arc<ServerConfig>>,
    handler: Arc<dyn InboundHandler>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "bounce listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Busy: a sender retries a 421 later; nothing is lost.
            let mut stream = stream;
            let _ = stream.write_all(b"421 4.3.2 too many connections, try again later\r\n").await;
            continue;
        };
        let (handler, name, tls) = (handler.clone(), name.clone(), tls.clone());
        tokio::spawn(async move {
            if let Err(e) = session(stream, &name, limits, tls, &*handler).await {
                tracing::debug!(%peer, error = %e, "bounce listener: session ended");
            }
            drop(permit);
        });
    }
}

/// Reads one line of at most `max` bytes (CRLF or LF ended, without it); `None` at EOF, an
/// error for a longer line.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = (&mut *r).take(max as u64 + 2).read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "line too long"));
    }
    line.pop();
    if line.ends_with(b"\r") {
        line.pop();
    }
    Ok(Some(line))
}

/// The address inside `<...>` of a MAIL or RCPT argument (parameters after it ignored).
fn path_of(arg: &str) -> Option<&str> {
    let open = arg.find('<')?;
    let close = arg[open..].find('>')? + open;
    Some(arg[open + 1..close].trim())
}

/// How a session's dialogue ended.
enum Ended {
    Closed,
    /// The client asked for TLS and was told to go ahead: the dialogue starts again over TLS.
    StartTls,
}

async fn session(
    stream: TcpStream,
    name: &str,
    limits: InboundLimits,
    tls: Option<Arc<ServerConfig>>,
    handler: &dyn InboundHandler,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    reader.get_mut().write_all(format!("220 {name} ESMTP Panel bounce listener\r\n").as_bytes()).await?;
    match dialogue(&mut reader, name, limits, tls.is_some(), handler).await? {
        Ended::Closed => Ok(()),
        Ended::StartTls => {
            // RFC 3207 5: nothing the client sent before the handshake may be taken after it.
            if !reader.buffer().is_empty() {
                return Err(std::io::Error::other("data after STARTTLS before the handshake"));
            }
            let config = tls.expect("STARTTLS is offered only with a certificate");
            let accept = tokio_rustls::TlsAcceptor::from(config).accept(reader.into_inner());
            let stream = tokio::time::timeout(limits.command_timeout, accept)
                .await
                .map_err(|_| std::io::Error::other("the TLS handshake timed out"))??;
            // The session starts over: no greeting, the client's EHLO first.
            let mut reader = BufReader::new(stream);
            dialogue(&mut reader, name, limits, false, handler).await.map(|_| ())
        }
    }
}

/// The SMTP dialogue on one stream, until QUIT, EOF, an error or STARTTLS (when `offer_tls`).
async fn dialogue<S: AsyncRead + AsyncWrite + Unpin + Send>(
    reader: &mut BufReader<S>,
    name: &str,
    limits: InboundLimits,
    offer_tls: bool,
    handler: &dyn InboundHandler,
) -> std::io::Result<Ended> {
    let mut mail_from: Option<String> = None;
    let mut rcpts: Vec<String> = Vec::new();
    let timeout = limits.command_timeout;
    loop {
        let line = match tokio::time::timeout(timeout, read_line(reader, limits.max_line)).await {
            Err(_) => {
                reader.get_mut().write_all(b"421 4.4.2 idle too long, closing connection\r\n").await?;
                return Ok(Ended::Closed);
            }
            Ok(Err(e)) => {
                let _ = reader.get_mut().write_all(b"500 5.5.2 line too long, closing connection\r\n").await;
                return Err(e);
            }
            Ok(Ok(None)) => return Ok(Ended::Closed),
            Ok(Ok(Some(l))) => String::from_utf8_lossy(&l).into_owned(),
        };
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
            None => (line.trim().to_ascii_uppercase(), String::new()),
        };
        let reply: String = match verb.as_str() {
            "EHLO" => {
                let starttls = if offer_tls { "250-STARTTLS\r\n" } else { "" };
                let size = limits.max_message;
                format!("250-{name}\r\n250-SIZE {size}\r\n250-8BITMIME\r\n{starttls}250 ENHANCEDSTATUSCODES")
            }
            "HELO" => format!("250 {name}"),
            "NOOP" => "250 2.0.0 ok".into(),
            "RSET" => {
                (mail_from, rcpts) = (None, Vec::new());
                "250 2.0.0 ok".into()
            }
            "QUIT" => {
                reader.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(Ended::Closed);
            }
            "VRFY" => "252 2.5.0 cannot verify".into(),
            "MAIL" if !arg.to_ascii_uppercase().starts_with("FROM:") => "501 5.5.4 syntax: MAIL FROM:<address>".into(),
            "MAIL" => match path_of(&arg[5..]) {
                None => "501 5.5.4 syntax: MAIL FROM:<address>".into(),
                Some(from) => {
                    (mail_from, rcpts) = (Some(from.to_string()), Vec::new());
                    "250 2.1.0 ok".into()
                }
            },
            "RCPT" if mail_from.is_none() => "503 5.5.1 MAIL first".into(),
            "RCPT" if rcpts.len() >= limits.max_recipients => "452 4.5.3 too many recipients".into(),
            "RCPT" => match arg.to_ascii_uppercase().starts_with("TO:").then(|| path_of(&arg[3..])).flatten() {
                None => "501 5.5.4 syntax: RCPT TO:<address>".into(),
                Some(to) => match handler.domain().await {
                    None => "550 5.7.1 this server takes only bounces, and no bounce domain is set".into(),
                    Some(domain)
                        if to.len() <= 320
                            && to.rsplit_once('@').is_some_and(|(_, d)| d.eq_ignore_ascii_case(&domain)) =>
                    {
                        rcpts.push(to.to_string());
                        "250 2.1.5 ok".into()
                    }
                    Some(domain) => format!("550 5.7.1 relaying denied: this server takes only bounces for {domain}"),
                },
            },
            "DATA" if rcpts.is_empty() => "503 5.5.1 RCPT first".into(),
            "DATA" => {
                reader.get_mut().write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n").await?;
                let mut data = Vec::new();
                let mut too_big = false;
                loop {
                    let line = match tokio::time::timeout(timeout, read_line(reader, 1000.max(limits.max_line))).await {
                        Err(_) => return Ok(Ended::Closed),
                        Ok(r) => r?,
                    };
                    let Some(line) = line else { return Ok(Ended::Closed) };
                    if line == b"." {
                        break;
                    }
                    // RFC 5321 4.5.2: a leading dot was doubled by the sender.
                    let line = line.strip_prefix(b".").unwrap_or(&line);
                    if data.len() + line.len() + 2 > limits.max_message {
                        too_big = true;
                        continue; // Read to the end, keep nothing more.
                    }
                    data.extend_from_slice(line);
                    data.extend_from_slice(b"\r\n");
                }
                let recipients = std::mem::take(&mut rcpts);
                mail_from = None;
                if too_big {
                    format!("552 5.3.4 message too big: at most {} bytes", limits.max_message)
                } else {
                    match handler.deliver(recipients, data).await {
                        Ok(()) => "250 2.0.0 ok: received".into(),
                        Err(why) => {
                            tracing::warn!(error = %why, "bounce listener: could not store a report; the sender retries");
                            "451 4.3.0 could not store it now, try again later".into()
                        }
                    }
                }
            }
            "STARTTLS" if offer_tls => {
                reader.get_mut().write_all(b"220 2.0.0 ready to start TLS\r\n").await?;
                return Ok(Ended::StartTls);
            }
            "STARTTLS" => "454 4.7.0 TLS not available".into(),
            _ => "500 5.5.2 command not recognised".into(),
        };
        reader.get_mut().write_all(format!("{reply}\r\n").as_bytes()).await?;
    }
}
