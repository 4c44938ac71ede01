//! OAuth2 test doubles on loopback: a token endpoint speaking the Microsoft client-credentials
//! and Google JWT-bearer grants, and an SMTP server that accepts AUTH XOAUTH2 only with a live
//! token that endpoint issued. Plain blocking threads: each test owns its servers.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

/// What the endpoint accepts as the client's proof.
enum Client {
    Microsoft {
        client_id: String,
        client_secret: String,
    },
    /// An app with a certificate credential: the assertion must verify with this key and name
    /// this certificate's SHA-256 thumbprint.
    MicrosoftCertificate {
        client_id: String,
        public_key_pkcs1: Vec<u8>,
        x5t_s256: String,
    },
    Google {
        client_email: String,
        public_key_pkcs1: Vec<u8>,
    },
}

struct Issued {
    token: String,
    expires: Instant,
    revoked: bool,
    /// Google: the mailbox the token was delegated for.
    subject: Option<String>,
    /// The scope it was asked for: SMTP's or Graph's.
    scope: String,
}

struct TokenState {
    client: Client,
    lifetime: Duration,
    issued: Vec<Issued>,
    /// The application roles a Microsoft token carries (the app's admin-consented permissions).
    roles: Vec<String>,
    /// Who introspection says an app-only token belongs to.
    introspect_as: Option<String>,
}

/// The scopes a Microsoft client may ask for.
pub const OUTLOOK_SCOPE: &str = "https://outlook.office365.com/.default";
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

/// A token endpoint at `http://127.0.0.1:PORT/token`.
#[derive(Clone)]
pub struct TokenServer {
    pub port: u16,
    state: Arc<Mutex<TokenState>>,
}

impl TokenServer {
    pub fn microsoft(client_id: &str, client_secret: &str, lifetime: Duration) -> TokenServer {
        let client = Client::Microsoft { client_id: client_id.into(), client_secret: client_secret.into() };
        TokenServer::start(client, lifetime)
    }

    pub fn microsoft_certificate(client_id: &str, certificate: &EntraCertificate, lifetime: Duration) -> TokenServer {
        let client = Client::MicrosoftCertificate {
            client_id: client_id.into(),
            public_key_pkcs1: certificate.public_key_pkcs1.clone(),
            x5t_s256: certificate.x5t_s256.clone(),
        };
        TokenServer::start(client, lifetime)
    }

    pub fn google(account: &ServiceAccount, lifetime: Duration) -> TokenServer {
        let client = Client::Google {
            client_email: account.client_email.clone(),
            public_key_pkcs1: account.public_key_pkcs1.clone(),
        };
        TokenServer::start(client, lifetime)
    }

    fn start(client: Client, lifetime: Duration) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state =
            TokenState { client, lifetime, issued: Vec::new(), roles: vec!["Mail.Send".into()], introspect_as: None };
        let server = TokenServer { port, state: Arc::new(Mutex::new(state)) };
        let s = server.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || s.serve(stream));
            }
        });
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// How many tokens were issued.
    pub fn issued(&self) -> usize {
        self.state.lock().unwrap().issued.len()
    }

    /// Revokes every token issued so far (as an admin revoking the app's sessions would).
    pub fn revoke_all(&self) {
        for t in &mut self.state.lock().unwrap().issued {
            t.revoked = true;
        }
    }

    /// The application roles the next Microsoft tokens carry (an app without `Mail.Send`).
    pub fn set_roles(&self, roles: &[&str]) {
        self.state.lock().unwrap().roles = roles.iter().map(|r| r.to_string()).collect();
    }

    /// Replaces the client secret the endpoint accepts (the admin rotated or revoked it).
    pub fn set_client_secret(&self, secret: &str) {
        if let Client::Microsoft { client_secret, .. } = &mut self.state.lock().unwrap().client {
            *client_secret = secret.to_string();
        }
    }

    /// Its introspection endpoint (RFC 7662), for a server that checks the tokens it is given.
    pub fn introspection_url(&self) -> String {
        format!("http://127.0.0.1:{}/introspect", self.port)
    }

    /// The user introspection names for an app-only token (Microsoft's client credentials,
    /// which carry no user): the mailbox the app was allowed.
    pub fn introspect_as(&self, user: &str) {
        self.state.lock().unwrap().introspect_as = Some(user.to_string());
    }

    /// True when `token` was issued here, is live, and (for Google) was delegated for `user`.
    pub fn accepts(&self, token: &str, user: &str) -> bool {
        self.live(token).is_some_and(|(subject, _)| subject.as_deref().is_none_or(|s| s == user))
    }

    /// True when `token` is a live token issued here for Microsoft Graph.
    pub fn accepts_for_graph(&self, token: &str) -> bool {
        self.live(token).is_some_and(|(_, scope)| scope == GRAPH_SCOPE)
    }

    fn live(&self, token: &str) -> Option<(Option<String>, String)> {
        let state = self.state.lock().unwrap();
        state
            .issued
            .iter()
            .find(|t| t.token == token && !t.revoked && Instant::now() < t.expires)
            .map(|t| (t.subject.clone(), t.scope.clone()))
    }

    fn serve(&self, mut stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap_or_default();
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap_or_default();
        let form = parse_form(&String::from_utf8_lossy(&body));
        let (status, json) = if request_line.starts_with("POST /introspect ") {
            // RFC 7662, as Dovecot's oauth2 passdb asks it: is the token live, and whose.
            match self.live(form.get("token").map(String::as_str).unwrap_or_default()) {
                Some((subject, _)) => {
                    let user = subject.or_else(|| self.state.lock().unwrap().introspect_as.clone());
                    (200, serde_json::json!({"active": true, "username": user}))
                }
                None => (200, serde_json::json!({"active": false})),
            }
        } else if !request_line.starts_with("POST /token ") {
            (404, serde_json::json!({"error": "not_found"}))
        } else {
            self.grant(&form)
        };
        let body = json.to_string();
        let reason = if status == 200 { "OK" } else { "Error" };
        let _ = write!(
            stream,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }

    fn grant(&self, form: &HashMap<String, String>) -> (u16, serde_json::Value) {
        let mut state = self.state.lock().unwrap();
        let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let subject = match &state.client {
            Client::Microsoft { client_id, client_secret } => {
                if get("grant_type") != "client_credentials" || ![OUTLOOK_SCOPE, GRAPH_SCOPE].contains(&get("scope")) {
                    return (
                        400,
                        serde_json::json!({"error": "invalid_request", "error_description": "bad grant or scope"}),
                    );
                }
                if get("client_id") != client_id || get("client_secret") != client_secret {
                    return (
                        401,
                        serde_json::json!({
                            "error": "invalid_client",
                            "error_description": "AADSTS7000215: Invalid client secret provided."
                        }),
                    );
                }
                None
            }
            Client::MicrosoftCertificate { client_id, public_key_pkcs1, x5t_s256 } => {
                if get("grant_type") != "client_credentials"
                    || ![OUTLOOK_SCOPE, GRAPH_SCOPE].contains(&get("scope"))
                    || get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
                {
                    return (400, serde_json::json!({"error": "invalid_request", "error_description": "bad grant"}));
                }
                if get("client_id") != client_id {
                    return (
                        400,
                        serde_json::json!({"error": "unauthorized_client", "error_description": "AADSTS700016: Application with identifier was not found in the directory."}),
                    );
                }
                if let Err(why) =
                    verify_assertion(get("client_assertion"), public_key_pkcs1, x5t_s256, client_id, &self.url())
                {
                    return (
                        401,
                        serde_json::json!({"error": "invalid_client", "error_description": format!("AADSTS700027: Client assertion failed signature validation. {why}")}),
                    );
                }
                None
            }
            Client::Google { client_email, public_key_pkcs1 } => {
                if get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
                    return (400, serde_json::json!({"error": "unsupported_grant_type"}));
                }
                match verify_jwt(get("assertion"), public_key_pkcs1, client_email, &self.url()) {
                    Ok(sub) => Some(sub),
                    Err(why) => return (400, serde_json::json!({"error": "invalid_grant", "error_description": why})),
                }
            }
        };
        let id = format!("tok-{}-{}", self.port, state.issued.len() + 1);
        let lifetime = state.lifetime;
        let scope = get("scope").to_string();
        // Microsoft's tokens are JWTs whose payload says for whom and with which roles (Panel
        // reads it for `smtp check`; the resource server verifies it). The signature here is a
        // placeholder: the double checks the whole token against what it issued.
        let token = match &state.client {
            Client::Microsoft { .. } | Client::MicrosoftCertificate { .. } => {
                let claims = serde_json::json!({
                    "aud": scope.trim_end_matches("/.default"),
                    "roles": state.roles,
                    "jti": id,
                });
                format!(
                    "{}.{}.{}",
                    URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
                    URL_SAFE_NO_PAD.encode(claims.to_string()),
                    URL_SAFE_NO_PAD.encode(id.as_bytes())
                )
            }
            Client::Google { .. } => id,
        };
        state.issued.push(Issued {
            token: token.clone(),
            expires: Instant::now() + lifetime,
            revoked: false,
            subject,
            scope,
        });
        (200, serde_json::json!({"token_type": "Bearer", "expires_in": lifetime.as_secs(), "access_token": token}))
    }
}

/// Entra's check of a certificate client assertion: PS256 by the registered certificate's key,
/// naming its thumbprint, for this endpoint, from and about the app, not expired.
fn verify_assertion(assertion: &str, key: &[u8], x5t: &str, client_id: &str, audience: &str) -> Result<(), String> {
    let (signed, signature) = assertion.rsplit_once('.').ok_or("not a JWT")?;
    let part = |i: usize| -> Result<serde_json::Value, String> {
        let raw =
            URL_SAFE_NO_PAD.decode(signed.split('.').nth(i).ok_or("no such part")?).map_err(|_| "bad encoding")?;
        serde_json::from_slice(&raw).map_err(|_| "not JSON".to_string())
    };
    let (header, claims) = (part(0)?, part(1)?);
    if header["alg"] != "PS256" || header["x5t#S256"] != x5t {
        return Err(format!("unexpected header {header}"));
    }
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| "bad signature encoding")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PSS_2048_8192_SHA256, key)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| "The signature does not verify with the registered certificate.")?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let expired = claims["exp"].as_i64().is_none_or(|exp| exp < now);
    if claims["aud"] != audience || claims["iss"] != client_id || claims["sub"] != client_id || expired {
        return Err(format!("unexpected claims {claims}"));
    }
    Ok(())
}

fn verify_jwt(assertion: &str, key: &[u8], email: &str, audience: &str) -> Result<String, String> {
    let (signed, signature) = assertion.rsplit_once('.').ok_or("not a JWT")?;
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| "bad signature encoding")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, key)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| "Invalid JWT Signature.")?;
    let claims = signed.split('.').nth(1).ok_or("no claims")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).map_err(|_| "bad claims")?).map_err(|_| "bad claims")?;
    if claims["iss"] != email || claims["aud"] != audience || claims["scope"] != "https://mail.google.com/" {
        return Err(format!("unexpected claims {claims}"));
    }
    claims["sub"].as_str().map(String::from).ok_or_else(|| "no sub".into())
}

fn parse_form(body: &str) -> HashMap<String, String> {
    body.split('&').filter_map(|pair| pair.split_once('=')).map(|(k, v)| (decode(k), decode(v))).collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An SMTP server on loopback (plain; tests allow plaintext auth) that requires AUTH XOAUTH2
/// with a live token from `tokens` for `mailbox`, then accepts any message.
pub struct XOAuthSmtp {
    pub port: u16,
    received: Arc<Mutex<Vec<String>>>,
    rejections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl XOAuthSmtp {
    pub fn start(tokens: &TokenServer, mailbox: &str) -> XOAuthSmtp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let rejections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (r, j, t, m, o) = (received.clone(), rejections.clone(), tokens.clone(), mailbox.to_string(), open.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, j, t, m, o) = (r.clone(), j.clone(), t.clone(), m.clone(), o.clone());
                o.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    session(stream, &t, &m, &r, &j);
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        XOAuthSmtp { port, received, rejections, open }
    }

    /// Sessions open now (a client's pooled connection counts until it is closed).
    pub fn open_sessions(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until no session is open: the client closed its idle connection, so its next
    /// message starts a new one (and authenticates again).
    pub fn wait_until_idle(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.open_sessions() > 0 {
            assert!(std::time::Instant::now() < deadline, "a session stayed open for {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Messages accepted, as received after DATA.
    pub fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    /// AUTH attempts refused because the token was not acceptable.
    pub fn rejections(&self) -> usize {
        self.rejections.load(Ordering::SeqCst)
    }
}

fn session(
    stream: TcpStream,
    tokens: &TokenServer,
    mailbox: &str,
    received: &Mutex<Vec<String>>,
    rejections: &AtomicUsize,
) {
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut say = |s: &str| out.write_all(format!("{s}\r\n").as_bytes()).is_ok();
    say("220 xoauth.test ESMTP");
    let mut authenticated = false;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        let ok = if upper.starts_with("EHLO") {
            say("250-xoauth.test\r\n250-AUTH XOAUTH2\r\n250 8BITMIME")
        } else if let Some(arg) = cmd.strip_prefix("AUTH XOAUTH2 ") {
            let raw = String::from_utf8(STANDARD.decode(arg.trim()).unwrap_or_default()).unwrap_or_default();
            let user = raw.split('\x01').find_map(|p| p.strip_prefix("user=")).unwrap_or("");
            let token = raw.split('\x01').find_map(|p| p.strip_prefix("auth=Bearer ")).unwrap_or("");
            if user == mailbox && tokens.accepts(token, user) {
                authenticated = true;
                say("235 2.7.0 Authentication successful")
            } else {
                rejections.fetch_add(1, Ordering::SeqCst);
                let error = STANDARD.encode(r#"{"status":"401","schemes":"bearer"}"#);
                say(&format!("334 {error}"));
                line.clear();
                let _ = reader.read_line(&mut line);
                say("535 5.7.3 Authentication unsuccessful")
            }
        } else if upper.starts_with("MAIL FROM") {
            say(if authenticated { "250 2.1.0 OK" } else { "530 5.7.0 Authentication required" })
        } else if upper.starts_with("RCPT TO") {
            say("250 2.1.5 OK")
        } else if upper == "DATA" {
            say("354 go ahead");
            let Some(data) = crate::sink::read_data(&mut reader) else { return };
            let n = {
                let mut r = received.lock().unwrap();
                r.push(data);
                r.len()
            };
            say(&format!("250 2.0.0 OK queued as X{n}"))
        } else if upper == "RSET" || upper == "NOOP" {
            say("250 2.0.0 OK")
        } else if upper == "QUIT" {
            say("221 2.0.0 bye");
            return;
        } else {
            say("502 5.5.2 command not recognized")
        };
        if !ok {
            return;
        }
    }
}

/// A Google service account key file made with openssl, and its public key for the endpoint.
pub struct ServiceAccount {
    pub client_email: String,
    /// The key file as the Google console downloads it.
    pub key_json: String,
    public_key_pkcs1: Vec<u8>,
}

impl ServiceAccount {
    pub fn create(dir: &Path, token_uri: &str) -> ServiceAccount {
        let key = dir.join("sa.pem");
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).output().expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            out.stdout
        };
        run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key.to_str().unwrap()]);
        let public_key_pkcs1 = run(&["rsa", "-in", key.to_str().unwrap(), "-RSAPublicKey_out", "-outform", "DER"]);
        let client_email = "panel-mailer@contoso-project.iam.gserviceaccount.com".to_string();
        let key_json = serde_json::json!({
            "type": "service_account",
            "project_id": "contoso-project",
            "private_key_id": "0123456789abcdef",
            "private_key": std::fs::read_to_string(&key).unwrap(),
            "client_email": client_email,
            "client_id": "1234567890",
            "token_uri": token_uri,
        })
        .to_string();
        ServiceAccount { client_email, key_json, public_key_pkcs1 }
    }
}

/// An Entra app's certificate credential made with openssl: the PEM Panel stores (the key and
/// its self-signed certificate), and what the token endpoint verifies assertions with.
pub struct EntraCertificate {
    pub pem: String,
    public_key_pkcs1: Vec<u8>,
    /// The certificate's SHA-256 thumbprint, base64url (`x5t#S256`).
    x5t_s256: String,
}

impl EntraCertificate {
    pub fn create(dir: &Path) -> EntraCertificate {
        let (key, cert) = (dir.join("app.key"), dir.join("app.crt"));
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).output().expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            out.stdout
        };
        let (k, c) = (key.to_str().unwrap(), cert.to_str().unwrap());
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            k,
            "-out",
            c,
            "-subj",
            "/CN=Panel mailer",
            "-days",
            "2",
        ]);
        let public_key_pkcs1 = run(&["rsa", "-in", k, "-RSAPublicKey_out", "-outform", "DER"]);
        let der = run(&["x509", "-in", c, "-outform", "DER"]);
        let x5t_s256 = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, &der));
        let pem = std::fs::read_to_string(&key).unwrap() + &std::fs::read_to_string(&cert).unwrap();
        EntraCertificate { pem, public_key_pkcs1, x5t_s256 }
    }
}
