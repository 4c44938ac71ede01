//! `panel send` and `panel messages`: the mail tester and the message log.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use panel_domain::message::Draft;
use panel_domain::{MessageState, Origin, Priority};
use panel_service::views::RetryResult;
use panel_service::{OpsError, Panel};

use std::process::ExitCode;

use crate::{CmdResult, bad_input, output};

fn parse_priority(v: &str) -> Result<Priority, String> {
    Priority::parse(v).ok_or_else(|| format!("'{v}' is not a priority; use urgent or bulk"))
}

#[derive(Args)]
pub(crate) struct SendArgs {
    /// Recipient (repeat for more); with no recipient at all the Fallback recipient is used
    #[arg(long)]
    to: Vec<String>,
    #[arg(long)]
    cc: Vec<String>,
    #[arg(long)]
    bcc: Vec<String>,
    #[arg(long)]
    reply_to: Option<String>,
    #[arg(long)]
    subject: String,
    /// Plain-text body
    #[arg(long, conflicts_with = "text_file", required_unless_present = "text_file")]
    text: Option<String>,
    /// File with the plain-text body
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// File with an HTML alternative body
    #[arg(long)]
    html_file: Option<PathBuf>,
    /// Create the message once per KEY: sending again with the same key returns the same message
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// urgent (the default for a send: ahead of bulk mail) or bulk
    #[arg(long, value_parser = parse_priority)]
    priority: Option<Priority>,
    /// Wait up to SECS for the outcome; exit 0 only when delivered
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub(crate) enum MessagesCommand {
    /// List messages, newest first.
    List {
        /// queued, sending, retrying, delivered, partly_failed, failed, cancelled or captured
        #[arg(long)]
        status: Option<String>,
        /// test_message, mail_tester, schedule, workflow or dispatch
        #[arg(long)]
        origin: Option<String>,
        /// Only messages to an address containing this ("where is alice's reset mail?")
        #[arg(long)]
        recipient: Option<String>,
        /// Only messages changed since then: 2h, 1d, or an RFC 3339 time
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Write one message as an .eml file to standard output (what goes after DATA; for a
    /// captured message, what would have): panel messages eml 17 > message.eml
    Eml { id: i64 },
    /// Show one message with its recipients and every attempt.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Send a message now: a failed one again (to its refused recipients), a retrying one
    /// without waiting for its retry time; or all of them with --status failed|retrying.
    Retry {
        /// The message to send now
        #[arg(required_unless_present = "status", conflicts_with_all = ["status", "since"])]
        id: Option<i64>,
        /// All at once: `failed` (failed and partly failed, the dead letters) or `retrying`
        #[arg(long)]
        status: Option<String>,
        /// With --status failed: only messages that failed within this long (e.g. 2h) or since this RFC 3339 time
        #[arg(long, requires = "status")]
        since: Option<String>,
    },
    /// Cancel a message that should not be sent: final, never retried; the log keeps who and why.
    Cancel {
        id: i64,
        /// Why (shown in the message log and the audit log)
        #[arg(long)]
        reason: String,
    },
}

pub(crate) async fn send(panel: Panel, a: SendArgs) -> CmdResult {
    let read = |p: &PathBuf, field: &str| {
        std::fs::read_to_string(p).map_err(|e| bad_input(format!("{field}: cannot read {}: {e}", p.display())))
    };
    let text = match (&a.text, &a.text_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => read(f, "text_file")?,
        (None, None) => return Err(bad_input("give the body with --text or --text-file")),
    };
    let html = a.html_file.as_ref().map(|f| read(f, "html_file")).transpose()?;
    let draft = Draft {
        to: a.to,
        cc: a.cc,
        bcc: a.bcc,
        reply_to: a.reply_to,
        subject: a.subject,
        text,
        html,
        priority: a.priority,
        ..Default::default()
    };
    let (id, created) = panel.enqueue_draft(Origin::MailTester, &draft, a.idempotency_key.as_deref()).await?;
    if !created && !a.json {
        // The same message again: say so once, not also "queued".
        println!("Message {id} already exists for this idempotency key, with this content; nothing new was queued.");
        if a.wait.is_none() {
            return Ok(ExitCode::SUCCESS);
        }
    }
    after_enqueue(&panel, id, "Message", a.wait, a.json).await
}

/// Prints the id, warns when nothing will process the queue, and optionally waits for the outcome.
pub(crate) async fn after_enqueue(panel: &Panel, id: i64, what: &str, wait: Option<u64>, json: bool) -> CmdResult {
    let running = panel.service_running().await?;
    let Some(secs) = wait else {
        output::enqueued(id, what, running, json);
        return Ok(ExitCode::SUCCESS);
    };
    if !json {
        println!("{what} {id} queued.");
        if !running {
            output::no_service_notice();
        }
    }
    let detail = output::with_progress(panel, what, id, secs, panel.wait_for(id, Duration::from_secs(secs))).await?;
    output::outcome(&detail, running, json);
    Ok(if detail.state == MessageState::Delivered { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub(crate) async fn messages(panel: Panel, cmd: MessagesCommand) -> CmdResult {
    match cmd {
        MessagesCommand::List { status, origin, recipient, since, limit, json } => {
            let filter = panel_service::ops::message_filter(
                status.as_deref(),
                origin.as_deref(),
                recipient.as_deref(),
                since.as_deref(),
                limit,
            )
            .map_err(|e| bad_input(e.to_string()))?;
            let list = panel.messages(&filter).await?;
            output::message_list(&list, json);
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Eml { id } => {
            use std::io::Write;
            let eml = panel.message_eml(id).await?;
            std::io::stdout().write_all(&eml).map_err(|e| crate::Failed(1, format!("writing the message: {e}")))?;
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Show { id, json } => {
            let detail = panel.message(id).await?;
            output::message(&detail, json);
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Retry { id: None, status, since } if status.as_deref() == Some("retrying") => {
            if since.is_some() {
                return Err(bad_input("--since applies to --status failed only"));
            }
            let n = panel.send_retrying_now().await?;
            println!("{n} retrying message(s) are sent now.");
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Retry { id: None, status, since } => {
            if status.as_deref() != Some("failed") {
                return Err(bad_input("--status: use failed (failed and partly failed messages) or retrying"));
            }
            let since = since
                .as_deref()
                .map(panel_service::ops::parse_since)
                .transpose()
                .map_err(|e| bad_input(e.to_string()))?;
            let n = panel.retry_failed(since).await?;
            println!("{n} failed message(s) queued again.");
            Ok(ExitCode::SUCCESS)
        }
        MessagesCommand::Retry { id: Some(id), .. } => match panel.retry(id).await? {
            RetryResult::Requeued => {
                println!("Message {id} is queued again, to be sent now.");
                Ok(ExitCode::SUCCESS)
            }
            RetryResult::NotFound => Err(OpsError::NotFound(id).into()),
            RetryResult::NotFailed { state } => Err(OpsError::Conflict(format!(
                "message {id} is {state}; only failed, partly failed or retrying messages can be sent again"
            ))
            .into()),
            RetryResult::ContentRemoved { at } => Err(OpsError::Conflict(format!(
                "message {id}'s content was removed by retention on {}; there is nothing to send again",
                crate::output::time(&at)
            ))
            .into()),
        },
        MessagesCommand::Cancel { id, reason } => {
            let was = panel.cancel(id, &crate::actor(), &reason).await?;
            println!("Message {id} is cancelled (it was {was}); nothing sends it again.");
            Ok(ExitCode::SUCCESS)
        }
    }
}
