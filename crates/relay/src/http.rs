//! A minimal HTTPS client for token endpoints and Microsoft Graph: one request, one bounded
//! answer. Built on hyper's connection API over the same rustls stack as the relay client (the
//! system's trust roots, plus the settings' CA file for Graph), so no second TLS stack enters
//! the build.

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use panel_domain::EndpointUrl;
use tokio::net::TcpStream;
use tokio::time::timeout;
use zeroize::Zeroizing;

use crate::tls::{self, TlsTrust};

/// Token answers are small; anything larger is not a token endpoint.
const MAX_BODY: usize = 256 * 1024;

/// A secret-carrying buffer as `Bytes`: zeroized when the last reference is dropped.
struct WipedBytes(Zeroizing<String>);

impl AsRef<[u8]> for WipedBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Zeroizing<Vec<u8>>,
}

impl HttpResponse {
    /// A response header as text, when present and printable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// POSTs `form` (already encoded; it carries a secret, so it is wiped after use) to `url`.
/// The error is a sentence for the admin: what failed, where.
pub async fn post_form(url: &EndpointUrl, form: Zeroizing<String>, limit: Duration) -> Result<HttpResponse, String> {
    // The request owns the wiping buffer itself (no copy): it is zeroed when hyper drops the
    // body after writing it.
    let request = request(url, "POST", "application/x-www-form-urlencoded")
        .body(Bytes::from_owner(WipedBytes(form)))
        .map_err(|e| format!("cannot build the request to {url}: {e}"))?;
    send(url, request, TlsTrust::system(), limit, limit).await.map_err(|e| e.to_string())
}

/// Why a request got no answer, told apart where it matters: before the request went out
/// (nothing was sent), or after (the server may have acted on it).
#[derive(Debug)]
pub enum HttpError {
    /// Connecting, TLS, building: nothing reached the server.
    NotSent(String),
    /// The request was on its way, and no (complete) answer came.
    NoAnswer(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::NotSent(e) | HttpError::NoAnswer(e) => f.write_str(e),
        }
    }
}

/// A request to `url` with the headers every request carries; the caller adds its own.
pub fn request(url: &EndpointUrl, method: &str, content_type: &str) -> hyper::http::request::Builder {
    let host_header = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() };
    hyper::Request::builder()
        .method(method)
        .uri(url.path.as_str())
        .header(hyper::header::HOST, host_header)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, concat!("panel/", env!("CARGO_PKG_VERSION")))
}

/// Sends `request` over TLS with `trust` (or plain HTTP to a loopback endpoint, which
/// `EndpointUrl` allows no other): connected within `connect`, answered within `limit`.
pub async fn send(
    url: &EndpointUrl,
    request: hyper::Request<Bytes>,
    trust: &TlsTrust,
    connect: Duration,
    limit: Duration,
) -> Result<HttpResponse, HttpError> {
    let connecting = async {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        tcp.set_nodelay(true).ok();
        if !url.tls {
            return Ok(Stream::Plain(tcp));
        }
        let (config, _) = trust.client_config().map_err(|f| f.detail)?;
        let name = tls::server_name(&url.host).map_err(|f| f.detail)?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {url} failed: {e}"))?;
        Ok(Stream::Tls(Box::new(stream)))
    };
    let stream = timeout(connect, connecting)
        .await
        .unwrap_or_else(|_| Err(format!("{url}: no connection within {}s", connect.as_secs())))
        .map_err(HttpError::NotSent)?;
    let request = request.map(Full::new);
    let answer = match stream {
        Stream::Plain(tcp) => timeout(limit, exchange(url, TokioIo::new(tcp), request)).await,
        Stream::Tls(tls) => timeout(limit, exchange(url, TokioIo::new(*tls), request)).await,
    };
    answer
        .unwrap_or_else(|_| Err(format!("{url} did not answer within {}s", limit.as_secs())))
        .map_err(HttpError::NoAnswer)
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn exchange<S>(
    url: &EndpointUrl,
    io: TokioIo<S>,
    request: hyper::Request<Full<Bytes>>,
) -> Result<HttpResponse, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP with {url} failed: {e}"))?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(|e| format!("HTTP request to {url} failed: {e}"));
    let result = match response {
        Ok(r) => {
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            match Limited::new(r.into_body(), MAX_BODY).collect().await {
                Ok(body) => Ok(HttpResponse { status, headers, body: Zeroizing::new(body.to_bytes().to_vec()) }),
                Err(e) => Err(format!("reading the answer of {url} failed: {e}")),
            }
        }
        Err(e) => Err(e),
    };
    driver.abort();
    result
}
