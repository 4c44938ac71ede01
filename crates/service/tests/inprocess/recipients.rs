//! A message's state follows all its recipients, against a relay that answers each RCPT as
//! scripted: a refusal is never hidden by what happens to another recipient, in any order.

use std::time::Duration;

use panel_domain::{MessageState, RecipientState};
use panel_service::WorkerConfig;

use crate::harness::Harness;

const LATER: &str = "451 4.3.0 try again later";
const GONE: &str = "550 5.1.1 no such user";

/// Sends to a@, b@ and c@ with `b` and `c` scripted, moves the clock past each retry, and
/// returns the final message.
async fn run(h: &Harness, b: &[&str], c: &[&str]) -> panel_service::views::MessageDetail {
    h.sink.script_rcpt("b@example.org", b);
    h.sink.script_rcpt("c@example.org", c);
    let id = h.send_to("three", &["a@example.org", "b@example.org", "c@example.org"]).await;
    loop {
        let m = h.panel.message(id).await.unwrap();
        if m.state.is_final() {
            return m;
        }
        if m.state == MessageState::Retrying {
            h.clock.advance(chrono::Duration::milliseconds(1200));
        }
        assert!(m.attempts.len() < 10, "{m:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state_of(m: &panel_service::views::MessageDetail, address: &str) -> RecipientState {
    m.recipients.iter().find(|r| r.address == address).unwrap().state
}

#[tokio::test]
async fn every_order_of_outcomes_gives_the_state_of_all_the_recipients() {
    let config = WorkerConfig { poll: Duration::from_millis(20), ..WorkerConfig::default() };
    let h = Harness::start(Some(config), &[("retry_schedule", "1s")]).await;

    // Refused first, the other deferred and delivered on the retry: was `delivered`.
    let m = run(&h, &[GONE], &[LATER]).await;
    assert_eq!(m.state, MessageState::PartlyFailed, "{m:#?}");
    assert_eq!(state_of(&m, "b@example.org"), RecipientState::Failed);
    assert_eq!(state_of(&m, "c@example.org"), RecipientState::Delivered);
    assert!(m.last_error.as_deref().unwrap().contains("550 5.1.1"), "{m:#?}");

    // Deferred first, refused on the retry.
    let m = run(&h, &[LATER, GONE], &[LATER]).await;
    assert_eq!(m.state, MessageState::PartlyFailed, "{m:#?}");
    assert_eq!(m.attempts.len(), 2);

    // Both deferred, then delivered: delivered. (a@ is always accepted.)
    let m = run(&h, &[LATER], &[LATER]).await;
    assert_eq!(m.state, MessageState::Delivered, "{m:#?}");

    // What the dashboard and /metrics count: the two partly failed messages, on their own.
    let d = h.panel.dashboard().await.unwrap();
    assert_eq!((d.queue.partly_failed, d.queue.delivered, d.queue.failed), (2, 1, 0));
    assert_eq!(d.last_hour.partly_failed, 2);
    let metrics = h.panel.metrics_text().await.unwrap();
    assert!(metrics.contains("panel_messages{state=\"partly_failed\"} 2"), "{metrics}");

    // Retrying a partly failed message sends to the refused recipient only.
    let filter = panel_service::views::MessageFilter {
        state: Some(MessageState::PartlyFailed),
        limit: 10,
        ..Default::default()
    };
    let ids: Vec<i64> = h.panel.messages(&filter).await.unwrap().iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), 2);
    let accepted_before = h.sink.total();
    h.sink.script_rcpt("b@example.org", &[GONE]);
    h.panel.retry(ids[1]).await.unwrap();
    let m = loop {
        let m = h.panel.message(ids[1]).await.unwrap();
        if m.state.is_final() {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(m.state, MessageState::PartlyFailed);
    let last = m.attempts.last().unwrap();
    let sent_to: Vec<&str> =
        last.recipients.as_array().unwrap().iter().map(|r| r["address"].as_str().unwrap()).collect();
    assert_eq!(sent_to, ["b@example.org"]);
    assert_eq!(h.sink.total(), accepted_before, "nothing was sent again to the delivered ones");
    h.stop().await;
}
