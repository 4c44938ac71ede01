//! `panel template`, `workflow`, `schedule`, `event`, `dispatch` and `run`: what makes
//! messages from identity events and time rules, and the history of what ran.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use panel_automation::{DispatchDef, ScheduleDef, Template, WorkflowDef};
use panel_domain::run::RunStatus;
use panel_service::Panel;
use panel_service::views::{Definition, DefinitionKind, Run, SaveMode, SaveOutcome};
use serde_json::Value;

use crate::output::{print_json, time};
use crate::{CmdResult, Failed, actor, bad_input};

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Create or replace a template (Jinja syntax; the HTML body is auto-escaped).
    Set {
        name: String,
        /// The subject line (a template too, e.g. "Welcome {{ object.givenName }}")
        #[arg(long)]
        subject: String,
        /// The text body's template file
        #[arg(long, value_name = "FILE")]
        text_file: PathBuf,
        /// The HTML body's template file [default: text only]
        #[arg(long, value_name = "FILE")]
        html_file: Option<PathBuf>,
    },
    /// List templates.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a template's subject and bodies.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a template (refused while a workflow or schedule uses it).
    Delete { name: String },
    /// Preview: render a template against sample data, without sending anything.
    Render {
        name: String,
        /// JSON file with the context, e.g. {"object": {"givenName": "Ann"}}
        #[arg(long, value_name = "FILE")]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// What workflows and schedules share.
#[derive(Subcommand)]
pub enum DefinitionCommand {
    /// Create from a JSON file (refused if the name exists).
    Create {
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Replace an existing one from a JSON file.
    Update {
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print the definition as JSON.
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
    Enable {
        name: String,
    },
    Disable {
        name: String,
    },
    /// Runs: when, why (trigger), each step's outcome and the messages sent.
    History {
        name: String,
        /// How many runs, newest first
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Write every definition of this kind as a JSON array.
    Export {
        /// Output file [default: standard output]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Create or replace definitions from a JSON file (one object or an array), all validated first.
    Import {
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum ScheduleCommand {
    #[command(flatten)]
    Common(DefinitionCommand),
    /// Run a schedule now (manual invoke), whatever its time rule.
    Run {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// The next fire times.
    Next {
        name: String,
        #[arg(long, default_value_t = 5)]
        count: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum EventCommand {
    /// Post an event: every enabled workflow it triggers (and whose condition holds) runs.
    Post {
        /// The event type, e.g. user.created
        #[arg(value_name = "TYPE")]
        event_type: String,
        /// JSON file with the event's object
        #[arg(long, value_name = "FILE")]
        data: PathBuf,
        /// Posting again with the same key runs nothing again
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct DispatchArgs {
    /// JSON file: {"name": ..., "data": {...}, "steps": [...]}
    #[arg(long, value_name = "FILE")]
    file: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum RunCommand {
    /// A run's steps and their messages.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Failed> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: {e}", path.display())))
}

fn read_text(path: &Path) -> Result<String, Failed> {
    std::fs::read_to_string(path).map_err(|e| bad_input(format!("cannot read {}: {e}", path.display())))
}

fn saved_line(kind: &str, name: &str, outcome: SaveOutcome) {
    let verb = if outcome == SaveOutcome::Created { "created" } else { "updated" };
    println!("{kind} '{name}' {verb}.");
}

pub async fn template(panel: Panel, cmd: TemplateCommand) -> CmdResult {
    match cmd {
        TemplateCommand::Set { name, subject, text_file, html_file } => {
            let template = Template {
                subject,
                text: read_text(&text_file)?,
                html: html_file.as_deref().map(read_text).transpose()?,
            };
            let outcome = panel.save_template(&name, &template, SaveMode::Upsert, &actor()).await?;
            saved_line("Template", &name, outcome);
        }
        TemplateCommand::List { json } => {
            let rows = panel.definitions(DefinitionKind::Template).await?;
            if json {
                print_json(&rows);
            } else if rows.is_empty() {
                println!("No templates. Create one: panel template set NAME --subject TEXT --text-file FILE");
            } else {
                for r in rows {
                    let subject = r.doc.get("subject").and_then(Value::as_str).unwrap_or_default();
                    let html = if r.doc.get("html").is_some_and(|h| !h.is_null()) { "text+html" } else { "text" };
                    println!("{:<24} {:<9} updated {}  subject: {subject}", r.name, html, time(&r.updated_at));
                }
            }
        }
        TemplateCommand::Show { name, json } => {
            let t = panel.template(&name).await?;
            if json {
                print_json(&t);
            } else {
                println!("Subject: {}\n\n--- text ---\n{}", t.subject, t.text);
                if let Some(h) = &t.html {
                    println!("--- html ---\n{h}");
                }
            }
        }
        TemplateCommand::Delete { name } => {
            panel.delete_definition(DefinitionKind::Template, &name, &actor()).await?;
            println!("Template '{name}' deleted.");
        }
        TemplateCommand::Render { name, data, json } => {
            let data: Value = read_json(&data)?;
            let r = panel.render_template(&name, &data).await?;
            if json {
                print_json(&r);
            } else {
                println!("Subject: {}\n\n--- text ---\n{}", r.subject, r.text);
                if let Some(h) = &r.html {
                    println!("--- html ---\n{h}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The two kinds a `DefinitionCommand` works on.
#[derive(Clone, Copy)]
enum Kind {
    Workflow,
    Schedule,
}

impl Kind {
    fn definition_kind(self) -> DefinitionKind {
        match self {
            Kind::Workflow => DefinitionKind::Workflow,
            Kind::Schedule => DefinitionKind::Schedule,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Kind::Workflow => "Workflow",
            Kind::Schedule => "Schedule",
        }
    }

    async fn save(
        self,
        panel: &Panel,
        doc: Value,
        mode: SaveMode,
        origin: &str,
    ) -> Result<(String, SaveOutcome), Failed> {
        let parse_error = |e: serde_json::Error| bad_input(format!("{origin}: {e}"));
        match self {
            Kind::Workflow => {
                let def: WorkflowDef = serde_json::from_value(doc).map_err(parse_error)?;
                Ok((def.name.clone(), panel.save_workflow(&def, mode, &actor()).await?))
            }
            Kind::Schedule => {
                let def: ScheduleDef = serde_json::from_value(doc).map_err(parse_error)?;
                Ok((def.name.clone(), panel.save_schedule(&def, mode, &actor()).await?))
            }
        }
    }
}

pub async fn workflow(panel: Panel, cmd: DefinitionCommand) -> CmdResult {
    definitions(panel, Kind::Workflow, cmd).await
}

pub async fn schedule(panel: Panel, cmd: ScheduleCommand) -> CmdResult {
    match cmd {
        ScheduleCommand::Common(c) => definitions(panel, Kind::Schedule, c).await,
        ScheduleCommand::Run { name, json } => {
            let run = panel.run_schedule(&name, &actor()).await?;
            print_runs(std::slice::from_ref(&run), json);
            Ok(if run.status == RunStatus::Failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        ScheduleCommand::Next { name, count, json } => {
            let next = panel.schedule_next(&name, count).await?;
            if json {
                print_json(&next);
            } else if next.next.is_empty() {
                println!("Schedule '{name}' has no time rule ({}); run it with panel schedule run {name}", next.rule);
            } else {
                println!("Schedule '{name}': {}", next.rule);
                next.next.iter().for_each(|t| println!("  {t}"));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn definitions(panel: Panel, kind: Kind, cmd: DefinitionCommand) -> CmdResult {
    let title = kind.title();
    match cmd {
        DefinitionCommand::Create { file } => {
            let (name, outcome) =
                kind.save(&panel, read_json(&file)?, SaveMode::Create, &file.display().to_string()).await?;
            saved_line(title, &name, outcome);
        }
        DefinitionCommand::Update { file } => {
            let (name, outcome) =
                kind.save(&panel, read_json(&file)?, SaveMode::Update, &file.display().to_string()).await?;
            saved_line(title, &name, outcome);
        }
        DefinitionCommand::List { json } => {
            let rows = panel.definitions(kind.definition_kind()).await?;
            if json {
                print_json(&rows);
            } else if rows.is_empty() {
                println!(
                    "No {}s yet. Create one: panel {} create --file FILE.json",
                    title.to_lowercase(),
                    title.to_lowercase()
                );
            } else {
                rows.iter().for_each(|r| println!("{}", list_line(kind, r)));
            }
        }
        DefinitionCommand::Show { name } => print_json(&panel.definition(kind.definition_kind(), &name).await?.doc),
        DefinitionCommand::Delete { name } => {
            panel.delete_definition(kind.definition_kind(), &name, &actor()).await?;
            println!("{title} '{name}' deleted.");
        }
        DefinitionCommand::Enable { name } => {
            panel.set_enabled(kind.definition_kind(), &name, true, &actor()).await?;
            println!("{title} '{name}' enabled.");
        }
        DefinitionCommand::Disable { name } => {
            panel.set_enabled(kind.definition_kind(), &name, false, &actor()).await?;
            println!("{title} '{name}' disabled.");
        }
        DefinitionCommand::History { name, limit, json } => {
            panel.definition(kind.definition_kind(), &name).await?;
            let runs = panel.history(kind.definition_kind().as_str(), &name, limit.min(1000)).await?;
            if runs.is_empty() && !json {
                println!("{title} '{name}' has not run yet.");
            } else {
                print_runs(&runs, json);
            }
        }
        DefinitionCommand::Export { out } => {
            let docs: Vec<Value> =
                panel.definitions(kind.definition_kind()).await?.into_iter().map(|r| r.doc).collect();
            let text = serde_json::to_string_pretty(&docs).expect("JSON serializes");
            match out {
                Some(path) => {
                    std::fs::write(&path, text + "\n")
                        .map_err(|e| Failed(1, format!("cannot write {}: {e}", path.display())))?;
                    println!("Exported {} {}(s) to {}.", docs.len(), title.to_lowercase(), path.display());
                }
                None => println!("{text}"),
            }
        }
        DefinitionCommand::Import { file } => {
            let docs = match read_json::<Value>(&file)? {
                Value::Array(list) => list,
                one => vec![one],
            };
            for (i, doc) in docs.into_iter().enumerate() {
                let origin = format!("{} [{i}]", file.display());
                let (name, outcome) = kind.save(&panel, doc, SaveMode::Upsert, &origin).await?;
                saved_line(title, &name, outcome);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list_line(kind: Kind, r: &Definition) -> String {
    let state = if r.enabled { "enabled" } else { "disabled" };
    let what = match kind {
        Kind::Workflow => {
            let trigger = r.doc.get("trigger").and_then(Value::as_str).unwrap_or_default();
            match r.doc.get("condition").and_then(Value::as_str) {
                Some(c) => format!("on {trigger} if {c}"),
                None => format!("on {trigger}"),
            }
        }
        Kind::Schedule => match &r.next_fire_at {
            Some(t) => format!("next {}", time(t)),
            None => "no next fire time (manual only or disabled)".into(),
        },
    };
    format!("{:<24} {:<8} {what}", r.name, state)
}

pub async fn event(panel: Panel, cmd: EventCommand) -> CmdResult {
    let EventCommand::Post { event_type, data, idempotency_key, json } = cmd;
    let object: Value = read_json(&data)?;
    let record = panel.post_event(&event_type, &object, idempotency_key.as_deref(), &actor()).await?;
    let runs = record.runs;
    if json {
        print_json(&serde_json::json!({ "event_id": record.id, "created": record.created, "runs": runs }));
    } else if !record.created {
        println!("Event {} was posted before with this idempotency key; nothing ran again.", record.id);
    } else if runs.is_empty() {
        println!("Event {} stored; no enabled workflow on '{event_type}' matched.", record.id);
    } else {
        println!("Event {} stored; {} workflow run(s):", record.id, runs.len());
        print_runs(&runs, false);
    }
    // A run none of whose steps queued a message failed: the caller's script should know.
    Ok(if runs.iter().any(|r| r.status == RunStatus::Failed) { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

pub async fn dispatch(panel: Panel, args: DispatchArgs) -> CmdResult {
    let def: DispatchDef = read_json(&args.file)?;
    let run = panel.dispatch(&def, &actor()).await?;
    print_runs(std::slice::from_ref(&run), args.json);
    Ok(if run.status == RunStatus::Failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

pub async fn run(panel: Panel, cmd: RunCommand) -> CmdResult {
    let RunCommand::Show { id, json } = cmd;
    print_runs(&[panel.run(id).await?], json);
    Ok(ExitCode::SUCCESS)
}

/// Runs as text: one header line each, then a line per step with its message's current state.
fn print_runs(runs: &[Run], json: bool) {
    if json {
        print_json(&runs);
        return;
    }
    for r in runs {
        let fire = r.fire_time.map(|t| format!(" fire time {}", time(&t))).unwrap_or_default();
        println!(
            "run {} {} '{}' {} at {}{fire}: steps {}, mail {}",
            r.id,
            r.kind,
            r.name,
            r.trigger,
            time(&r.started_at),
            r.status,
            r.delivery
        );
        if let Some(d) = &r.detail {
            println!("  note: {d}");
        }
        for step in r.steps.as_array().into_iter().flatten() {
            let index = step.get("step").and_then(Value::as_i64).unwrap_or_default();
            match step.get("message_id").and_then(Value::as_i64) {
                Some(id) => {
                    let m = r.messages.iter().find(|m| m.id == id);
                    let state = m.map(|m| m.state.as_str()).unwrap_or("?");
                    let to = step.get("recipients").map(|v| v.to_string()).unwrap_or_default();
                    println!("  step {index}: message {id} {state} to {to}");
                    if let Some(e) = m.and_then(|m| m.last_error.as_deref()) {
                        println!("    last error: {e}");
                    }
                    if let Some(n) = step.get("note").and_then(Value::as_str) {
                        println!("    {n}");
                    }
                }
                None => {
                    let error = step.get("error").and_then(Value::as_str).unwrap_or("no message");
                    println!("  step {index}: failed: {error}");
                }
            }
        }
    }
}
