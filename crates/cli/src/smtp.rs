//! `panel smtp set|show|check|test`. The flags of `set` come from the relay settings table,
//! one per setting, so a new setting needs no edit here.

use std::process::ExitCode;

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches, Subcommand};
use panel_domain::SettingsDoc;
use panel_domain::settings::patch::Channel;
use panel_domain::settings::table::{Default, Kind, SETTINGS, flag_name};
use panel_service::{OpsError, Panel};

use crate::messages::after_enqueue;
use crate::{CmdResult, JsonFlag, actor, output};

/// The settings named on the command line, as typed.
pub struct SettingFlags(Vec<(&'static str, String)>);

impl SettingFlags {
    /// The patch these flags make; every bad value is reported at once.
    pub fn patch(&self) -> Result<SettingsDoc, panel_domain::FieldErrors> {
        SettingsDoc::from_texts(self.0.iter().map(|(name, value)| (*name, value.as_str())))
    }
}

impl FromArgMatches for SettingFlags {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let given = SETTINGS.iter().filter_map(|s| m.get_one::<String>(s.name).map(|v| (s.name, v.clone())));
        Ok(SettingFlags(given.collect()))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for SettingFlags {
    fn augment_args(cmd: Command) -> Command {
        SETTINGS.iter().fold(cmd, |cmd, s| {
            let default = match s.default {
                Default::Unset => String::new(),
                Default::Required => " (required in the first save)".into(),
                other => format!(" [default: {}]", other.text()),
            };
            let value_name = match s.kind {
                Kind::Number => "NUMBER",
                Kind::Flag => "true|false",
                Kind::Duration => "DURATION",
                Kind::Path => "FILE",
                _ => "VALUE",
            };
            cmd.arg(
                Arg::new(s.name)
                    .long(flag_name(s))
                    .value_name(value_name)
                    .help_heading("Relay settings")
                    .help(format!("{}{default}", s.doc))
                    // A negative port is a value to refuse with its reason, not an unknown flag.
                    .allow_hyphen_values(matches!(s.kind, Kind::Number)),
            )
        })
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

#[derive(Subcommand)]
pub(crate) enum SmtpCommand {
    /// Store relay settings. Only the fields given change; '' clears a field. The first call needs
    /// --host, --from and --fallback-recipient. With --route NAME, a standby route's own settings
    /// (its relay, credential, TLS and timeouts), tried in order when the routes before it fail.
    Set(Box<SetArgs>),
    /// Remove a standby route; the routes after it move up.
    RemoveRoute {
        /// The route's name (panel smtp show lists them)
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Print the relay settings in force.
    Show(JsonFlag),
    /// Connect to every route's relay now and report every stage; sends nothing. Exit 0 only
    /// when every route would accept a message to the Fallback recipient; says which route mail
    /// goes by now. Runs in a running Panel Service
    /// or worker (its environment, config and licenses are what delivery uses) and says which;
    /// in this process with --local or when none runs.
    Check(CheckArgs),
    /// List the saved versions of the relay settings, newest first: who saved each, when, and
    /// what it changed, field by field.
    History {
        /// Show at most N versions
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Make an earlier version the settings in force again. It is saved as a new version, with
    /// the same checks as `smtp set`; the history keeps every step.
    Restore {
        /// The version to restore (panel smtp history)
        version: i64,
        #[arg(long)]
        json: bool,
    },
    /// Enqueue the Test Message to the Fallback recipient (or --to) and print its id.
    Test {
        /// Send the test to this address instead of the Fallback recipient
        #[arg(long)]
        to: Option<String>,
        /// Wait up to SECS for the outcome; exit 0 only when delivered
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub(crate) struct CheckArgs {
    /// Check from this CLI process, with its environment and config, not a running service's
    #[arg(long)]
    local: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct SetArgs {
    /// Change the standby route NAME (made when new, tried after the others) instead of the
    /// primary; only the per-route settings apply to it
    #[arg(long, value_name = "NAME")]
    route: Option<String>,
    #[command(flatten)]
    settings: SettingFlags,
    #[arg(long)]
    json: bool,
}

pub(crate) async fn smtp(panel: Panel, cmd: SmtpCommand) -> CmdResult {
    match cmd {
        SmtpCommand::Set(args) => {
            let json = args.json;
            let patch = args.settings.patch().map_err(OpsError::Invalid)?;
            let update = match &args.route {
                None => panel.update_settings(&patch, &actor(), Channel::Local).await?,
                Some(name) => panel.update_route(name, &patch, &actor(), Channel::Local).await?,
            };
            output::settings_saved(&update, json);
            Ok(ExitCode::SUCCESS)
        }
        SmtpCommand::RemoveRoute { name, json } => {
            let update = panel.remove_route(&name, &actor()).await?;
            output::settings_saved(&update, json);
            Ok(ExitCode::SUCCESS)
        }
        SmtpCommand::Show(f) => {
            let stored = panel.stored_settings().await?.ok_or(OpsError::NotConfigured)?;
            let effective = panel.settings().await?.map(|(_, s)| s);
            output::settings(&stored, effective.as_ref(), f.json);
            Ok(ExitCode::SUCCESS)
        }
        SmtpCommand::Check(f) => {
            let report = match f.local {
                true => panel.check_here("this CLI process (--local)").await?,
                false => panel.check_where_delivery_runs(&actor()).await?,
            };
            output::check(&report, f.json);
            if !f.json
                && let Some(notice) = panel.policy_notice().await
            {
                println!("Note: {notice}");
            }
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        SmtpCommand::History { limit, json } => {
            output::settings_history(&panel.settings_history(limit).await?, json);
            Ok(ExitCode::SUCCESS)
        }
        SmtpCommand::Restore { version, json } => {
            let update = panel.restore_settings(version, &actor(), Channel::Local).await?;
            output::settings_saved(&update, json);
            Ok(ExitCode::SUCCESS)
        }
        SmtpCommand::Test { to, wait, json } => {
            let id = panel.enqueue_test(to.as_deref()).await?;
            after_enqueue(&panel, id, "Test message", wait, json).await
        }
    }
}
