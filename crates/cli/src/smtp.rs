//! `panel smtp set`: its flags come from the relay settings table, one per setting, so a new
//! setting needs no edit here.

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};
use panel_domain::SettingsDoc;
use panel_domain::settings::table::{Default, Kind, SETTINGS, flag_name};

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
