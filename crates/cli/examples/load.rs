//! Benchmark helper (bench/delivery.sh, bench/scale.sh):
//! - `load enqueue URL N`: N 1 KB messages through the store, 500 per transaction; prints enqueues/s.
//! - `load drain URL N [START]`: waits until N are delivered; prints the rate since START (epoch
//!   seconds, taken by the caller) or since it started.
//! - `load claim URL N`: claims N steps in batches of 16, as a worker does; prints claims/s.
//!
//! Relay settings must already be saved.

use std::time::{Duration, Instant};

use chrono::Utc;
use panel_domain::message::Draft;
use panel_domain::{EmailAddress, Mailbox, Origin, OutgoingMessage};
use panel_store::Store;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, url, n, since) = match args.as_slice() {
        [_, mode, url, n, rest @ ..] if rest.len() <= 1 => (
            mode.as_str(),
            url.as_str(),
            n.parse::<usize>().expect("N is a number"),
            rest.first().map(|t| t.parse::<f64>().expect("START is epoch seconds")),
        ),
        _ => panic!("usage: load enqueue|drain|claim URL N [START]"),
    };
    let store = Store::open(url).await.expect("open the store");
    match mode {
        "enqueue" => {
            let from = Mailbox::parse("from", "panel@example.org").unwrap();
            let fallback = EmailAddress::parse("f", "ops@example.org").unwrap();
            // In bulk: 500 messages per transaction, as POST /api/v1/messages/bulk stores them.
            let started = Instant::now();
            let mut batch = Vec::with_capacity(500);
            for i in 0..n {
                let draft = Draft {
                    to: vec![format!("bulk{i}@example.org")],
                    subject: format!("bench {i}"),
                    text: "x".repeat(700),
                    ..Default::default()
                };
                let m = OutgoingMessage::prepare(&draft, &from, &fallback, Utc::now(), i as u128 + 1).unwrap();
                batch.push((Origin::Dispatch, m));
                if batch.len() == 500 || i + 1 == n {
                    store.enqueue_many(&batch, Utc::now()).await.expect("enqueue");
                    batch.clear();
                }
            }
            println!("{:.0}", n as f64 / started.elapsed().as_secs_f64());
        }
        "claim" => {
            let started = Instant::now();
            let mut claimed = 0;
            while claimed < n {
                let batch = store.claim("bench", Utc::now(), Duration::from_secs(600), 16, false).await.expect("claim");
                if batch.is_empty() {
                    break;
                }
                claimed += batch.len();
            }
            println!("{:.0}", claimed as f64 / started.elapsed().as_secs_f64());
        }
        "drain" => {
            // Timed from START (epoch seconds, taken by the caller before any work began) when
            // given: opening the store may wait for the write lock while loaders already run.
            let started = Instant::now();
            let epoch = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
            let origin = since.map(|s| epoch() - s);
            loop {
                let delivered = store.queue_stats(Utc::now()).await.expect("stats").delivered as usize;
                if delivered >= n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let elapsed = started.elapsed().as_secs_f64() + origin.unwrap_or(0.0);
            println!("{:.0}", n as f64 / elapsed);
        }
        other => panic!("unknown mode {other}"),
    }
}
