//! One SMTP connection to the relay: connect, greeting, EHLO, STARTTLS or implicit TLS, AUTH,
//! then any number of transactions. Every network step is bounded by a timeout, and every
//! failure names its stage.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use panel_domain::{Failure, FailureKind, RecipientResult, RelaySettings, SendReport, SmtpReply, Stage};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use zeroize::Zeroizing;

use crate::tls::TlsInfo;
use crate::wire::{self, Extensions, ReadError, truncate};

/// One stage of the conversation as it happened, for `panel smtp check` and debugging.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct StageEvent {
    pub stage: Stage,
    pub ok: bool,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<SmtpReply>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Transcript {
    pub events: Vec<StageEvent>,
    pub tls: Option<TlsInfo>,
}

impl Transcript {
    pub(crate) fn ok(&mut self, stage: Stage, detail: impl Into<String>, reply: Option<&SmtpReply>) {
        self.events.push(StageEvent { stage, ok: true, detail: detail.into(), reply: reply.cloned() });
    }

    pub(crate) fn failed(&mut self, f: &Failure) {
        self.events.push(StageEvent { stage: f.stage, ok: false, detail: f.detail.clone(), reply: f.reply.clone() });
    }
}

/// `452 4.5.3` (or a 452 saying so): more recipients than the relay takes in one transaction.
fn too_many_recipients(f: &Failure) -> bool {
    f.reply.as_ref().is_some_and(|r| {
        r.code == 452
            && (r.enhanced.as_deref() == Some("4.5.3") || r.text.to_ascii_lowercase().contains("too many recipients"))
    })
}

fn recipient_result(reply: SmtpReply) -> RecipientResult {
    if reply.is_positive() {
        RecipientResult::Accepted
    } else {
        RecipientResult::Rejected(Failure::reply(Stage::Rcpt, reply))
    }
}

/// `host:port`, with IPv6 literals in brackets.
pub fn relay_address(s: &RelaySettings) -> String {
    if s.host.contains(':') { format!("[{}]:{}", s.host, s.port) } else { format!("{}:{}", s.host, s.port) }
}

/// This machine's host name, for EHLO when the settings name none. Read once per process: it
/// is asked on every enqueue (to find the local services to wake) and every relay rebuild.
pub fn local_hostname() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty() && panel_domain::settings::validate_host("helo_name", s).is_ok())
            .unwrap_or_else(|| "localhost".into())
    })
    .clone()
}

/// How long ending a session may take (QUIT's reply, the TLS close).
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Connection {
    pub(crate) io: BufReader<Stream>,
    pub(crate) timeout: Duration,
    /// The wait for the reply to the end of the message (`data_timeout`).
    pub(crate) data_timeout: Duration,
    /// Most RCPTs in one transaction (`recipients_per_transaction`).
    pub(crate) max_recipients: usize,
    pub encrypted: bool,
    pub extensions: Extensions,
    pub(crate) broken: bool,
}

impl Connection {
    /// A connection not yet open: the dialer fills in the stream.
    pub(crate) fn closed(timeout: Duration) -> Connection {
        Connection {
            io: BufReader::new(Stream::Closed),
            timeout,
            data_timeout: timeout,
            max_recipients: 100,
            encrypted: false,
            extensions: Extensions::default(),
            broken: false,
        }
    }

    /// What is left of a connection whose stream was taken (for a TLS handshake, or a probe):
    /// nothing to QUIT, nothing to reuse.
    pub(crate) fn spent(timeout: Duration) -> Connection {
        Connection { broken: true, ..Connection::closed(timeout) }
    }

    /// False after a network error or timeout: the conversation state is unknown.
    pub fn is_reusable(&self) -> bool {
        !self.broken
    }

    pub(crate) async fn read(&mut self, stage: Stage) -> Result<SmtpReply, Failure> {
        self.read_within(stage, self.timeout).await
    }

    async fn read_within(&mut self, stage: Stage, limit: Duration) -> Result<SmtpReply, Failure> {
        let result = match timeout(limit, wire::read_reply(&mut self.io)).await {
            Err(_) => Err(Failure::new(stage, FailureKind::Timeout, format!("no reply within {}s", limit.as_secs()))),
            Ok(Err(ReadError::Closed)) => Err(Failure::new(stage, FailureKind::Io, "the relay closed the connection")),
            Ok(Err(ReadError::ClosedMidLine(sent))) => Err(Failure::new(
                stage,
                FailureKind::Io,
                format!("the relay closed the connection in the middle of a reply (after {:?})", truncate(&sent, 80)),
            )),
            Ok(Err(ReadError::Io(e))) => Err(Failure::new(stage, FailureKind::Io, format!("connection error: {e}"))),
            Ok(Err(ReadError::Malformed(m))) => Err(Failure::new(stage, FailureKind::Protocol, m)),
            Ok(Ok(r)) => {
                tracing::trace!(target: "panel_relay::smtp", "S: {}", r.one_line());
                Ok(r)
            }
        };
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    async fn write(&mut self, stage: Stage, bytes: &[u8]) -> Result<(), Failure> {
        // Large bodies get more time: the limit is per command plus 1s per 64 KiB.
        let limit = self.timeout + Duration::from_secs((bytes.len() / 65536) as u64);
        let io = self.io.get_mut();
        let result = timeout(limit, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken = true;
                Err(Failure::new(stage, FailureKind::Io, format!("connection error while sending: {e}")))
            }
            Err(_) => {
                self.broken = true;
                Err(Failure::new(stage, FailureKind::Timeout, format!("sending took longer than {}s", limit.as_secs())))
            }
        }
    }

    /// Sends a line that carries a secret: the buffer is wiped afterwards.
    pub(crate) async fn secret_command(&mut self, stage: Stage, line: &str) -> Result<SmtpReply, Failure> {
        // Only the verb and mechanism are logged; what follows them is the secret.
        let shown: String = line.split(' ').take(2).collect::<Vec<_>>().join(" ");
        let shown = if line.starts_with("AUTH ") { shown } else { String::new() };
        tracing::trace!(target: "panel_relay::smtp", "C: {shown} ***");
        let mut bytes = Zeroizing::new(Vec::with_capacity(line.len() + 2));
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(stage, &bytes).await?;
        self.read(stage).await
    }

    /// Sends one command line and reads its reply.
    pub(crate) async fn command(&mut self, stage: Stage, line: &str) -> Result<SmtpReply, Failure> {
        debug_assert!(!line.contains(['\r', '\n']), "commands are single lines");
        tracing::trace!(target: "panel_relay::smtp", "C: {line}");
        self.write(stage, format!("{line}\r\n").as_bytes()).await?;
        self.read(stage).await
    }

    pub(crate) async fn ehlo(&mut self, helo: &str, t: &mut Transcript) -> Result<(), Failure> {
        let mut reply = self.command(Stage::Ehlo, &format!("EHLO {helo}")).await?;
        if matches!(reply.code, 500 | 502) {
            reply = self.command(Stage::Ehlo, &format!("HELO {helo}")).await?;
        }
        if reply.code != 250 {
            return Err(Failure::reply(Stage::Ehlo, reply));
        }
        self.extensions = Extensions::from_reply(&reply);
        t.ok(Stage::Ehlo, format!("extensions: {}", self.extensions.list.join(", ")), Some(&reply));
        Ok(())
    }

    /// MAIL FROM only: used by the check, which sends nothing.
    pub(crate) async fn probe(&mut self, from: &str, to: &str, t: &mut Transcript) -> Result<(), Failure> {
        let reply = self.command(Stage::Mail, &format!("MAIL FROM:<{from}>")).await?;
        if !reply.is_positive() {
            return Err(Failure::reply(Stage::Mail, reply));
        }
        // The envelope sender is named: with a bounce domain it is a VERP address the relay
        // must take as well as the From address.
        t.ok(Stage::Mail, format!("from <{from}>: {}", reply.one_line()), Some(&reply));
        let reply = self.command(Stage::Rcpt, &format!("RCPT TO:<{to}>")).await?;
        if !reply.is_positive() {
            self.reset().await;
            return Err(Failure::reply(Stage::Rcpt, reply));
        }
        t.ok(Stage::Rcpt, reply.one_line(), Some(&reply));
        Ok(())
    }

    /// One transaction: MAIL, RCPT for each recipient (each answered on its own), DATA.
    /// Sends `message` to `recipients`, in as many transactions as `max_recipients` and the
    /// relay's `452 4.5.3 too many recipients` ask for, one after the other on this connection.
    /// The recipients of a finished transaction are `Delivered` with its reply; a failure ends
    /// the attempt for those not yet delivered.
    ///
    /// With `envid` (a bounce domain is set) and a relay that offers DSN (RFC 3461), MAIL FROM
    /// asks for the headers back (`RET=HDRS`) under that envelope id, and each RCPT for a report
    /// on failure or delay only.
    pub async fn send(&mut self, from: &str, recipients: &[String], message: &[u8], envid: Option<&str>) -> SendReport {
        let mut report = SendReport {
            recipients: vec![RecipientResult::NotTried; recipients.len()],
            failure: None,
            data_reply: None,
        };
        let mut next: Vec<usize> = (0..recipients.len()).collect();
        while !next.is_empty() {
            let batch: Vec<usize> = next.iter().copied().take(self.max_recipients.max(1)).collect();
            let addresses: Vec<String> = batch.iter().map(|&i| recipients[i].clone()).collect();
            let mut part = SendReport {
                recipients: vec![RecipientResult::NotTried; batch.len()],
                failure: None,
                data_reply: None,
            };
            let result = self.transaction(from, &addresses, message, envid, &mut part).await;
            let done = result.is_ok();
            // RFC 5321 4.5.3.1.10: recipients refused as too many go in the next transaction,
            // now, as long as this one took some (else the refusal is a plain temporary one).
            let mut later: Vec<usize> = Vec::new();
            for (&i, r) in batch.iter().zip(part.recipients) {
                report.recipients[i] = match (r, &part.data_reply) {
                    (RecipientResult::Accepted, Some(reply)) if done => RecipientResult::Delivered(reply.clone()),
                    (RecipientResult::Rejected(f), _) if done && too_many_recipients(&f) => {
                        later.push(i);
                        RecipientResult::NotTried
                    }
                    (r, _) => r,
                };
            }
            match result {
                Ok(()) => {
                    report.data_reply = part.data_reply;
                    next = later.into_iter().chain(next.into_iter().skip(batch.len())).collect();
                }
                Err(f) => {
                    report.failure = Some(f);
                    if !self.broken {
                        self.reset().await;
                    }
                    break;
                }
            }
        }
        report
    }

    async fn transaction(
        &mut self,
        from: &str,
        recipients: &[String],
        message: &[u8],
        envid: Option<&str>,
        report: &mut SendReport,
    ) -> Result<(), Failure> {
        // Never 8-bit bytes to a relay that did not offer to take them: Panel encodes every
        // header and body it can, so only an address (a UTF-8 mailbox name) can need SMTPUTF8.
        let needs_utf8 = !from.is_ascii() || recipients.iter().any(|r| !r.is_ascii()) || !message.is_ascii();
        if needs_utf8 && !self.extensions.has("SMTPUTF8") {
            let addresses: Vec<&str> =
                std::iter::once(from).chain(recipients.iter().map(String::as_str)).filter(|a| !a.is_ascii()).collect();
            return Err(Failure::new(
                Stage::Mail,
                FailureKind::NeedsSmtputf8,
                format!(
                    "the relay does not offer SMTPUTF8, which the address {} needs; nothing was sent",
                    addresses.join(", ")
                ),
            ));
        }
        let data = wire::encode_data(message);
        let mut params = String::new();
        if let Some(limit) = self.extensions.size_limit() {
            // RFC 1870: declare the size, and do not transfer what the relay said it refuses.
            if limit > 0 && data.len() as u64 > limit {
                return Err(Failure::new(
                    Stage::Mail,
                    FailureKind::TooLarge,
                    format!(
                        "the message is {} bytes and the relay accepts at most {limit} (its SIZE); nothing was sent",
                        data.len()
                    ),
                ));
            }
            params.push_str(&format!(" SIZE={}", data.len()));
        }
        if needs_utf8 {
            params.push_str(" SMTPUTF8");
        }
        let dsn = envid.filter(|_| self.extensions.has("DSN"));
        if let Some(envid) = dsn {
            params.push_str(&format!(" RET=HDRS ENVID={}", panel_domain::bounce::xtext_encode(envid)));
        }
        let rcpt_to = |rcpt: &str| match dsn {
            Some(_) => format!(
                "RCPT TO:<{rcpt}> NOTIFY=FAILURE,DELAY ORCPT=rfc822;{}",
                panel_domain::bounce::xtext_encode(rcpt)
            ),
            None => format!("RCPT TO:<{rcpt}>"),
        };
        let mail = format!("MAIL FROM:<{from}>{params}");
        let data_reply = if self.extensions.has("PIPELINING") {
            // RFC 2920: MAIL, every RCPT and DATA in one write, then the replies in order. Two
            // round trips per message instead of three plus one per recipient.
            let mut batch = format!("{mail}\r\n");
            for rcpt in recipients {
                batch.push_str(&rcpt_to(rcpt));
                batch.push_str("\r\n");
            }
            batch.push_str("DATA\r\n");
            tracing::trace!(target: "panel_relay::smtp", "C: {}", batch.trim_end().replace("\r\n", " | "));
            self.write(Stage::Mail, batch.as_bytes()).await?;
            let mail_reply = self.read(Stage::Mail).await?;
            for (i, _) in recipients.iter().enumerate() {
                let reply = self.read(Stage::Rcpt).await?;
                report.recipients[i] = recipient_result(reply);
            }
            let data_reply = self.read(Stage::Data).await?;
            if !mail_reply.is_positive() {
                report.recipients.iter_mut().for_each(|r| *r = RecipientResult::NotTried);
                return Err(Failure::reply(Stage::Mail, mail_reply));
            }
            if !report.recipients.contains(&RecipientResult::Accepted) && data_reply.code == 354 {
                // A relay that accepted DATA without a recipient gets an empty, undeliverable body.
                self.write(Stage::Data, b".\r\n").await?;
                self.read(Stage::Data).await?;
            }
            data_reply
        } else {
            let reply = self.command(Stage::Mail, &mail).await?;
            if !reply.is_positive() {
                return Err(Failure::reply(Stage::Mail, reply));
            }
            for (i, rcpt) in recipients.iter().enumerate() {
                let reply = self.command(Stage::Rcpt, &rcpt_to(rcpt)).await?;
                report.recipients[i] = recipient_result(reply);
            }
            if report.recipients.contains(&RecipientResult::Accepted) {
                self.command(Stage::Data, "DATA").await?
            } else {
                SmtpReply { code: 0, enhanced: None, text: String::new() }
            }
        };
        if !report.recipients.contains(&RecipientResult::Accepted) {
            let first = report.recipients.iter().find(|r| matches!(r, RecipientResult::Rejected(_))).cloned();
            let detail = match &first {
                Some(RecipientResult::Rejected(f)) => format!("no recipient was accepted: {}", f.detail),
                _ => "no recipient was accepted".into(),
            };
            let failure = Failure::new(Stage::Rcpt, FailureKind::Reply, detail);
            return Err(match first {
                Some(r) => failure.with_reply_of(&r),
                None => failure,
            });
        }
        if data_reply.code != 354 {
            return Err(Failure::reply(Stage::Data, data_reply));
        }
        self.write(Stage::Data, &data).await?;
        // After the final dot the relay may have taken the message even if its reply never
        // comes: that is an unknown outcome, not a plain failure (a retry may deliver twice).
        let reply = match self.read_within(Stage::Data, self.data_timeout).await {
            Ok(r) => r,
            Err(f) if matches!(f.kind, FailureKind::Timeout | FailureKind::Io) => {
                return Err(Failure::new(
                    Stage::Data,
                    FailureKind::UnknownOutcome,
                    format!("{} after the whole message was sent; the relay may have accepted it", f.detail),
                ));
            }
            Err(f) => return Err(f),
        };
        if !reply.is_positive() {
            return Err(Failure::reply(Stage::Data, reply));
        }
        report.data_reply = Some(reply);
        Ok(())
    }

    /// Clears a failed transaction so the connection can carry the next one.
    pub async fn reset(&mut self) {
        if !matches!(self.command(Stage::Mail, "RSET").await, Ok(r) if r.is_positive()) {
            self.broken = true;
        }
    }

    /// Ends the session politely: QUIT (unless the conversation is broken), then the TLS
    /// close_notify and the TCP shutdown, each within a few seconds, so that relays log a
    /// clean end rather than "non-properly terminated" sessions.
    pub async fn quit(mut self, t: Option<&mut Transcript>) {
        self.timeout = self.timeout.min(QUIT_TIMEOUT);
        if !self.broken
            && let Ok(reply) = self.command(Stage::Quit, "QUIT").await
            && let Some(t) = t
        {
            t.ok(Stage::Quit, reply.one_line(), Some(&reply));
        }
        let _ = timeout(QUIT_TIMEOUT, self.io.get_mut().shutdown()).await;
    }
}

pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Closed,
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}
