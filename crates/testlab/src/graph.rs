//! A Microsoft Graph double on loopback, over HTTPS with the lab's test CA: `POST
//! /v1.0/users/{mailbox}/sendMail` with a MIME body (base64, `Content-Type: text/plain`), as
//! Graph takes it. It accepts only a live token its `TokenServer` issued for Graph whose roles
//! hold `Mail.Send`, sends only as the mailboxes of its access policy, decodes and keeps each
//! message, and answers Graph's refusals on demand (429 with Retry-After, 503, 400, 403, 404).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::oauth::TokenServer;

/// A message Graph accepted.
#[derive(Debug, Clone)]
pub struct GraphMessage {
    pub mailbox: String,
    /// The decoded MIME, as Panel built it.
    pub mime: String,
}

/// One answer the double gives instead of its own judgement.
struct Scripted {
    status: u16,
    code: String,
    message: String,
    retry_after: Option<u64>,
}

#[derive(Default)]
struct State {
    /// The access policy: the mailboxes the app may send as.
    allowed: Vec<String>,
    /// Mailboxes that exist without an Exchange Online licence.
    unlicensed: Vec<String>,
    script: VecDeque<Scripted>,
    received: Vec<GraphMessage>,
    /// When each sendMail request arrived.
    requests: Vec<Instant>,
}

#[derive(Clone)]
pub struct GraphDouble {
    pub port: u16,
    /// The CA that issued the double's certificate (for `--ca-file`).
    pub ca_file: PathBuf,
    state: Arc<Mutex<State>>,
    _dir: Arc<tempfile::TempDir>,
}

impl GraphDouble {
    pub fn start(tokens: &TokenServer, allowed: &[&str]) -> GraphDouble {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = crate::make_certificates(dir.path());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.path().join("server.pem")).unwrap().map(Result::unwrap).collect();
        let key = PrivateKeyDer::from_pem_file(dir.path().join("server.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            allowed: allowed.iter().map(|m| m.to_ascii_lowercase()).collect(),
            ..State::default()
        }));
        let double = GraphDouble { port, ca_file, state, _dir: Arc::new(dir) };
        let (d, t) = (double.clone(), tokens.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (d, t, config) = (d.clone(), t.clone(), config.clone());
                std::thread::spawn(move || {
                    let Ok(conn) = rustls::ServerConnection::new(config) else { return };
                    let mut tls = rustls::StreamOwned::new(conn, stream);
                    d.serve(&mut tls, &t);
                });
            }
        });
        double
    }

    /// `https://localhost:PORT` (the certificate names localhost and 127.0.0.1).
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The messages accepted so far.
    pub fn received(&self) -> Vec<GraphMessage> {
        self.state.lock().unwrap().received.clone()
    }

    /// When each sendMail request arrived, accepted or not.
    pub fn requests(&self) -> Vec<Instant> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The next sendMail request gets this answer (in order, one each).
    pub fn answer_next(&self, status: u16, code: &str, message: &str, retry_after: Option<u64>) {
        self.state.lock().unwrap().script.push_back(Scripted {
            status,
            code: code.into(),
            message: message.into(),
            retry_after,
        });
    }

    /// `mailbox` exists but has no Exchange Online licence (Graph: 404 MailboxNotEnabledForRESTAPI).
    pub fn set_unlicensed(&self, mailbox: &str) {
        self.state.lock().unwrap().unlicensed.push(mailbox.to_ascii_lowercase());
    }

    fn serve<S: Read + Write>(&self, stream: &mut S, tokens: &TokenServer) {
        let mut reader = BufReader::new(stream);
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let (mut length, mut authorization, mut content_type, mut client_request_id) =
            (0, String::new(), String::new(), None);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let v = v.trim().to_string();
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => length = v.parse().unwrap_or(0),
                    "authorization" => authorization = v,
                    "content-type" => content_type = v,
                    "client-request-id" => client_request_id = Some(v),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap_or_default();
        let (status, error, retry_after) = self.judge(&request_line, &authorization, &content_type, &body, tokens);
        let request_id = format!("req-{}-{}", self.port, crate::unique());
        let mut head = format!(
            "HTTP/1.1 {status} {}\r\nrequest-id: {request_id}\r\n",
            if status < 300 { "Accepted" } else { "Error" }
        );
        if let Some(id) = client_request_id {
            head.push_str(&format!("client-request-id: {id}\r\n"));
        }
        if let Some(secs) = retry_after {
            head.push_str(&format!("Retry-After: {secs}\r\n"));
        }
        let body = match error {
            None => String::new(),
            Some((code, message)) => serde_json::json!({"error": {
                "code": code, "message": message,
                "innerError": {"request-id": request_id, "date": "2026-12-06T00:00:00"}
            }})
            .to_string(),
        };
        let stream = reader.into_inner();
        let _ = write!(
            stream,
            "{head}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.flush();
    }

    /// Graph's answer: (status, error code and message, Retry-After).
    fn judge(
        &self,
        request_line: &str,
        authorization: &str,
        content_type: &str,
        body: &[u8],
        tokens: &TokenServer,
    ) -> (u16, Option<(String, String)>, Option<u64>) {
        let err =
            |status: u16, code: &str, message: &str| (status, Some((code.to_string(), message.to_string())), None);
        let mut state = self.state.lock().unwrap();
        let Some(mailbox) = request_line
            .strip_prefix("POST /v1.0/users/")
            .and_then(|rest| rest.split_once("/sendMail "))
            .map(|(m, _)| percent_decode(m).to_ascii_lowercase())
        else {
            return err(404, "UnknownError", "no such resource");
        };
        state.requests.push(Instant::now());
        if let Some(s) = state.script.pop_front() {
            return (s.status, Some((s.code, s.message)), s.retry_after);
        }
        let token = authorization.strip_prefix("Bearer ").unwrap_or("");
        if !tokens.accepts_for_graph(token) {
            return err(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience.");
        }
        if !roles(token).iter().any(|r| r == "Mail.Send") {
            return err(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.");
        }
        if state.unlicensed.contains(&mailbox) {
            return err(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            );
        }
        if !state.allowed.contains(&mailbox) {
            return err(
                403,
                "ErrorAccessDenied",
                "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly AccessPolicy settings.",
            );
        }
        if !content_type.starts_with("text/plain") {
            return err(400, "ErrorInvalidRequest", "MIME content must be sent as text/plain.");
        }
        let Ok(mime) = STANDARD.decode(body) else {
            return err(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.");
        };
        state.received.push(GraphMessage { mailbox, mime: String::from_utf8_lossy(&mime).into_owned() });
        (202, None, None)
    }
}

/// The roles in a token's JWT payload.
fn roles(token: &str) -> Vec<String> {
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|j| serde_json::from_slice::<serde_json::Value>(&j).ok());
    claims
        .and_then(|c| c["roles"].as_array().map(|r| r.iter().filter_map(|v| v.as_str().map(String::from)).collect()))
        .unwrap_or_default()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
