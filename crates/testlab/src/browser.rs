//! Debian's headless Chromium driven over WebDriver (chromedriver), for the UI's end-to-end
//! tests. A minimal W3C WebDriver client over a blocking loopback socket: navigate, find,
//! click, type, read text, run a script, take a screenshot.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

/// An element reference from `find`.
#[derive(Clone)]
pub struct Element(String);

impl Browser {
    /// A headless Chromium session; `None` (test skipped, with a notice) when Chromium or
    /// chromedriver is not installed, unless PANEL_TEST_REAL=1 requires them.
    pub fn start() -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
            if std::env::var("PANEL_TEST_REAL").is_ok_and(|v| v == "1") {
                panic!(
                    "PANEL_TEST_REAL=1 but {CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)"
                );
            }
            eprintln!("SKIPPED: Chromium or chromedriver is not installed");
            return None;
        }
        let port = crate::free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let mut b = Browser { driver, port, session: String::new(), _profile: profile };
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.request("GET", "/status", None).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,1000", format!("--user-data-dir={}", b._profile.path().display()),
                         "--no-first-run", "--disable-extensions", "--disable-background-networking"]
            }
        }}});
        let v = b.request("POST", "/session", Some(caps)).expect("a Chromium session starts");
        b.session = v["sessionId"].as_str().expect("session id").to_string();
        Some(b)
    }

    fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let payload = read_response(&mut s)?;
        let v: Value = serde_json::from_str(&payload).map_err(|e| format!("{e}: {payload}"))?;
        if v["value"].get("error").is_some() {
            return Err(format!("{}: {}", v["value"]["error"], v["value"]["message"]));
        }
        Ok(v["value"].clone())
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.request(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url}))).unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None).unwrap().as_str().unwrap_or_default().to_string()
    }

    pub fn try_find(&self, css: &str) -> Option<Element> {
        let v = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css}))).ok()?;
        v.as_object()?.values().next()?.as_str().map(|id| Element(id.to_string()))
    }

    /// Waits up to 20 s for an element matching `css`.
    pub fn find(&self, css: &str) -> Element {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(e) = self.try_find(css) {
                return e;
            }
            assert!(Instant::now() < deadline, "no element '{css}' on {}:\n{}", self.url(), self.page_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn click(&self, e: &Element) {
        self.cmd("POST", &format!("/element/{}/click", e.0), Some(json!({}))).unwrap();
    }

    /// Replaces the field's value with `text`.
    pub fn fill(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{}/clear", e.0), Some(json!({}))).unwrap();
        self.cmd("POST", &format!("/element/{}/value", e.0), Some(json!({"text": text}))).unwrap();
    }

    /// Chooses the option with `value` in a select.
    pub fn select(&self, css: &str, value: &str) {
        self.find(&format!("{css} option[value=\"{value}\"]"));
        let e = self.find(&format!("{css} option[value=\"{value}\"]"));
        self.click(&e);
    }

    /// The element's visible text; empty when it went away (the page reloaded).
    pub fn text(&self, e: &Element) -> String {
        let v = self.cmd("GET", &format!("/element/{}/text", e.0), None).unwrap_or_default();
        v.as_str().unwrap_or_default().to_string()
    }

    pub fn page_text(&self) -> String {
        self.script("return document.body ? document.body.innerText : ''").as_str().unwrap_or_default().to_string()
    }

    /// Waits up to `secs` for `css`'s text to satisfy `pred`; returns the text.
    pub fn wait_text(&self, css: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.try_find(css).map(|e| self.text(&e)).unwrap_or_default();
            if pred(&t) {
                return t;
            }
            assert!(Instant::now() < deadline, "'{css}' never matched; it says: {t}\npage:\n{}", self.page_text());
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    pub fn script(&self, js: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({"script": js, "args": []})))
            .unwrap_or_else(|e| panic!("{js}: {e}"))
    }

    /// Sets the window size (CSS pixels), e.g. a phone's 390x844.
    pub fn resize(&self, width: u32, height: u32) {
        self.cmd("POST", "/window/rect", Some(json!({"width": width, "height": height}))).unwrap();
    }

    /// Saves a PNG screenshot of the whole page (the window is made as tall as the page first,
    /// keeping its width: a phone-sized window is shot as a phone shows the page).
    pub fn screenshot(&self, path: &Path) {
        let width = self.cmd("GET", "/window/rect", None).ok().and_then(|r| r["width"].as_i64()).unwrap_or(1280);
        let height = self
            .script("return Math.ceil(document.body.getBoundingClientRect().height)")
            .as_i64()
            .unwrap_or(1000)
            .clamp(600, 4000);
        let _ = self.cmd("POST", "/window/rect", Some(json!({"width": width, "height": height + 120})));
        self.script("window.scrollTo(0, 0)");
        let png = self.cmd("GET", "/screenshot", None).unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, bytes).unwrap();
    }
}

/// Reads one HTTP/1.1 response body (Content-Length or chunked); chromedriver keeps the
/// connection open, so reading to the end would wait for its timeout.
fn read_response(s: &mut TcpStream) -> Result<String, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the headers ended".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    let mut body = buf[head_end..].to_vec();
    let complete = |b: &[u8]| match length {
        Some(n) => b.len() >= n,
        None if chunked => b.ends_with(b"0\r\n\r\n"),
        None => false,
    };
    while !complete(&body) {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[i + 2..i + 2 + size]);
            rest = &rest[i + 2 + size + 2..];
        }
        body = out;
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.request("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
