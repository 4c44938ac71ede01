//! Schedules on a clock the test moves: on time, caught up after downtime (once, saying how
//! many fire times it missed), and exactly once when two services look at the same moment.

use chrono::Duration;
use panel_automation::ScheduleDef;
use panel_domain::run::{RunStatus, Trigger};
use panel_service::views::{Run, SaveMode};
use serde_json::json;

use crate::harness::Harness;

fn every_second(name: &str) -> ScheduleDef {
    serde_json::from_value(json!({
        "name": name, "enabled": true, "timezone": "UTC", "cron": "* * * * * *",
        "steps": [{"kind": "email", "subject": "tick {{ schedule.fire_time }}", "text": "t", "to": ["a@example.org"]}]
    }))
    .unwrap()
}

async fn runs(h: &Harness, name: &str) -> Vec<Run> {
    let mut runs = h.panel.history("schedule", name, 100).await.unwrap();
    runs.sort_by_key(|r| r.id);
    runs
}

#[tokio::test]
async fn after_downtime_a_missed_schedule_runs_once_and_says_it_was_late_then_runs_on_time() {
    let h = Harness::start(None, &[]).await;
    h.panel.save_schedule(&every_second("tick"), SaveMode::Create, "test").await.unwrap();
    assert_eq!(h.panel.fire_due_schedules("svc").await.unwrap(), 0, "nothing is due yet");

    // No service ran for 3.5 s: three fire times passed.
    h.clock.advance(Duration::milliseconds(3500));
    assert_eq!(h.panel.fire_due_schedules("svc").await.unwrap(), 1, "the latest fire time runs, once");
    assert_eq!(h.panel.fire_due_schedules("svc").await.unwrap(), 0, "and not again");
    let after_downtime = runs(&h, "tick").await;
    assert_eq!(after_downtime.len(), 1);
    let first = &after_downtime[0];
    assert_eq!((first.trigger, first.status, first.missed), (Trigger::CatchUp, RunStatus::Queued, 2), "{first:#?}");
    assert!(first.detail.as_deref().unwrap().contains("2 earlier fire time(s) passed"), "{first:#?}");

    // Back on time: the next second's fire time runs as cron, with nothing missed.
    h.clock.advance(Duration::seconds(1));
    assert_eq!(h.panel.fire_due_schedules("svc").await.unwrap(), 1);
    let all = runs(&h, "tick").await;
    assert_eq!((all[1].trigger, all[1].missed), (Trigger::Cron, 0), "{:#?}", all[1]);
    assert_eq!((all[1].fire_time.unwrap() - all[0].fire_time.unwrap()).num_seconds(), 1);
    assert_eq!(all.iter().map(|r| r.messages.len()).sum::<usize>(), 2, "one message per run");
}

#[tokio::test]
async fn two_services_at_the_same_moment_run_a_fire_time_once() {
    let h = Harness::start(None, &[]).await;
    let other = h.another_service().await;
    h.panel.save_schedule(&every_second("race"), SaveMode::Create, "test").await.unwrap();
    for _ in 0..5 {
        h.clock.advance(Duration::seconds(1));
        let (a, b) = tokio::join!(h.panel.fire_due_schedules("one"), other.fire_due_schedules("two"));
        assert_eq!(a.unwrap() + b.unwrap(), 1, "exactly one service runs each fire time");
    }
    let all = runs(&h, "race").await;
    assert_eq!(all.len(), 5);
    let mut times: Vec<_> = all.iter().map(|r| r.fire_time.unwrap()).collect();
    times.dedup();
    assert_eq!(times.len(), 5, "no fire time twice: {all:#?}");
    assert!(all.iter().all(|r| r.trigger == Trigger::Cron && r.missed == 0));
}
