//! A recording SMTP sink on loopback: accepts every message (no TLS, no AUTH) and remembers
//! each Message-ID it received, so a test can count lost and duplicated deliveries. The
//! greeting can be delayed to hold a worker mid-conversation.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    received: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
    connections: AtomicUsize,
    quits: AtomicUsize,
    greeting_delay_ms: AtomicU64,
    /// Greets new connections with 421 and closes them: the relay refusing service (an outage).
    refusing: std::sync::atomic::AtomicBool,
    /// Held before the reply to the end of DATA (content scanning).
    data_reply_delay_ms: AtomicU64,
    /// Announced as `SIZE n` in EHLO when set (0: no limit); bigger messages are refused.
    size_limit: Mutex<Option<u64>>,
    /// Every MAIL command received, as sent.
    mail_commands: Mutex<Vec<String>>,
    /// Every message received, as sent after DATA.
    messages: Mutex<Vec<String>>,
    /// Every RCPT address, lower case, in the order received.
    rcpts: Mutex<Vec<String>>,
    /// Scripted RCPT replies per address, used one per RCPT (then 250).
    rcpt_script: Mutex<HashMap<String, std::collections::VecDeque<String>>>,
}

#[derive(Clone)]
pub struct RecordingSink {
    pub port: u16,
    state: Arc<State>,
}

impl RecordingSink {
    pub fn start() -> RecordingSink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let sink = RecordingSink { port: listener.local_addr().unwrap().port(), state: Arc::default() };
        let state = sink.state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = state.clone();
                std::thread::spawn(move || session(stream, &state));
            }
        });
        sink
    }

    /// Answers the next RCPTs for `address` with `replies` in turn (e.g. `451 4.3.0 later`,
    /// then `550 5.1.1 gone`); once they are used up, RCPT for it is accepted.
    pub fn script_rcpt(&self, address: &str, replies: &[&str]) {
        let mut script = self.state.rcpt_script.lock().unwrap();
        script.entry(address.to_ascii_lowercase()).or_default().extend(replies.iter().map(|r| r.to_string()));
    }

    /// Delays the 220 greeting of new connections.
    pub fn set_greeting_delay(&self, delay: Duration) {
        self.state.greeting_delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// From now on, greets new connections with `421 4.3.2 ...` and closes them (`false`: back
    /// to normal), as a relay in an outage does.
    pub fn set_refusing(&self, refusing: bool) {
        self.state.refusing.store(refusing, Ordering::SeqCst);
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Holds the reply to the end of DATA this long (the message counts as received before).
    pub fn set_data_reply_delay(&self, delay: Duration) {
        self.state.data_reply_delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Announces `SIZE limit` in EHLO from now on (`None`: no SIZE extension).
    pub fn set_size_limit(&self, limit: Option<u64>) {
        *self.state.size_limit.lock().unwrap() = limit;
    }

    /// Every MAIL command received so far, as sent.
    /// Every RCPT address received (lower case), in order.
    pub fn rcpts(&self) -> Vec<String> {
        self.state.rcpts.lock().unwrap().clone()
    }

    pub fn mail_commands(&self) -> Vec<String> {
        self.state.mail_commands.lock().unwrap().clone()
    }

    /// Sessions the client ended with QUIT.
    pub fn quits(&self) -> usize {
        self.state.quits.load(Ordering::SeqCst)
    }

    /// Messages received, duplicates included.
    pub fn total(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }

    /// Waits until `n` messages were received; returns them, as sent after DATA.
    pub fn wait_for(&self, n: usize, limit: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let messages = self.state.messages.lock().unwrap().clone();
            if messages.len() >= n {
                return messages;
            }
            assert!(std::time::Instant::now() < deadline, "{} of {n} messages arrived in {limit:?}", messages.len());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Distinct Message-IDs received.
    pub fn distinct(&self) -> usize {
        self.state.received.lock().unwrap().len()
    }

    /// How many copies of `message_id` arrived.
    pub fn copies(&self, message_id: &str) -> usize {
        self.state.received.lock().unwrap().get(message_id).copied().unwrap_or(0)
    }
}

fn session(stream: TcpStream, state: &State) {
    state.connections.fetch_add(1, Ordering::SeqCst);
    // Each reply is one write: without this, Nagle holds a reply while the client has not yet
    // acknowledged the one before (pipelined MAIL, RCPT and DATA get three), and the client's
    // delayed ACK stalls the session ~40 ms a message, so the sink took a third of the
    // messages it was set to. Relays flush their pipelined replies as one write.
    stream.set_nodelay(true).ok();
    std::thread::sleep(Duration::from_millis(state.greeting_delay_ms.load(Ordering::SeqCst)));
    let mut out = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut say = |s: &str| out.write_all(format!("{s}\r\n").as_bytes()).is_ok();
    if state.refusing.load(Ordering::SeqCst) {
        say("421 4.3.2 sink.test service not available, closing channel");
        return;
    }
    if !say("220 sink.test ESMTP") {
        return;
    }
    let mut line = String::new();
    // Recipients accepted in this transaction: DATA without one is refused (RFC 2920 3.1).
    let mut accepted = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let upper = line.trim_end().to_ascii_uppercase();
        let ok = if upper.starts_with("EHLO") {
            match *state.size_limit.lock().unwrap() {
                Some(n) => say(&format!("250-sink.test\r\n250-PIPELINING\r\n250-SIZE {n}\r\n250 8BITMIME")),
                None => say("250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME"),
            }
        } else if upper == "DATA" && accepted == 0 {
            say("554 5.5.1 no valid recipients")
        } else if upper == "DATA" {
            accepted = 0;
            say("354 go ahead");
            let Some(data) = read_data(&mut reader) else { return };
            let message_id = data
                .lines()
                .find_map(|l| l.get(..11).filter(|h| h.eq_ignore_ascii_case("message-id:")).map(|_| &l[11..]))
                .map(|v| v.trim().trim_matches(['<', '>']).to_string());
            let id = message_id.unwrap_or_default();
            *state.received.lock().unwrap().entry(id).or_default() += 1;
            state.messages.lock().unwrap().push(data.clone());
            let n = state.total.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_millis(state.data_reply_delay_ms.load(Ordering::SeqCst)));
            say(&format!("250 2.0.0 Ok: queued as S{n}"))
        } else if upper == "QUIT" {
            state.quits.fetch_add(1, Ordering::SeqCst);
            say("221 2.0.0 bye");
            return;
        } else if upper.starts_with("RCPT") {
            let address = upper.split(['<', '>']).nth(1).unwrap_or_default().to_ascii_lowercase();
            state.rcpts.lock().unwrap().push(address.clone());
            let scripted = state.rcpt_script.lock().unwrap().get_mut(&address).and_then(|q| q.pop_front());
            let reply = scripted.unwrap_or_else(|| "250 2.1.5 Ok".into());
            if reply.starts_with('2') {
                accepted += 1;
            }
            say(&reply)
        } else if upper.starts_with("MAIL") || upper == "RSET" {
            if upper.starts_with("MAIL") {
                state.mail_commands.lock().unwrap().push(line.trim_end().to_string());
            }
            accepted = 0;
            say("250 2.0.0 Ok")
        } else if upper == "NOOP" {
            say("250 2.0.0 Ok")
        } else {
            say("502 5.5.2 command not recognized")
        };
        if !ok {
            return;
        }
    }
}

/// The message after DATA, up to the lone dot; `None` when the client went away.
pub(crate) fn read_data(reader: &mut impl BufRead) -> Option<String> {
    let mut data = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        if line == ".\r\n" {
            return Some(data);
        }
        data.push_str(&line);
    }
}
