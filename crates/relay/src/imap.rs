//! A small IMAP client (RFC 9051 / 3501 subset) for the mailbox bounces land in: implicit TLS
//! or STARTTLS (required), LOGIN, SELECT, UID SEARCH, UID FETCH BODY.PEEK[], UID MOVE (or COPY,
//! STORE \Deleted and UID EXPUNGE where MOVE is not offered). Every response is bounded: line
//! length, literal size, time per command.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::tls::{TlsTrust, server_name};

/// How the connection is protected: never plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImapSecurity {
    /// IMAPS, TLS from the first byte (port 993).
    Tls,
    /// IMAP with STARTTLS, required before anything is sent (port 143).
    Starttls,
}

/// How Panel signs in to the mailbox.
#[derive(Clone)]
pub enum ImapAuth {
    /// LOGIN with the mailbox's password (from a file on the service's machine).
    Password(Zeroizing<String>),
    /// A stored credential: a password (LOGIN), or an OAuth2 token (SASL XOAUTH2).
    Stored(std::sync::Arc<dyn crate::CredentialSource>),
}

#[derive(Clone)]
pub struct ImapConfig {
    pub host: String,
    pub port: u16,
    pub security: ImapSecurity,
    pub username: String,
    pub auth: ImapAuth,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

/// The longest response line read, and the biggest message fetched.
const MAX_LINE: usize = 64 * 1024;
const MAX_LITERAL: usize = panel_domain::bounce::MAX_REPORT + 64 * 1024;

/// A signed-in session; always over TLS.
pub type Session = ImapSession<tokio_rustls::client::TlsStream<TcpStream>>;

/// One response: its text lines joined (literals left out) and its literals, in order.
#[derive(Debug, Default)]
struct Response {
    untagged: Vec<(String, Vec<Vec<u8>>)>,
    status: String,
}

pub struct ImapSession<S> {
    io: BufReader<S>,
    tag: u32,
    timeout: Duration,
    capabilities: Vec<String>,
}

impl Session {
    /// Connects, secures the connection and signs in.
    pub async fn connect(c: &ImapConfig) -> Result<Session, String> {
        let tcp = tokio::time::timeout(c.timeout, TcpStream::connect((c.host.as_str(), c.port)))
            .await
            .map_err(|_| format!("connecting to {}:{} timed out", c.host, c.port))?
            .map_err(|e| format!("cannot connect to {}:{}: {e}", c.host, c.port))?;
        let tls = |tcp: TcpStream| async {
            let trust = TlsTrust::load(c.ca_file.as_deref(), None).map_err(|f| f.detail)?;
            let (config, _) = trust.client_config().map_err(|f| f.detail)?;
            let name = server_name(&c.host).map_err(|f| f.detail)?;
            let stream = tokio::time::timeout(c.timeout, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
                .await
                .map_err(|_| "the TLS handshake timed out".to_string())?
                .map_err(|e| format!("TLS with {}: {e}", c.host))?;
            Ok::<_, String>(stream)
        };
        let mut session = match c.security {
            ImapSecurity::Tls => ImapSession::over(tls(tcp).await?, c.timeout),
            ImapSecurity::Starttls => {
                let mut plain = ImapSession::over(tcp, c.timeout);
                plain.greeting().await?;
                plain.command("STARTTLS").await?;
                // The server waits for the handshake: nothing may be buffered past its OK.
                if !plain.io.buffer().is_empty() {
                    return Err("the server sent data after STARTTLS's OK; refusing the connection".into());
                }
                ImapSession::over(tls(plain.io.into_inner()).await?, c.timeout)
            }
        };
        if c.security == ImapSecurity::Tls {
            session.greeting().await?;
        }
        match &c.auth {
            ImapAuth::Password(password) => session.login(&c.username, password).await?,
            ImapAuth::Stored(source) => {
                let resolved = source.resolve(false).await.map_err(|f| f.detail)?;
                match resolved.secret {
                    crate::AuthSecret::Password { username, password } => {
                        session.login(&username, password.expose()).await?
                    }
                    crate::AuthSecret::XOAuth2 { user, token, .. } => session.xoauth2(&user, token.expose()).await?,
                }
            }
        }
        Ok(session)
    }

    pub async fn logout(mut self) {
        let _ = self.command("LOGOUT").await;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ImapSession<S> {
    fn over(io: S, timeout: Duration) -> ImapSession<S> {
        ImapSession { io: BufReader::new(io), tag: 0, timeout, capabilities: Vec::new() }
    }

    async fn greeting(&mut self) -> Result<(), String> {
        let (line, _) = self.read_response_line().await?;
        if !line.starts_with("* OK") && !line.starts_with("* PREAUTH") {
            return Err(format!("the server's greeting: {line}"));
        }
        Ok(())
    }

    /// SASL XOAUTH2 (the initial response inline, RFC 4959); a refusal's JSON challenge is
    /// answered with an empty line, as the mechanism asks, and the server's NO reported.
    async fn xoauth2(&mut self, user: &str, token: &str) -> Result<(), String> {
        use base64::Engine;
        let blob = Zeroizing::new(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
        let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(blob.as_bytes()));
        self.tag += 1;
        let tag = format!("p{}", self.tag);
        let line = Zeroizing::new(format!("{tag} AUTHENTICATE XOAUTH2 {}\r\n", encoded.as_str()));
        self.write_line(&line).await?;
        loop {
            let (text, _) = self.read_response_line().await?;
            if text.starts_with('+') {
                self.write_line("\r\n").await?;
                continue;
            }
            if let Some(rest) = text.strip_prefix(&format!("{tag} ")) {
                return match rest.split_whitespace().next() {
                    Some("OK") => self.learn_capabilities(rest).await,
                    _ => Err(format!(
                        "signing in as {user} with an OAuth2 token failed: {}",
                        rest.chars().take(300).collect::<String>()
                    )),
                };
            }
        }
    }

    async fn write_line(&mut self, line: &str) -> Result<(), String> {
        tokio::time::timeout(self.timeout, async {
            self.io.get_mut().write_all(line.as_bytes()).await?;
            self.io.get_mut().flush().await
        })
        .await
        .map_err(|_| "the server did not take the command in time".to_string())?
        .map_err(|e| format!("writing to the server: {e}"))
    }

    async fn login(&mut self, user: &str, password: &str) -> Result<(), String> {
        let r = self.command(&format!("LOGIN {} {}", quoted(user)?, quoted(password)?)).await.map_err(|e| {
            // The server's words, never the command (it holds the password).
            format!("signing in as {user} failed: {e}")
        })?;
        self.learn_capabilities(&r.status).await
    }

    /// The capabilities after signing in: from the OK's `[CAPABILITY ...]`, else asked for.
    async fn learn_capabilities(&mut self, status: &str) -> Result<(), String> {
        if let Some(caps) = status.split_once("[CAPABILITY ").map(|(_, c)| c.split(']').next().unwrap_or_default()) {
            self.capabilities = caps.split_whitespace().map(|c| c.to_ascii_uppercase()).collect();
        } else {
            let r = self.command("CAPABILITY").await?;
            if let Some((line, _)) = r.untagged.iter().find(|(l, _)| l.starts_with("* CAPABILITY")) {
                self.capabilities = line.split_whitespace().skip(2).map(|c| c.to_ascii_uppercase()).collect();
            }
        }
        Ok(())
    }

    /// Selects `folder`; its UIDVALIDITY (UIDs are comparable only under the same one).
    pub async fn select(&mut self, folder: &str) -> Result<u32, String> {
        let r = self.command(&format!("SELECT {}", quoted(folder)?)).await?;
        let validity = r
            .untagged
            .iter()
            .find_map(|(l, _)| {
                l.split_once("[UIDVALIDITY ").and_then(|(_, v)| v.split(']').next()?.trim().parse().ok())
            })
            .unwrap_or(0);
        Ok(validity)
    }

    /// The UIDs above `after`, ascending, at most `limit`.
    pub async fn uids_after(&mut self, after: u32, limit: usize) -> Result<Vec<u32>, String> {
        let r = self.command(&format!("UID SEARCH UID {}:*", after.saturating_add(1))).await?;
        let mut uids: Vec<u32> = r
            .untagged
            .iter()
            .filter(|(l, _)| l.starts_with("* SEARCH"))
            .flat_map(|(l, _)| l.split_whitespace().skip(2).filter_map(|u| u.parse().ok()).collect::<Vec<u32>>())
            .filter(|u| *u > after) // `N:*` always matches the last message, even below N.
            .collect();
        uids.sort_unstable();
        uids.truncate(limit);
        Ok(uids)
    }

    /// The whole message `uid`, without marking it seen.
    pub async fn fetch(&mut self, uid: u32) -> Result<Vec<u8>, String> {
        let r = self.command(&format!("UID FETCH {uid} BODY.PEEK[]")).await?;
        r.untagged
            .into_iter()
            .find(|(l, lits)| l.contains("FETCH") && !lits.is_empty())
            .and_then(|(_, mut lits)| lits.pop())
            .ok_or_else(|| format!("the server sent no body for UID {uid}"))
    }

    /// Makes `folder` unless it exists.
    pub async fn ensure_folder(&mut self, folder: &str) -> Result<(), String> {
        match self.command(&format!("CREATE {}", quoted(folder)?)).await {
            Ok(_) => Ok(()),
            Err(e) if e.contains("ALREADYEXISTS") || e.to_ascii_lowercase().contains("exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves message `uid` to `folder`.
    pub async fn move_to(&mut self, uid: u32, folder: &str) -> Result<(), String> {
        let folder = quoted(folder)?;
        if self.capabilities.iter().any(|c| c == "MOVE") {
            self.command(&format!("UID MOVE {uid} {folder}")).await?;
        } else {
            self.command(&format!("UID COPY {uid} {folder}")).await?;
            self.command(&format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)")).await?;
            if self.capabilities.iter().any(|c| c == "UIDPLUS") {
                self.command(&format!("UID EXPUNGE {uid}")).await?;
            }
        }
        Ok(())
    }

    /// Sends a tagged command and reads up to its completion: `Err` with the server's words
    /// for NO or BAD.
    async fn command(&mut self, cmd: &str) -> Result<Response, String> {
        self.tag += 1;
        let tag = format!("p{}", self.tag);
        // Zeroized: a LOGIN line holds the password.
        self.write_line(&Zeroizing::new(format!("{tag} {cmd}\r\n"))).await?;
        let verb = cmd.split(' ').take(if cmd.starts_with("UID ") { 2 } else { 1 }).collect::<Vec<_>>().join(" ");
        let mut response = Response::default();
        loop {
            let (text, literals) = self.read_response_line().await?;
            if let Some(rest) = text.strip_prefix(&format!("{tag} ")) {
                return match rest.split_whitespace().next() {
                    Some("OK") => {
                        response.status = rest.to_string();
                        Ok(response)
                    }
                    _ => Err(format!("{verb}: {}", rest.chars().take(300).collect::<String>())),
                };
            }
            if response.untagged.len() < 10_000 {
                response.untagged.push((text, literals));
            }
        }
    }

    /// One response line with its literals (`{N}` then N bytes, then the line goes on).
    async fn read_response_line(&mut self) -> Result<(String, Vec<Vec<u8>>), String> {
        let mut text = String::new();
        let mut literals = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = tokio::time::timeout(
                self.timeout,
                (&mut self.io).take(MAX_LINE as u64 + 2).read_until(b'\n', &mut line),
            )
            .await
            .map_err(|_| "the server did not answer in time".to_string())?
            .map_err(|e| format!("reading from the server: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            if !line.ends_with(b"\n") {
                return Err("the server sent a line longer than 64 KB".into());
            }
            let line = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string();
            let size = line
                .strip_suffix('}')
                .and_then(|l| l.rsplit_once('{'))
                .and_then(|(_, n)| n.trim_end_matches('+').parse::<usize>().ok());
            text.push_str(&line);
            let Some(size) = size else { return Ok((text, literals)) };
            if size > MAX_LITERAL {
                return Err(format!("the server sent a {size}-byte literal; at most {MAX_LITERAL}"));
            }
            let mut literal = vec![0u8; size];
            tokio::time::timeout(self.timeout, self.io.read_exact(&mut literal))
                .await
                .map_err(|_| "the server did not send the message in time".to_string())?
                .map_err(|e| format!("reading from the server: {e}"))?;
            literals.push(literal);
        }
    }
}

/// An IMAP quoted string; refuses what a quoted string cannot carry (CR, LF, NUL).
fn quoted(s: &str) -> Result<String, String> {
    if s.chars().any(|c| matches!(c, '\r' | '\n' | '\0')) {
        return Err("a name or password with a line break cannot be sent to an IMAP server".into());
    }
    Ok(format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
}
