//! SMTP on the wire: reading replies, encoding the message body for DATA.

use panel_domain::SmtpReply;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Longest reply line accepted (RFC 5321 allows 512; real relays send longer texts).
const MAX_LINE: usize = 8192;
/// Most lines in one reply (an EHLO reply has one per extension).
const MAX_LINES: usize = 256;

#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    Closed,
    /// The relay closed the connection in the middle of a reply line (what it sent so far).
    ClosedMidLine(String),
    Malformed(String),
}

/// Reads one complete reply: lines `ddd-text` until `ddd text`.
pub async fn read_reply<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<SmtpReply, ReadError> {
    let mut lines: Vec<String> = Vec::new();
    loop {
        let mut raw = Vec::new();
        let n = (&mut *reader).take(MAX_LINE as u64).read_until(b'\n', &mut raw).await.map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        if raw.last() != Some(&b'\n') {
            // Short of the limit without a line end: the relay closed in the middle of a line.
            if n < MAX_LINE {
                return Err(ReadError::ClosedMidLine(String::from_utf8_lossy(&raw).into_owned()));
            }
            return Err(ReadError::Malformed(format!("reply line longer than {MAX_LINE} bytes")));
        }
        let line = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_string();
        let bytes = line.as_bytes();
        let valid = bytes.len() >= 3
            && bytes[..3].iter().all(u8::is_ascii_digit)
            && (bytes.len() == 3 || bytes[3] == b' ' || bytes[3] == b'-');
        if !valid {
            return Err(ReadError::Malformed(format!("unexpected line from the relay: {:?}", truncate(&line, 80))));
        }
        if let Some(first) = lines.first()
            && first[..3] != line[..3]
        {
            return Err(ReadError::Malformed("reply lines with different codes".into()));
        }
        let last = bytes.len() == 3 || bytes[3] == b' ';
        lines.push(line);
        if last {
            break;
        }
        if lines.len() >= MAX_LINES {
            return Err(ReadError::Malformed(format!("reply longer than {MAX_LINES} lines")));
        }
    }
    let code: u16 = lines[0][..3].parse().expect("three digits");
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    Ok(SmtpReply::from_lines(code, &refs))
}

pub(crate) fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Prepares a message for DATA: every line ending becomes CRLF (no bare CR or LF reaches the
/// wire), lines starting with "." are dot-stuffed, and the terminating "." line is appended.
pub fn encode_data(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 32 + 5);
    let mut at_line_start = true;
    let mut i = 0;
    while i < message.len() {
        let b = message[i];
        match b {
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                // CRLF counts once; a lone CR or LF is a line break of its own.
                if b == b'\r' && message.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                at_line_start = true;
            }
            _ => {
                if at_line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                at_line_start = false;
            }
        }
        i += 1;
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The extensions a relay announced in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Extensions {
    pub list: Vec<String>,
}

impl Extensions {
    pub fn from_reply(reply: &SmtpReply) -> Extensions {
        // The first line is the relay's name, the rest are extensions.
        Extensions {
            list: reply.text.lines().skip(1).map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect(),
        }
    }

    pub fn has(&self, keyword: &str) -> bool {
        self.list.iter().any(|l| l.split_whitespace().next().is_some_and(|k| k.eq_ignore_ascii_case(keyword)))
    }

    /// The largest message the relay declared it accepts (RFC 1870 `SIZE n`): `Some(0)` when it
    /// offers SIZE without a limit, `None` when it does not offer SIZE.
    pub fn size_limit(&self) -> Option<u64> {
        self.list.iter().find_map(|l| {
            let mut words = l.split_whitespace();
            let keyword = words.next()?;
            keyword.eq_ignore_ascii_case("SIZE").then(|| words.next().and_then(|n| n.parse().ok()).unwrap_or(0))
        })
    }

    pub fn auth_mechanisms(&self) -> Vec<String> {
        self.list
            .iter()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let k = words.next()?;
                (k.eq_ignore_ascii_case("AUTH") || k.eq_ignore_ascii_case("AUTH="))
                    .then(|| words.map(|w| w.to_ascii_uppercase()).collect::<Vec<_>>())
            })
            .flatten()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_multiline_replies() {
        let mut input: &[u8] = b"250-relay.example.org\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n";
        let reply = read_reply(&mut input).await.unwrap();
        assert_eq!(reply.code, 250);
        let ext = Extensions::from_reply(&reply);
        assert!(ext.has("starttls"));
        assert!(!ext.has("SMTPUTF8"));
        assert_eq!(ext.auth_mechanisms(), ["PLAIN", "LOGIN"]);
    }

    #[tokio::test]
    async fn rejects_garbage_and_reports_closed_connections() {
        let mut input: &[u8] = b"hello\r\n";
        assert!(matches!(read_reply(&mut input).await, Err(ReadError::Malformed(_))));
        let mut input: &[u8] = b"250-partial\r\n";
        assert!(matches!(read_reply(&mut input).await, Err(ReadError::Closed)));
        let mut input: &[u8] = b"";
        assert!(matches!(read_reply(&mut input).await, Err(ReadError::Closed)));
        // Closed in the middle of the greeting: said so, not taken for an over-long line.
        let mut input: &[u8] = b"220 mail.example.org ESMTP rea";
        assert!(matches!(read_reply(&mut input).await, Err(ReadError::ClosedMidLine(t)) if t.ends_with("rea")));
        let long = vec![b'2'; MAX_LINE + 10];
        let mut input: &[u8] = &long;
        assert!(matches!(read_reply(&mut input).await, Err(ReadError::Malformed(m)) if m.contains("longer")));
    }

    #[test]
    fn dot_stuffs_and_normalises_line_endings() {
        assert_eq!(encode_data(b"a\r\n.b\r\n..c\r\n"), b"a\r\n..b\r\n...c\r\n.\r\n");
        assert_eq!(encode_data(b".start\nmid\rend"), b"..start\r\nmid\r\nend\r\n.\r\n");
        // A lone "." line inside the message must not end DATA early.
        assert_eq!(encode_data(b"x\n.\ny"), b"x\r\n..\r\ny\r\n.\r\n");
        assert_eq!(encode_data(b""), b".\r\n");
        let encoded = encode_data(b"a\nb\rc\r\n");
        for (i, b) in encoded.iter().enumerate() {
            if *b == b'\n' {
                assert_eq!(encoded[i - 1], b'\r', "bare LF at {i}");
            }
            if *b == b'\r' {
                assert_eq!(encoded[i + 1], b'\n', "bare CR at {i}");
            }
        }
    }
}
