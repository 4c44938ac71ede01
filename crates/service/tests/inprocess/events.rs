//! Events run the workflows they trigger as stored at that moment, also when another service
//! or the CLI changed them: each service keeps the workflows in memory only while the
//! definitions generation says they are current.

use panel_automation::{Template, WorkflowDef};
use panel_service::Panel;
use panel_service::views::{DefinitionKind, SaveMode};
use serde_json::json;

use crate::harness::Harness;

fn template(subject: &str) -> Template {
    Template { subject: subject.into(), text: "Welcome, {{ object.login }}.".into(), html: None }
}

/// The subjects of the messages the event's runs queued, by workflow run.
async fn subjects(panel: &Panel, login: &str) -> Vec<String> {
    let object = json!({"login": login, "mail": format!("{login}@example.org")});
    let event = panel.post_event("user.created", &object, None, "test").await.unwrap();
    let mut subjects = Vec::new();
    for run in event.runs {
        // The answer holds each run as written; a read of it now (no worker runs here) agrees.
        let read = panel.run(run.id).await.unwrap();
        assert_eq!(serde_json::to_value(&run).unwrap(), serde_json::to_value(&read).unwrap());
        subjects.extend(run.messages.into_iter().map(|m| m.subject));
    }
    subjects
}

/// `welcome` on `user.created`: the `welcome` template to the object's mail.
fn welcome_workflow() -> WorkflowDef {
    serde_json::from_value(json!({
        "name": "welcome", "trigger": "user.created",
        "steps": [{"kind": "email", "template": "welcome", "to": ["{{ object.mail }}"]}]
    }))
    .unwrap()
}

#[tokio::test]
async fn an_event_runs_the_workflows_and_templates_as_they_are_now_whoever_changed_them() {
    let h = Harness::start(None, &[]).await;
    let other = h.another_service().await;
    h.panel.save_template("welcome", &template("Hello {{ object.login }}"), SaveMode::Create, "test").await.unwrap();
    let workflow = welcome_workflow();
    h.panel.save_workflow(&workflow, SaveMode::Create, "test").await.unwrap();
    assert_eq!(subjects(&h.panel, "ann").await, ["Hello ann"]);
    assert_eq!(subjects(&h.panel, "bob").await, ["Hello bob"], "the same, from memory");

    // Another service changes the template, then disables and enables the workflow: the next
    // event here sees each change at once.
    other.save_template("welcome", &template("Hi {{ object.login }}"), SaveMode::Update, "test").await.unwrap();
    assert_eq!(subjects(&h.panel, "cy").await, ["Hi cy"]);
    other.set_enabled(DefinitionKind::Workflow, "welcome", false, "test").await.unwrap();
    assert!(subjects(&h.panel, "dee").await.is_empty(), "a disabled workflow runs no more");
    other.set_enabled(DefinitionKind::Workflow, "welcome", true, "test").await.unwrap();
    let second = WorkflowDef { name: "audit".into(), ..workflow.clone() };
    other.save_workflow(&second, SaveMode::Create, "test").await.unwrap();
    let mut both = subjects(&h.panel, "eve").await;
    both.sort();
    assert_eq!(both, ["Hi eve", "Hi eve"], "both workflows run");
    other.delete_definition(DefinitionKind::Workflow, "audit", "test").await.unwrap();
    assert_eq!(subjects(&h.panel, "fay").await, ["Hi fay"], "a deleted workflow runs no more");
}

#[tokio::test]
async fn a_workflow_that_reads_the_event_gets_its_id_and_one_that_does_not_is_planned_alike() {
    let h = Harness::start(None, &[]).await;
    let workflow = |name: &str, subject: &str| -> WorkflowDef {
        serde_json::from_value(json!({
            "name": name, "trigger": "user.created",
            "steps": [{"kind": "email", "subject": subject, "text": "t", "to": ["{{ object.mail }}"]}]
        }))
        .unwrap()
    };
    // Runs that read only the object are planned before the event is stored, the others inside
    // its commit, once it has an id: both kinds in one event.
    h.panel
        .save_workflow(&workflow("a-id", "Event {{ event.id }} for {{ object.login }}"), SaveMode::Create, "test")
        .await
        .unwrap();
    h.panel.save_workflow(&workflow("b-plain", "Plain {{ object.login }}"), SaveMode::Create, "test").await.unwrap();
    for login in ["gus", "hal"] {
        let object = json!({"login": login, "mail": format!("{login}@example.org")});
        let event = h.panel.post_event("user.created", &object, None, "test").await.unwrap();
        let subjects: Vec<String> = event.runs.iter().map(|r| r.messages[0].subject.clone()).collect();
        assert_eq!(subjects, [format!("Event {} for {login}", event.id), format!("Plain {login}")]);
        assert!(event.runs.iter().all(|r| r.event_id == Some(event.id)), "{:?}", event.runs);
    }
    // Alone, the one that reads nothing of the event still belongs to its event.
    h.panel.set_enabled(DefinitionKind::Workflow, "a-id", false, "test").await.unwrap();
    let event = h
        .panel
        .post_event("user.created", &json!({"login": "ida", "mail": "ida@example.org"}), None, "test")
        .await
        .unwrap();
    assert_eq!(event.runs.len(), 1);
    let run = h.panel.run(event.runs[0].id).await.unwrap();
    assert_eq!((run.event_id, run.messages[0].subject.as_str()), (Some(event.id), "Plain ida"));
}

/// A request (an API token's) takes the settings and workflows this service keeps in memory
/// only while they are as new as what was current when it was authenticated (`Panel::as_seen`):
/// whatever another service saved before that, the request sees, for events and for messages.
#[tokio::test]
async fn a_request_sees_every_change_saved_before_it_was_authenticated_whichever_service_saved_it() {
    use panel_domain::Secret;
    use panel_domain::settings::patch::Channel;
    use panel_service::accounts::Role;

    let h = Harness::start(None, &[]).await;
    let other = h.another_service().await;
    h.panel.put_admin("ann", Role::Operator, &Secret::new("ann-password-123".into()), false, "test").await.unwrap();
    let token = h.panel.create_api_token("ann", "hr-sync").await.unwrap();
    let request = || async { h.panel.as_seen(h.panel.authenticate(&token).await.unwrap().unwrap().seen) };
    h.panel.save_template("welcome", &template("Hello {{ object.login }}"), SaveMode::Create, "test").await.unwrap();
    let workflow = welcome_workflow();
    h.panel.save_workflow(&workflow, SaveMode::Create, "test").await.unwrap();
    assert_eq!(subjects(&request().await, "ann").await, ["Hello ann"]);
    let mail_from = |p: Panel| async move {
        let draft = panel_domain::message::Draft { subject: "x".into(), text: "x".into(), ..Default::default() };
        let id = p.enqueue_draft(panel_domain::Origin::MailTester, &draft, None).await.unwrap().0;
        p.message(id).await.unwrap().from
    };
    assert!(mail_from(request().await).await.contains("panel@example.org"));
    // Both are kept here now. Another service changes the template, then the sender.
    other.save_template("welcome", &template("Hi {{ object.login }}"), SaveMode::Update, "test").await.unwrap();
    assert_eq!(subjects(&request().await, "bob").await, ["Hi bob"]);
    let from = panel_domain::SettingsDoc::from_texts([("from", "Other <other@example.org>")]).unwrap();
    other.update_settings(&from, "test", Channel::Local).await.unwrap();
    assert!(mail_from(request().await).await.contains("other@example.org"));
    assert_eq!(subjects(&request().await, "cy").await, ["Hi cy"]);
    // The service's own save, too.
    let back = panel_domain::SettingsDoc::from_texts([("from", "Panel <panel@example.org>")]).unwrap();
    h.panel.update_settings(&back, "test", Channel::Local).await.unwrap();
    assert!(mail_from(request().await).await.contains("panel@example.org"));
}
