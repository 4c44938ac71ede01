//! Prometheus metrics: counters and a histogram kept by this process (what its worker and API
//! did), and gauges read from the shared store at scrape time (what the whole queue looks like).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use panel_store::QueueStats;

/// Upper bounds (seconds) of the enqueue-to-acceptance histogram: 10 ms to 6 h.
const BUCKETS: [f64; 14] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0, 3600.0, 21600.0];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds, to stay in integers.
    sum_micros: AtomicU64,
}

/// Counters by label set, e.g. `outcome="delivered",code="250"`.
#[derive(Default)]
struct Counters(Mutex<BTreeMap<String, u64>>);

impl Counters {
    fn add(&self, labels: String) {
        *self.0.lock().expect("not poisoned").entry(labels).or_default() += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, n) in self.0.lock().expect("not poisoned").iter() {
            let _ = writeln!(out, "{name}{{{labels}}} {n}");
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    enqueued: Counters,
    claimed: Counters,
    claims: Counters,
    finished: Counters,
    attempts: Counters,
    connection_errors: Counters,
    bounces: Counters,
    /// Tokens checked from a kept owner, and by a read: on every request, so not a `Counters`
    /// (a lock and a label string each).
    tokens_kept: AtomicU64,
    tokens_read: AtomicU64,
    throttled: std::sync::atomic::AtomicU64,
    failovers: std::sync::atomic::AtomicU64,
    access_changed: std::sync::atomic::AtomicU64,
    delivery: Histogram,
}

/// Label values come from our own enums and SMTP codes, but escape anyway.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    pub fn step_enqueued(&self, origin: &str) {
        self.enqueued.add(format!("origin=\"{}\"", label(origin)));
    }

    pub fn step_claimed(&self, origin: &str) {
        self.claimed.add(format!("origin=\"{}\"", label(origin)));
    }

    /// A claim by this process's worker (a statement on the database), and whether it took mail
    /// to send: one that took none was a wake-up or poll for nothing (or its mail went back
    /// unsent, the settings having become unusable).
    pub fn claim(&self, found: bool) {
        self.claims.add(format!("found=\"{}\"", if found { "some" } else { "none" }));
    }

    /// One attempt's outcome; `final_state` is the message's state after it.
    pub fn attempt(&self, origin: &str, outcome: &str, class: Option<&str>, code: Option<u16>, final_state: &str) {
        let code = code.map(|c| c.to_string()).unwrap_or_default();
        self.attempts.add(format!(
            "outcome=\"{}\",class=\"{}\",code=\"{code}\"",
            label(outcome),
            label(class.unwrap_or("none"))
        ));
        if matches!(final_state, "delivered" | "partly_failed" | "failed") {
            self.finished.add(format!("origin=\"{}\",state=\"{}\"", label(origin), label(final_state)));
        }
    }

    /// A request's token checked: from the owner this service kept (`Panel::authenticate_kept`)
    /// or by a read of the database.
    pub fn token_checked(&self, kept: bool) {
        let counter = if kept { &self.tokens_kept } else { &self.tokens_read };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A write on a kept token owner found its token, role or the settings changed: nothing
    /// was written, and the request was answered as of a read of its token.
    pub fn access_changed(&self) {
        self.access_changed.fetch_add(1, Ordering::Relaxed);
    }

    /// The relay (or provider) asked to slow down: the transport paused.
    pub fn throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// A route failed and the message went on to the next route at once.
    pub fn failover(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
    }

    /// A report received for the bounce domain, by kind (`failed`, `delayed`, `auto_reply`,
    /// `unmatched`, ...).
    pub fn bounce(&self, kind: &str) {
        self.bounces.add(format!("kind=\"{}\"", label(kind)));
    }

    pub fn connection_error(&self, stage: &str) {
        self.connection_errors.add(format!("stage=\"{}\"", label(stage)));
    }

    /// Time from enqueue to the relay's acceptance.
    pub fn delivered_after(&self, seconds: f64) {
        let h = &self.delivery;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_micros.fetch_add((seconds.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// The exposition text: this process's counters, then the store's gauges.
    pub fn render(&self, queue: &QueueStats, interrupted: i64, writable: bool) -> String {
        let mut out = String::new();
        self.enqueued.render(&mut out, "panel_steps_enqueued_total", "Steps enqueued by this process, by origin.");
        self.claimed.render(
            &mut out,
            "panel_steps_claimed_total",
            "Steps claimed by this process's worker, by origin.",
        );
        self.claims.render(
            &mut out,
            "panel_claims_total",
            "Claims made by this process's worker, by whether they took mail to send (found=some|none); mail handed over to it at its enqueue needs none.",
        );
        self.finished.render(
            &mut out,
            "panel_steps_finished_total",
            "Steps this process's worker finished, by origin and final state (delivered or failed).",
        );
        self.attempts.render(
            &mut out,
            "panel_attempts_total",
            "Delivery attempts by this process, by outcome, failure class and SMTP code.",
        );
        self.connection_errors.render(
            &mut out,
            "panel_relay_connection_errors_total",
            "Attempts that could not reach the relay, by stage (dns, tcp, tls, greeting, ...).",
        );
        self.bounces.render(
            &mut out,
            "panel_bounces_total",
            "Reports received for the bounce domain by this process, by kind (failed, delayed, auto_reply, unmatched, ...).",
        );
        let name = "panel_token_checks_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests' tokens checked by this process, by whether the owner was one it kept for at most a minute (owner=kept; only for sending one message, on PostgreSQL) or read (owner=read).\n# TYPE {name} counter\n{name}{{owner=\"kept\"}} {}\n{name}{{owner=\"read\"}} {}",
            self.tokens_kept.load(Ordering::Relaxed),
            self.tokens_read.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP panel_access_changes_total Messages sent on a kept token owner whose token, role or relay settings had changed meanwhile: none was written, each request was answered after its token was read again.\n# TYPE panel_access_changes_total counter\npanel_access_changes_total {}",
            self.access_changed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP panel_relay_throttled_total Replies asking to slow down; each paused sending.\n# TYPE panel_relay_throttled_total counter\npanel_relay_throttled_total {}",
            self.throttled.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP panel_route_failovers_total Attempts whose route failed while another could take the message at once.\n# TYPE panel_route_failovers_total counter\npanel_route_failovers_total {}",
            self.failovers.load(Ordering::Relaxed)
        );
        let h = &self.delivery;
        let name = "panel_delivery_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from enqueue to the relay's acceptance, for messages this process delivered.\n# TYPE {name} histogram"
        );
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", h.buckets[i].load(Ordering::Relaxed));
        }
        let count = h.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");

        let _ =
            writeln!(out, "# HELP panel_messages Messages in the shared store, by state.\n# TYPE panel_messages gauge");
        for (state, n) in [
            ("queued", queue.queued),
            ("retrying", queue.retrying),
            ("sending", queue.sending),
            ("delivered", queue.delivered),
            ("partly_failed", queue.partly_failed),
            ("failed", queue.failed),
            ("captured", queue.captured),
            ("bounced", queue.bounced),
        ] {
            let _ = writeln!(out, "panel_messages{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP panel_messages_held Failed messages held by a configuration error, sent again when it is fixed.\n# TYPE panel_messages_held gauge\npanel_messages_held {}",
            queue.held
        );
        let _ = writeln!(
            out,
            "# HELP panel_messages_limited Queued messages waiting for room under the sending limits.\n# TYPE panel_messages_limited gauge\npanel_messages_limited {}",
            queue.limited
        );
        let _ = writeln!(
            out,
            "# HELP panel_queue_depth Steps due or waiting to be sent (queued + retrying).\n# TYPE panel_queue_depth gauge\npanel_queue_depth {}",
            queue.queued + queue.retrying
        );
        let _ = writeln!(
            out,
            "# HELP panel_queue_oldest_due_seconds How long the oldest due step has waited.\n# TYPE panel_queue_oldest_due_seconds gauge\npanel_queue_oldest_due_seconds {}",
            queue.oldest_due_age_secs.unwrap_or(0)
        );
        let _ = writeln!(
            out,
            "# HELP panel_lease_expiries_total Steps taken over after their worker's lease expired (all services).\n# TYPE panel_lease_expiries_total counter\npanel_lease_expiries_total {interrupted}"
        );
        let _ = writeln!(
            out,
            "# HELP panel_storage_writable 0 while this process's writes to the database fail (a full disk), else 1.\n# TYPE panel_storage_writable gauge\npanel_storage_writable {}",
            u8::from(writable)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges_in_exposition_format() {
        let m = Metrics::default();
        m.step_enqueued("test_message");
        m.step_claimed("test_message");
        m.attempt("test_message", "delivered", None, Some(250), "delivered");
        m.attempt("mail_tester", "temporary_failure", Some("transient"), None, "retrying");
        m.connection_error("tcp");
        m.delivered_after(0.04);
        let stats =
            QueueStats { queued: 2, retrying: 1, delivered: 5, oldest_due_age_secs: Some(7), ..Default::default() };
        let text = m.render(&stats, 3, true);
        for line in [
            "panel_steps_enqueued_total{origin=\"test_message\"} 1",
            "panel_attempts_total{outcome=\"delivered\",class=\"none\",code=\"250\"} 1",
            "panel_attempts_total{outcome=\"temporary_failure\",class=\"transient\",code=\"\"} 1",
            "panel_steps_finished_total{origin=\"test_message\",state=\"delivered\"} 1",
            "panel_relay_connection_errors_total{stage=\"tcp\"} 1",
            "panel_delivery_seconds_bucket{le=\"0.025\"} 0",
            "panel_delivery_seconds_bucket{le=\"0.05\"} 1",
            "panel_delivery_seconds_bucket{le=\"+Inf\"} 1",
            "panel_delivery_seconds_count 1",
            "panel_messages{state=\"delivered\"} 5",
            "panel_queue_depth 3",
            "panel_queue_oldest_due_seconds 7",
            "panel_lease_expiries_total 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        assert!(!text.contains("retrying\"} 1\npanel_steps_finished"), "a retry is not a finished step");
    }
}
