//! Templates, workflows, schedules, events and dispatches: validation on save, and turning a
//! definition plus a context into a run whose messages are queued in the same transaction.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use panel_automation::{DispatchDef, Rendered, ScheduleDef, Sender, Step, Template, WorkflowDef, event_context};
use panel_domain::run::{RunKind, RunStatus, Trigger};
use panel_domain::{FieldErrors, Origin, OutgoingMessage, Priority, RelaySettings};
use panel_store::{
    DefinitionKind, DefinitionRow, NewDefinition, NewRun, PlannedStep, SaveMode, SaveOutcome, ScheduleAdvance,
};
use serde_json::Value;

use crate::error::OpsError;
use crate::ops::Panel;
use crate::views::{Definition, Run};

/// A schedule's upcoming fire times, as `panel schedule next` and the API show them.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct ScheduleNext {
    pub name: String,
    /// The time rule in words, e.g. `cron 0 9 * * MON-FRI (Europe/Berlin)`.
    pub rule: String,
    pub next: Vec<String>,
}

/// Fire times up to this late count as on time in the history.
const LATE_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

fn not_found(kind: DefinitionKind, name: &str) -> OpsError {
    OpsError::NotFoundNamed { what: kind.as_str(), name: name.to_string() }
}

fn saved(kind: DefinitionKind, name: &str, outcome: SaveOutcome) -> Result<SaveOutcome, OpsError> {
    match outcome {
        SaveOutcome::Exists => Err(OpsError::Conflict(format!(
            "a {} named '{name}' exists already; change it with `update` instead of `create`",
            kind.as_str()
        ))),
        SaveOutcome::Missing => Err(not_found(kind, name)),
        ok => Ok(ok),
    }
}

fn parse_doc<T: serde::de::DeserializeOwned>(row: &DefinitionRow) -> Result<T, OpsError> {
    parse_row(row).map_err(corrupt)
}

/// A stored definition's document, or what is wrong with it.
fn parse_row<T: serde::de::DeserializeOwned>(row: &DefinitionRow) -> Result<T, String> {
    serde_json::from_value(row.doc.clone()).map_err(|e| format!("{} '{}': {e}", row.kind.as_str(), row.name))
}

fn corrupt(what: String) -> OpsError {
    OpsError::Store(panel_store::StoreError::Corrupt(what))
}

/// A workflow and the stored templates its steps name (one missing fails its step when it runs).
struct Workflow {
    def: WorkflowDef,
    templates: HashMap<String, Template>,
    /// Whether its condition or a step may read `event` (its id is known only once stored).
    reads_event: bool,
}

/// The enabled workflows by trigger, parsed, as of one definitions generation. Every change to
/// a template or workflow, by any service or the CLI, moves the generation in its own
/// transaction, and each event reads the generation with the settings: a kept copy is used only
/// while it is current, so an event sees what it would have read.
pub(crate) struct Workflows {
    generation: i64,
    /// A workflow stored in a shape this build cannot read fails the events it would run, as
    /// reading it for each event did, and no others.
    by_trigger: HashMap<String, Vec<Result<Arc<Workflow>, String>>>,
}

/// What an event's runs are planned from. The plan owns it: the store may run it in a group
/// commit (and again, if the group fails and each write is committed alone), after
/// `post_event` handed it over.
struct EventInputs {
    workflows: Vec<Arc<Workflow>>,
    settings: RelaySettings,
    event: String,
    object: Value,
    now: DateTime<Utc>,
    by: String,
}

impl EventInputs {
    /// The runs of the workflows whose condition holds, each step rendered, for the event `id`.
    fn plan(&self, id: i64) -> Vec<NewRun> {
        let EventInputs { workflows, settings, event, object, now, by } = self;
        plan_event(workflows, settings, (event, object, *now), by, id)
    }
}

/// `EventInputs::plan` on borrowed inputs: an event whose runs do not read its id is planned
/// before it is stored, with nothing copied.
fn plan_event(
    workflows: &[Arc<Workflow>],
    settings: &RelaySettings,
    (event, object, now): (&str, &Value, DateTime<Utc>),
    by: &str,
    id: i64,
) -> Vec<NewRun> {
    // Made into the engine's values once for all of the event's workflows and steps.
    let ctx = panel_automation::template::context(&event_context(id, event, object, now));
    let planned = workflows.iter().filter_map(|w| {
        let (status, detail, steps) = match w.def.matches(&ctx) {
            Ok(false) => return None,
            Ok(true) => plan_steps(&w.def.steps, &ctx, &w.templates, settings, (Origin::Workflow, w.def.priority), now),
            Err(e) => (RunStatus::Failed, Some(format!("the condition could not be evaluated: {e}")), vec![]),
        };
        Some(NewRun {
            kind: RunKind::Workflow,
            name: w.def.name.clone(),
            trigger: Trigger::Event,
            fire_key: None,
            fire_time: None,
            event_id: Some(id),
            missed: 0,
            status,
            detail,
            service: by.to_string(),
            steps,
        })
    });
    planned.collect()
}

impl Panel {
    // ---- templates ----

    pub async fn save_template(
        &self,
        name: &str,
        template: &Template,
        mode: SaveMode,
        by: &str,
    ) -> Result<SaveOutcome, OpsError> {
        let mut errors = FieldErrors::default();
        if let Err(e) = panel_automation::check_name(name) {
            errors.push("name", e);
        }
        if let Err(problems) = template.check() {
            problems.into_iter().for_each(|p| errors.push(p.part.clone(), p.to_string()));
        }
        if !errors.is_empty() {
            return Err(OpsError::Invalid(errors));
        }
        let def = NewDefinition {
            kind: DefinitionKind::Template,
            name: name.into(),
            doc: serde_json::to_value(template).expect("a template serializes"),
            enabled: true,
            trigger: None,
            next_fire_at: None,
        };
        saved(DefinitionKind::Template, name, self.store.save_definition(&def, mode, by, self.now()).await?)
    }

    pub async fn template(&self, name: &str) -> Result<Template, OpsError> {
        let row = self.definition_row(DefinitionKind::Template, name).await?;
        parse_doc(&row)
    }

    /// Renders a stored template against `data` without sending anything.
    pub async fn render_template(&self, name: &str, data: &Value) -> Result<Rendered, OpsError> {
        self.template(name).await?.render(data).map_err(OpsError::Template)
    }

    // ---- shared by all definitions ----

    pub async fn definition(&self, kind: DefinitionKind, name: &str) -> Result<Definition, OpsError> {
        Ok(self.definition_row(kind, name).await?.into())
    }

    async fn definition_row(&self, kind: DefinitionKind, name: &str) -> Result<DefinitionRow, OpsError> {
        self.store.definition(kind, name).await?.ok_or_else(|| not_found(kind, name))
    }

    pub async fn definitions(&self, kind: DefinitionKind) -> Result<Vec<Definition>, OpsError> {
        Ok(self.store.definitions(kind).await?.into_iter().map(Into::into).collect())
    }

    pub async fn delete_definition(&self, kind: DefinitionKind, name: &str, by: &str) -> Result<(), OpsError> {
        if kind == DefinitionKind::Template {
            let users = self.template_users(name).await?;
            if !users.is_empty() {
                return Err(OpsError::Conflict(format!(
                    "template '{name}' is used by {}; change or delete those first",
                    users.join(", ")
                )));
            }
        }
        match self.store.delete_definition(kind, name, by, self.now()).await? {
            true => Ok(()),
            false => Err(not_found(kind, name)),
        }
    }

    /// Workflows and schedules whose steps name template `name`.
    async fn template_users(&self, name: &str) -> Result<Vec<String>, OpsError> {
        let mut users = Vec::new();
        for kind in [DefinitionKind::Workflow, DefinitionKind::Schedule] {
            for row in self.store.definitions(kind).await? {
                let steps = row.doc.get("steps").cloned().unwrap_or_default();
                let steps: Vec<Step> = serde_json::from_value(steps).unwrap_or_default();
                if steps.iter().any(|s| s.template_name() == Some(name)) {
                    users.push(format!("{} '{}'", kind.as_str(), row.name));
                }
            }
        }
        Ok(users)
    }

    pub async fn set_enabled(&self, kind: DefinitionKind, name: &str, enabled: bool, by: &str) -> Result<(), OpsError> {
        let row = self.definition_row(kind, name).await?;
        let next = match kind {
            // Counting from now: fire times that passed while disabled are not run.
            DefinitionKind::Schedule if enabled => {
                parse_doc::<ScheduleDef>(&row)?.validate().map_err(OpsError::Invalid)?.next_after(self.now())
            }
            DefinitionKind::Schedule => None,
            _ => row.next_fire_at,
        };
        self.store.set_enabled(kind, name, enabled, next, by, self.now()).await?;
        Ok(())
    }

    /// A definition's own problems and its missing templates, reported together (the first
    /// kind must not hide the second).
    async fn check_definition<T>(&self, own: Result<T, FieldErrors>, steps: &[Step]) -> Result<T, OpsError> {
        let missing = self.missing_templates(steps).await?;
        match own {
            Ok(t) if missing.is_empty() => Ok(t),
            Ok(_) => Err(OpsError::Invalid(missing)),
            Err(mut errors) => {
                errors.0.extend(missing.0);
                Err(OpsError::Invalid(errors))
            }
        }
    }

    /// Every step must name an existing template.
    async fn missing_templates(&self, steps: &[Step]) -> Result<FieldErrors, OpsError> {
        let mut errors = FieldErrors::default();
        for (i, step) in steps.iter().enumerate() {
            if let Some(t) = step.template_name()
                && self.store.definition(DefinitionKind::Template, t).await?.is_none()
            {
                errors.push(
                    format!("steps[{i}].template"),
                    format!("no template is named '{t}'; create it first: panel template set {t} ..."),
                );
            }
        }
        Ok(errors)
    }

    // ---- workflows ----

    pub async fn save_workflow(&self, def: &WorkflowDef, mode: SaveMode, by: &str) -> Result<SaveOutcome, OpsError> {
        self.check_definition(def.validate(), &def.steps).await?;
        let row = NewDefinition {
            kind: DefinitionKind::Workflow,
            name: def.name.clone(),
            doc: serde_json::to_value(def).expect("a workflow serializes"),
            enabled: def.enabled,
            trigger: Some(def.trigger.clone()),
            next_fire_at: None,
        };
        saved(DefinitionKind::Workflow, &def.name, self.store.save_definition(&row, mode, by, self.now()).await?)
    }

    /// Stores an event, runs every enabled workflow it triggers whose condition holds, and
    /// queues their messages, all in one transaction.
    pub async fn post_event(
        &self,
        event_type: &str,
        object: &Value,
        idempotency_key: Option<&str>,
        by: &str,
    ) -> Result<crate::views::Event, OpsError> {
        let mut errors = FieldErrors::default();
        if let Err(e) = panel_automation::check_name(event_type) {
            errors.push("type", e);
        }
        if !object.is_object() {
            errors.push("object", "must be a JSON object");
        }
        let key = idempotency_key.and_then(|k| errors.take(crate::ops::validate_idempotency_key(k)));
        if !errors.is_empty() {
            return Err(OpsError::Invalid(errors));
        }
        // The settings and workflows kept in memory when they are as new as the request saw
        // (`Seen`), else one read: the settings, and whether the workflows kept are current.
        let kept = self.seen.as_ref().and_then(|seen| {
            let (_, settings) = self.kept_settings()?;
            let workflows = self.workflows.lock().expect("not poisoned");
            let generation = workflows.as_ref().map(|w| w.generation).filter(|&g| g >= seen.definitions)?;
            Some((settings, generation))
        });
        let (settings, generation) = match kept {
            Some(kept) => kept,
            None => {
                let (stored, generation) = self.store.settings_and_definitions().await?;
                let read = crate::settings::valid_settings(stored)?;
                self.keep_settings(&read);
                (read.ok_or(OpsError::NotConfigured)?.1, generation)
            }
        };
        let workflows = self.triggered(event_type, generation).await?;
        let now = self.now();
        let plan: panel_store::EventPlan = if workflows.iter().any(|w| w.reads_event) {
            let inputs = EventInputs {
                workflows,
                settings,
                event: event_type.to_string(),
                object: object.clone(),
                now,
                by: by.to_string(),
            };
            Box::new(move |event_id| inputs.plan(event_id).into())
        } else {
            // Nothing the runs render reads the event (its id is known only inside the store's
            // commit): planned here, so the rendering does not hold up the group's writes.
            let runs: Arc<[NewRun]> = plan_event(&workflows, &settings, (event_type, object, now), by, 0).into();
            Box::new(move |_| runs.clone())
        };
        let record = self.store.record_event(event_type, object, key, now, plan).await?;
        if record.created {
            // New runs are as written: each of their messages was queued now.
            // The commit woke every service already.
            let queued = record.runs.iter().map(|r| r.messages.len()).sum();
            self.count_queued(Origin::Workflow, queued);
            if queued > 0 {
                self.wake_workers_after_commit().await;
            }
        }
        Ok(record.into())
    }

    // ---- schedules ----

    pub async fn save_schedule(&self, def: &ScheduleDef, mode: SaveMode, by: &str) -> Result<SaveOutcome, OpsError> {
        let timing = self.check_definition(def.validate(), &def.steps).await?;
        let row = NewDefinition {
            kind: DefinitionKind::Schedule,
            name: def.name.clone(),
            doc: serde_json::to_value(def).expect("a schedule serializes"),
            enabled: def.enabled,
            trigger: None,
            next_fire_at: if def.enabled { timing.next_after(self.now()) } else { None },
        };
        saved(DefinitionKind::Schedule, &def.name, self.store.save_definition(&row, mode, by, self.now()).await?)
    }

    /// The next `count` fire times of a schedule, as RFC 3339 times in its time zone.
    pub async fn schedule_next(&self, name: &str, count: usize) -> Result<ScheduleNext, OpsError> {
        let def: ScheduleDef = parse_doc(&self.definition_row(DefinitionKind::Schedule, name).await?)?;
        let timing = def.validate().map_err(OpsError::Invalid)?;
        let next = timing
            .upcoming(self.now(), count.min(1000))
            .iter()
            .map(|t| t.with_timezone(&timing.timezone).to_rfc3339())
            .collect();
        Ok(ScheduleNext { name: name.into(), rule: timing.describe(), next })
    }

    /// Runs a schedule now, whatever its time rule (and even when disabled): `panel schedule run`.
    pub async fn run_schedule(&self, name: &str, by: &str) -> Result<Run, OpsError> {
        let def: ScheduleDef = parse_doc(&self.definition_row(DefinitionKind::Schedule, name).await?)?;
        let timing = def.validate().map_err(OpsError::Invalid)?;
        let now = self.now();
        let (_, settings) = self.settings().await?.ok_or(OpsError::NotConfigured)?;
        let templates = self.templates_for(&def.steps).await?;
        let ctx = def.context(now, "manual", &timing);
        let planned = plan_steps(&def.steps, &ctx, &templates, &settings, (Origin::Schedule, def.priority), now);
        self.commit_adhoc((RunKind::Schedule, Trigger::Manual), &def.name, Some(now), planned, by, now).await
    }

    /// Fires every due schedule once. Several services may call this at once: the store lets
    /// only the first advance each schedule past a fire time. Returns how many runs this call made.
    pub async fn fire_due_schedules(&self, service_id: &str) -> Result<usize, OpsError> {
        let now = self.now();
        let due = self.store.due_schedules(now).await?;
        let mut fired = 0;
        for row in due {
            let Some(expected_next) = row.next_fire_at else { continue };
            match self.fire_schedule(&row, expected_next, now, service_id).await {
                Ok(true) => fired += 1,
                Ok(false) => {}
                Err(e) => tracing::error!(schedule = %row.name, error = %e, "could not fire the schedule"),
            }
        }
        Ok(fired)
    }

    async fn fire_schedule(
        &self,
        row: &DefinitionRow,
        expected_next: DateTime<Utc>,
        now: DateTime<Utc>,
        service_id: &str,
    ) -> Result<bool, OpsError> {
        let def: ScheduleDef = parse_doc(row)?;
        let (timing, catch_up) = match def.validate() {
            Ok(t) => {
                let c = t.catch_up(expected_next, now);
                (Some(t), c)
            }
            Err(_) => (None, panel_automation::CatchUp { fire_time: expected_next, missed: 0 }),
        };
        let fire_time = catch_up.fire_time;
        let late = now - fire_time;
        let trigger = if catch_up.missed > 0 || late > LATE_AFTER { Trigger::CatchUp } else { Trigger::Cron };
        let mut notes = Vec::new();
        if trigger == Trigger::CatchUp {
            notes.push(format!(
                "late: ran {}s after its fire time{}; missed fire times are not run again",
                late.num_seconds(),
                match catch_up.missed {
                    0 => String::new(),
                    n => format!(", {n} earlier fire time(s) passed while no Panel Service was running"),
                }
            ));
        }
        let (status, steps) = match (&timing, self.settings().await) {
            (None, _) => {
                notes.push("the stored schedule is invalid; fix it with panel schedule update".into());
                (RunStatus::Failed, vec![])
            }
            (_, Ok(None)) | (_, Err(_)) => {
                notes.push("no valid relay settings; configure them with panel smtp set".into());
                (RunStatus::Failed, vec![])
            }
            (Some(t), Ok(Some((_, settings)))) => {
                let templates = self.templates_for(&def.steps).await?;
                let ctx = def.context(fire_time, trigger.as_str(), t);
                let (status, detail, steps) =
                    plan_steps(&def.steps, &ctx, &templates, &settings, (Origin::Schedule, def.priority), now);
                notes.extend(detail);
                (status, steps)
            }
        };
        let advance = ScheduleAdvance {
            name: row.name.clone(),
            expected_next,
            fire_time,
            new_next: timing.as_ref().and_then(|t| t.next_after(fire_time.max(now))),
        };
        let run = NewRun {
            kind: RunKind::Schedule,
            name: row.name.clone(),
            trigger,
            fire_key: Some(format!("schedule:{}@{}", row.name, fire_time.timestamp_millis())),
            fire_time: Some(fire_time),
            event_id: None,
            missed: catch_up.missed,
            status,
            detail: (!notes.is_empty()).then(|| notes.join("; ")),
            service: service_id.into(),
            steps,
        };
        let queued = messages_in(&run);
        let committed = self.store.commit_run(run, Some(&advance), now).await?;
        if committed.is_some() {
            self.queued(Origin::Schedule, queued).await;
        }
        Ok(committed.is_some())
    }

    // ---- dispatch and runs ----

    /// An ad-hoc run of inline steps from an outside tool.
    pub async fn dispatch(&self, def: &DispatchDef, by: &str) -> Result<Run, OpsError> {
        self.check_definition(def.validate(), &def.steps).await?;
        let (_, settings) = self.settings().await?.ok_or(OpsError::NotConfigured)?;
        let templates = self.templates_for(&def.steps).await?;
        let now = self.now();
        let planned =
            plan_steps(&def.steps, &def.context(), &templates, &settings, (Origin::Dispatch, def.priority), now);
        self.commit_adhoc((RunKind::Dispatch, Trigger::Dispatch), &def.name, None, planned, by, now).await
    }

    /// Writes a run started by hand or by a tool (no fire key: it always runs) and shows it.
    async fn commit_adhoc(
        &self,
        (kind, trigger): (RunKind, Trigger),
        name: &str,
        fire_time: Option<DateTime<Utc>>,
        (status, detail, steps): Planned,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<Run, OpsError> {
        let origin = if kind == RunKind::Dispatch { Origin::Dispatch } else { Origin::Schedule };
        let run = NewRun {
            kind,
            name: name.into(),
            trigger,
            fire_key: None,
            fire_time,
            event_id: None,
            missed: 0,
            status,
            detail,
            service: by.into(),
            steps,
        };
        let queued = messages_in(&run);
        let id = self.store.commit_run(run, None, now).await?.expect("a run without a fire key is always written");
        self.queued(origin, queued).await;
        self.run(id).await
    }

    /// Counts `n` queued messages and wakes the workers for them.
    async fn queued(&self, origin: Origin, n: usize) {
        self.count_queued(origin, n);
        if n > 0 {
            self.wake_workers().await;
        }
    }

    fn count_queued(&self, origin: Origin, n: usize) {
        for _ in 0..n {
            self.metrics.step_enqueued(origin.as_str());
        }
    }

    pub async fn run(&self, id: i64) -> Result<Run, OpsError> {
        Ok(self.store.run(id).await?.ok_or(OpsError::NotFoundNamed { what: "run", name: id.to_string() })?.into())
    }

    /// The newest runs of a schedule, workflow or dispatch name.
    pub async fn history(&self, kind: &str, name: &str, limit: u32) -> Result<Vec<Run>, OpsError> {
        Ok(self.store.runs(kind, name, limit).await?.into_iter().map(Into::into).collect())
    }

    /// The enabled workflows `event_type` triggers, from memory while `generation` is the
    /// definitions generation they were read at.
    async fn triggered(&self, event_type: &str, generation: i64) -> Result<Vec<Arc<Workflow>>, OpsError> {
        let kept = self.workflows.lock().expect("not poisoned").clone().filter(|w| w.generation == generation);
        let current = match kept {
            Some(current) => current,
            None => {
                // Read after the generation: a change in between moves it again, and the next
                // event reads once more.
                let read = Arc::new(self.read_workflows(generation).await?);
                *self.workflows.lock().expect("not poisoned") = Some(read.clone());
                read
            }
        };
        let triggered = current.by_trigger.get(event_type).map(Vec::as_slice).unwrap_or_default();
        triggered.iter().map(|w| w.clone().map_err(corrupt)).collect()
    }

    /// Every enabled workflow with the templates it names: two reads, whatever their number.
    async fn read_workflows(&self, generation: i64) -> Result<Workflows, OpsError> {
        let (rows, templates) =
            tokio::try_join!(self.store.enabled_workflows(), self.store.definitions(DefinitionKind::Template))?;
        let templates: HashMap<&str, &DefinitionRow> = templates.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut by_trigger: HashMap<String, Vec<Result<Arc<Workflow>, String>>> = HashMap::new();
        for row in &rows {
            let Some(trigger) = &row.trigger else { continue };
            let workflow = parse_row::<WorkflowDef>(row).and_then(|def| {
                let named = def.steps.iter().filter_map(Step::template_name).filter_map(|name| templates.get(name));
                let templates = named.map(|t| Ok((t.name.clone(), parse_row(t)?))).collect::<Result<_, String>>()?;
                let reads_event = def.reads("event", &templates);
                Ok(Arc::new(Workflow { def, templates, reads_event }))
            });
            by_trigger.entry(trigger.clone()).or_default().push(workflow);
        }
        Ok(Workflows { generation, by_trigger })
    }

    /// The stored templates `steps` name (a missing one makes that step fail when it runs).
    async fn templates_for(&self, steps: &[Step]) -> Result<HashMap<String, Template>, OpsError> {
        let mut out = HashMap::new();
        for name in steps.iter().filter_map(Step::template_name) {
            if out.contains_key(name) {
                continue;
            }
            if let Some(row) = self.store.definition(DefinitionKind::Template, name).await? {
                out.insert(name.to_string(), parse_doc(&row)?);
            }
        }
        Ok(out)
    }
}

fn messages_in(run: &NewRun) -> usize {
    run.steps.iter().filter(|s| s.message.is_some()).count()
}

/// (run status, a note for the run, the planned steps).
type Planned = (RunStatus, Option<String>, Vec<PlannedStep>);

/// The pure plan (`panel_automation::plan_steps`: every step rendered, failures recorded with
/// their reason) in the shape the store commits, each message tagged with its origin.
fn plan_steps<C: serde::Serialize + ?Sized>(
    steps: &[Step],
    ctx: &C,
    templates: &HashMap<String, Template>,
    settings: &RelaySettings,
    (origin, priority): (Origin, Option<Priority>),
    now: DateTime<Utc>,
) -> Planned {
    let sender = Sender {
        from: &settings.from,
        fallback_recipient: &settings.fallback_recipient,
        allow_from_override: settings.allow_from_override,
        policy: &settings.policy,
    };
    let plan = panel_automation::plan_steps(steps, ctx, templates, sender, now, &mut crate::random_u128);
    let planned = plan
        .steps
        .into_iter()
        .map(|p| PlannedStep {
            outcome: serde_json::to_value(&p.outcome).expect("a step outcome serializes"),
            // The definition's priority; unset, the origin's (decided when it is stored).
            message: p.message.map(|m| (origin, OutgoingMessage { priority: priority.or(m.priority), ..m })),
        })
        .collect();
    (plan.status, plan.detail, planned)
}
