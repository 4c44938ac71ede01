//! Benchmark helper (bench/delivery.sh, bench/scale.sh): `load enqueue URL N` puts N 1 KB
//! messages in the queue through the store, 500 per transaction, and prints enqueues/s; `load drain URL N` waits until
//! N are delivered and prints the rate since it started; `load claim URL N` claims N steps in
//! batches of 16 (as a worker does) and prints claims/s. Relay settings must already be saved.

use std::time::{Duration, Instant};

use chrono::Utc;
use panel_domain::message::Draft;
use panel_domain::{EmailAddress, Mailbox, Origin, OutgoingMessage};
use panel_store::Store;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, url, n) = match args.as_slice() {
        [_, mode, url, n] => (mode.as_str(), url.as_str(), n.parse::<usize>().expect("N is a number")),
        _ => panic!("usage: load enqueue|drain|claim URL N"),
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
                let batch = store.claim("bench", Utc::now(), Duration::from_secs(600), 16).await.expect("claim");
                if batch.is_empty() {
                    break;
                }
                claimed += batch.len();
            }
            println!("{:.0}", claimed as f64 / started.elapsed().as_secs_f64());
        }
        "drain" => {
            let started = Instant::now();
            loop {
                let delivered = store.queue_stats(Utc::now()).await.expect("stats").delivered as usize;
                if delivered >= n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!("{:.0}", n as f64 / started.elapsed().as_secs_f64());
        }
        other => panic!("unknown mode {other}"),
    }
}
