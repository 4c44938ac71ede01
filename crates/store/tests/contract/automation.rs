//! Schedules, events and runs on both backends: each fire time runs once however many services
//! race for it, and an event's idempotency key runs its workflows once.

use crate::common::{Backend, message};
use chrono::{Duration, Utc};
use panel_domain::Origin;
use panel_domain::run::{RunKind, RunStatus, Trigger};
use panel_store::{DefinitionKind, NewDefinition, NewRun, PlannedStep, SaveMode, SaveOutcome, ScheduleAdvance};
use serde_json::json;

fn run(name: &str, fire_key: Option<String>, service: &str) -> NewRun {
    NewRun {
        kind: RunKind::Schedule,
        name: name.into(),
        trigger: Trigger::Cron,
        fire_key,
        fire_time: Some(Utc::now()),
        event_id: None,
        missed: 0,
        status: RunStatus::Queued,
        detail: None,
        service: service.into(),
        steps: vec![PlannedStep {
            outcome: json!({"step": 0, "status": "queued"}),
            message: Some((Origin::Schedule, message(name))),
        }],
    }
}

async fn schedule(b: &Backend, name: &str, next: chrono::DateTime<Utc>) {
    let def = NewDefinition {
        kind: DefinitionKind::Schedule,
        name: name.into(),
        doc: json!({"name": name}),
        enabled: true,
        trigger: None,
        next_fire_at: Some(next),
    };
    assert_eq!(b.store.save_definition(&def, SaveMode::Create, "t", Utc::now()).await.unwrap(), SaveOutcome::Created);
}

async fn each_fire_time_runs_once_when_services_race(b: &Backend) {
    let due = Utc::now() - Duration::seconds(1);
    schedule(b, "nightly", due).await;
    assert_eq!(b.store.due_schedules(Utc::now()).await.unwrap().len(), 1);
    let advance = ScheduleAdvance {
        name: "nightly".into(),
        expected_next: due,
        fire_time: due,
        new_next: Some(due + Duration::days(1)),
    };
    let key = format!("schedule:nightly@{}", due.timestamp_millis());
    let mut tasks = Vec::new();
    for i in 0..6 {
        let store = b.store.clone();
        let (advance, key) = (advance.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            store.commit_run(run("nightly", Some(key), &format!("svc{i}")), Some(&advance), Utc::now()).await.unwrap()
        }));
    }
    let mut written = Vec::new();
    for t in tasks {
        written.extend(t.await.unwrap());
    }
    assert_eq!(written.len(), 1, "one run for one fire time: {written:?}");
    let runs = b.store.runs("schedule", "nightly", 10).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].messages.len(), 1, "the run's message is queued with it");
    assert_eq!(runs[0].steps[0]["message_id"], runs[0].messages[0].id);
    assert!(b.store.due_schedules(Utc::now()).await.unwrap().is_empty(), "advanced past the fire time");
    // The same fire key can never be written twice, even without the compare-and-set.
    assert!(b.store.commit_run(run("nightly", Some(key), "late"), None, Utc::now()).await.unwrap().is_none());
}

async fn a_repeated_event_key_runs_nothing_again(b: &Backend) {
    let object = json!({"id": 7});
    let first = b
        .store
        .record_event(
            "user.created",
            &object,
            Some("evt-7"),
            Utc::now(),
            Box::new(|_| vec![run("welcome", None, "s")].into()),
        )
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.runs.len(), 1);
    let again = b
        .store
        .record_event(
            "user.created",
            &object,
            Some("evt-7"),
            Utc::now(),
            Box::new(|_| panic!("must not plan runs again")),
        )
        .await
        .unwrap();
    assert!(!again.created);
    let ids = |runs: &[panel_store::RunRow]| runs.iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!((again.id, ids(&again.runs)), (first.id, ids(&first.runs)));
    let r = b.store.run(first.runs[0].id).await.unwrap().unwrap();
    assert_eq!(r.event_id, Some(first.id));
    let same = |a: &panel_store::RunRow| serde_json::to_value(a).unwrap();
    assert_eq!(
        (same(&first.runs[0]), same(&again.runs[0])),
        (same(&r), same(&r)),
        "the answers hold the run as stored"
    );
}

async fn concurrent_events_share_commits_and_each_gets_its_runs(b: &Backend) {
    // 20 events, the last two alike (interchangeable), each with a run and a message of its own.
    let at = Utc::now();
    let tasks: Vec<_> = (0..22)
        .map(|i| {
            let s = b.store.clone();
            let n = i.min(20);
            tokio::spawn(async move {
                let plan: panel_store::EventPlan =
                    Box::new(move |_| vec![run(&format!("welcome-{n}"), None, &format!("s{i}"))].into());
                s.record_event("user.created", &json!({"id": n}), None, at, plan).await
            })
        })
        .collect();
    let mut events = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let record = t.await.unwrap().unwrap();
        assert!(record.created && record.runs.len() == 1);
        let r = b.store.run(record.runs[0].id).await.unwrap().unwrap();
        assert_eq!(r.event_id, Some(record.id), "each run belongs to its own event");
        let written = serde_json::to_value(&record.runs[0]).unwrap();
        assert_eq!(written, serde_json::to_value(&r).unwrap(), "the answer holds the run as written");
        assert_eq!((r.name.clone(), r.service.clone()), (format!("welcome-{}", i.min(20)), format!("s{i}")));
        assert_eq!(r.messages.len(), 1, "{r:?}");
        assert_eq!(r.messages[0].subject, r.name, "the run's own message");
        assert_eq!(r.steps[0]["message_id"], json!(r.messages[0].id), "its step names it");
        events.push(record.id);
    }
    events.sort();
    events.dedup();
    assert_eq!(events.len(), 22);
}

async fn definitions_are_created_updated_and_enabled(b: &Backend) {
    let def = |enabled| NewDefinition {
        kind: DefinitionKind::Workflow,
        name: "welcome".into(),
        doc: json!({"name": "welcome", "v": 1}),
        enabled,
        trigger: Some("user.created".into()),
        next_fire_at: None,
    };
    let s = &b.store;
    let now = Utc::now();
    // Every change moves the definitions generation on (services keep workflows in memory
    // until it moves); a save that changes nothing does not.
    let generation = async || s.settings_and_definitions().await.unwrap().1;
    let start = generation().await;
    assert_eq!(s.save_definition(&def(true), SaveMode::Update, "t", now).await.unwrap(), SaveOutcome::Missing);
    assert_eq!(generation().await, start, "nothing saved");
    assert_eq!(s.save_definition(&def(true), SaveMode::Create, "t", now).await.unwrap(), SaveOutcome::Created);
    assert_eq!(s.save_definition(&def(true), SaveMode::Create, "t", now).await.unwrap(), SaveOutcome::Exists);
    assert_eq!(generation().await, start + 1, "created once");
    let enabled = s.enabled_workflows().await.unwrap();
    assert_eq!(
        enabled.iter().map(|w| (w.name.as_str(), w.trigger.as_deref())).collect::<Vec<_>>(),
        [("welcome", Some("user.created"))]
    );
    assert!(s.set_enabled(DefinitionKind::Workflow, "welcome", false, None, "t", now).await.unwrap());
    assert!(s.enabled_workflows().await.unwrap().is_empty(), "a disabled workflow is not enabled");
    assert_eq!(generation().await, start + 2, "disabled");
    let audit: Vec<String> = s.audit_log(10).await.unwrap().into_iter().map(|a| a.action).collect();
    assert!(audit.contains(&"workflow.created".to_string()) && audit.contains(&"workflow.disabled".to_string()));
    assert!(s.delete_definition(DefinitionKind::Workflow, "welcome", "t", now).await.unwrap());
    assert!(s.definition(DefinitionKind::Workflow, "welcome").await.unwrap().is_none());
    assert_eq!(generation().await, start + 3, "deleted");
    assert!(s.settings_and_definitions().await.unwrap().0.is_none(), "no settings saved yet");
}

/// A run with `steps` steps, each queueing a message whose subject names the run and the step.
fn run_of(name: &str, steps: usize) -> NewRun {
    let mut r = run(name, None, "s");
    r.steps = (0..steps)
        .map(|i| PlannedStep {
            outcome: json!({"step": i, "status": "queued"}),
            message: Some((Origin::Workflow, message(&format!("{name} {i}")))),
        })
        .collect();
    r
}

async fn an_events_runs_are_its_own_among_runs_started_at_the_same_instant(b: &Backend) {
    // Keyed events received at one instant, each with runs of its own; their runs are found
    // again by that instant and told apart by event.
    let at = Utc::now();
    let mut first = Vec::new();
    for n in 0..3 {
        let plan: panel_store::EventPlan =
            Box::new(move |_| vec![run_of(&format!("e{n}-a"), 2), run_of(&format!("e{n}-b"), 1)].into());
        let (object, key) = (json!({"n": n}), format!("same-{n}"));
        first.push(b.store.record_event("user.created", &object, Some(&key), at, plan).await.unwrap());
    }
    for (n, record) in first.iter().enumerate() {
        let (object, key) = (json!({"n": n}), format!("same-{n}"));
        let again = b
            .store
            .record_event("user.created", &object, Some(&key), at, Box::new(|_| Vec::new().into()))
            .await
            .unwrap();
        assert!(!again.created);
        let names: Vec<&str> = again.runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, [format!("e{n}-a"), format!("e{n}-b")], "event {n}: its own runs, in order");
        assert_eq!(serde_json::to_value(&again.runs).unwrap(), serde_json::to_value(&record.runs).unwrap());
        let subjects: Vec<&str> = again.runs[0].messages.iter().map(|m| m.subject.as_str()).collect();
        assert_eq!(subjects, [format!("e{n}-a 0"), format!("e{n}-a 1")], "each run with its own messages");
    }
}

async fn a_listing_holds_every_runs_messages_past_one_querys_worth(b: &Backend) {
    // 25 runs of 50 steps: 1,250 messages, more than one query of the listing names.
    for _ in 0..25 {
        b.store.commit_run(run_of("big", 50), None, Utc::now()).await.unwrap().unwrap();
    }
    let runs = b.store.runs("schedule", "big", 100).await.unwrap();
    assert_eq!(runs.len(), 25);
    for r in &runs {
        let ids: Vec<i64> = r.messages.iter().map(|m| m.id).collect();
        let named: Vec<i64> = r.steps.as_array().unwrap().iter().map(|s| s["message_id"].as_i64().unwrap()).collect();
        assert_eq!(ids, named, "run {}: each step's message, in order", r.id);
        let subjects: Vec<String> = r.messages.iter().map(|m| m.subject.clone()).collect();
        assert_eq!(subjects, (0..50).map(|i| format!("big {i}")).collect::<Vec<_>>());
    }
}

contract!(
    an_events_runs_are_its_own_among_runs_started_at_the_same_instant,
    a_listing_holds_every_runs_messages_past_one_querys_worth,
    concurrent_events_share_commits_and_each_gets_its_runs,
    each_fire_time_runs_once_when_services_race,
    a_repeated_event_key_runs_nothing_again,
    definitions_are_created_updated_and_enabled
);
