//! Benchmark helper (bench/api.sh): sends as a user's tool does, through the public HTTP API.
//!
//! `apiload PORT TOKEN N CLIENTS KIND`: CLIENTS keep-alive connections to 127.0.0.1:PORT, N
//! requests in all, each answered before the next on that connection. KIND:
//! - `single`: `POST /api/v1/messages`, one ~1 KB message per request (each answer durable);
//! - `bulk`: `POST /api/v1/messages/bulk`, 100 messages per request (N counts messages);
//! - `event`: `POST /api/v1/events`, a `user.created` event per request (a workflow mails it).
//!
//! Prints the requests' answer times: median and p99 in ms. Fails on any answer but 200/202.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, token, n, clients, kind] = args.as_slice() else {
        panic!("usage: apiload PORT TOKEN N CLIENTS single|bulk|event");
    };
    let (n, clients): (usize, usize) = (n.parse().unwrap(), clients.parse().unwrap());
    let per_request = if kind == "bulk" { 100 } else { 1 };
    let requests = n.div_ceil(per_request);
    let text = "x".repeat(700);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (port, token, kind, text) = (port.clone(), token.clone(), kind.clone(), text.clone());
            let mine = (c..requests).step_by(clients).collect::<Vec<_>>();
            std::thread::spawn(move || {
                let stream = TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
                stream.set_nodelay(true).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut times = Vec::with_capacity(mine.len());
                for i in mine {
                    let draft = |j: usize| {
                        format!(r#"{{"to":["user{j}@example.org"],"subject":"bench {j}","text":"{text}"}}"#)
                    };
                    let (path, body) = match kind.as_str() {
                        "single" => ("/api/v1/messages", draft(i)),
                        "bulk" => {
                            let drafts: Vec<String> = (i * 100..(i * 100 + 100).min(n)).map(draft).collect();
                            ("/api/v1/messages/bulk", format!(r#"{{"messages":[{}]}}"#, drafts.join(",")))
                        }
                        "event" => (
                            "/api/v1/events",
                            format!(
                                r#"{{"type":"user.created","object":{{"login":"u{i}","mail":"user{i}@example.org","note":"{text}"}}}}"#
                            ),
                        ),
                        other => panic!("unknown kind {other}"),
                    };
                    let started = Instant::now();
                    write!(
                        writer,
                        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
                         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .unwrap();
                    let status = read_response(&mut reader);
                    assert!(status == 202 || status == 200, "{path} answered {status}");
                    times.push(started.elapsed());
                }
                times
            })
        })
        .collect();
    let mut times: Vec<Duration> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)].as_secs_f64() * 1000.0;
    println!("{:.1} {:.1}", at(0.5), at(0.99));
}

/// Reads one response (Content-Length bodies, as the API sends); returns its status.
fn read_response(reader: &mut BufReader<TcpStream>) -> u16 {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    status
}
