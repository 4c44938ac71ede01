//! `panel admin`: local accounts for the web UI and API, and API tokens for scripts.

use std::process::ExitCode;

use clap::Subcommand;
use panel_domain::Secret;
use panel_service::Panel;
use panel_service::accounts::Role;

use crate::output::{print_json, time};
use crate::{CmdResult, Failed, actor, bad_input};

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create an account. Without --password-stdin a strong password is generated and printed once.
    Create {
        name: String,
        /// admin (everything), operator (send tests, retry messages, run schedules, post events) or viewer (read only)
        #[arg(long, default_value = "admin")]
        role: String,
        /// Read the password from standard input (at least 12 characters)
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a new password (and optionally a new role); ends the account's browser sessions.
    SetPassword {
        name: String,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        password_stdin: bool,
    },
    /// List accounts, their roles and their sign-in lock state.
    List {
        #[arg(long)]
        json: bool,
    },
    Delete {
        name: String,
    },
    /// Forget the account's counted wrong passwords (from every address), ending its lock.
    Unlock {
        name: String,
    },
    /// API tokens for scripts (sent as `Authorization: Bearer TOKEN`): `token NAME` creates one
    /// for account NAME and prints it once; `token list`, `token revoke ID`.
    #[command(args_conflicts_with_subcommands = true)]
    Token {
        #[command(subcommand)]
        action: Option<TokenAction>,
        /// The account to create a token for (the same as `token create NAME`)
        name: Option<String>,
        /// What the token is for, e.g. "hr-sync"
        #[arg(long, default_value = "api")]
        label: String,
    },
}

#[derive(Subcommand)]
pub enum TokenAction {
    /// Create a token for account NAME, printed once.
    Create {
        name: String,
        /// What the token is for, e.g. "hr-sync"
        #[arg(long, default_value = "api")]
        label: String,
    },
    /// List API tokens (id, account, label, last use; never the token), of NAME or of everyone.
    List {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by the id `token list` shows; it stops working at once on every service.
    Revoke { id: String },
}

fn role(value: &str) -> Result<Role, Failed> {
    Role::parse(value)
        .ok_or_else(|| bad_input(format!("--role '{value}' is not a role; use admin, operator or viewer")))
}

/// The password from standard input, or a generated one (printed by the caller).
fn password(from_stdin: bool) -> Result<(Secret, bool), Failed> {
    if from_stdin {
        let text = crate::trust::read_stdin()?;
        return Ok((Secret::new(text.trim_end_matches(['\r', '\n']).to_string()), false));
    }
    let generated = format!("{:032x}", panel_service::random_u128());
    Ok((Secret::new(generated), true))
}

pub async fn admin(panel: Panel, cmd: AdminCommand) -> CmdResult {
    match cmd {
        AdminCommand::Create { name, role: r, password_stdin } => {
            let r = role(&r)?;
            let (pw, generated) = password(password_stdin)?;
            panel.put_admin(&name, r, &pw, false, &actor()).await?;
            println!("Admin '{name}' created with role {}.", r.as_str());
            if generated {
                println!("Password (shown once; change it with panel admin set-password {name}): {}", pw.expose());
            }
        }
        AdminCommand::SetPassword { name, role: r, password_stdin } => {
            let current = panel.admins().await?.into_iter().find(|a| a.name == name);
            let Some(current) = current else {
                return Err(Failed(2, format!("admin '{name}' not found; create it with panel admin create {name}")));
            };
            let r = match r {
                Some(r) => role(&r)?,
                None => Role::parse(&current.role).unwrap_or(Role::Viewer),
            };
            let (pw, generated) = password(password_stdin)?;
            panel.put_admin(&name, r, &pw, true, &actor()).await?;
            println!("Password of '{name}' changed (role {}); its browser sessions ended.", r.as_str());
            if generated {
                println!("New password (shown once): {}", pw.expose());
            }
        }
        AdminCommand::List { json } => {
            let admins = panel.admins().await?;
            if json {
                print_json(&admins);
            } else if admins.is_empty() {
                println!("No admin accounts. Create one: panel admin create NAME --role admin");
            } else {
                for a in admins {
                    let lock = match (&a.locked_until, a.failed_sign_ins) {
                        (Some(until), n) => format!(
                            "  LOCKED until {} for addresses it never signed in from ({n} wrong passwords; panel admin unlock {})",
                            time(until),
                            a.name
                        ),
                        (None, 0) => String::new(),
                        (None, n) => format!("  {n} wrong password(s) in the last 15 minutes"),
                    };
                    println!("{:<24} {:<9} created {}{lock}", a.name, a.role, time(&a.created_at));
                }
            }
        }
        AdminCommand::Unlock { name } => {
            let n = panel.unlock_admin(&name, &actor()).await?;
            println!("Admin '{name}' unlocked; {n} counted failed sign-in(s) forgotten.");
        }
        AdminCommand::Delete { name } => {
            panel.delete_admin(&name, &actor()).await?;
            println!("Admin '{name}' deleted; its sessions and tokens no longer work.");
        }
        AdminCommand::Token { action, name, label } => match (action, name) {
            (Some(TokenAction::Create { name, label }), _) => create_token(&panel, &name, &label).await?,
            (None, Some(name)) => create_token(&panel, &name, &label).await?,
            (Some(TokenAction::List { name, json }), _) => {
                let tokens = panel.api_tokens(name.as_deref()).await?;
                if json {
                    print_json(&tokens);
                } else if tokens.is_empty() {
                    println!("No API tokens. Create one: panel admin token NAME --label WHAT");
                } else {
                    for t in tokens {
                        let used = t.last_used_at.as_ref().map(time).unwrap_or_else(|| "never used".into());
                        println!("{}  {:<20} {:<20} created {}, {used}", t.id, t.admin, t.label, time(&t.created_at));
                    }
                }
            }
            (Some(TokenAction::Revoke { id }), _) => {
                let t = panel.revoke_api_token(&id, &actor()).await?;
                println!("API token {} of '{}' ({}) revoked.", t.id, t.admin, t.label);
            }
            (None, None) => {
                return Err(bad_input("give an account (panel admin token NAME) or a command: create, list, revoke"));
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

async fn create_token(panel: &Panel, name: &str, label: &str) -> Result<(), Failed> {
    let token = panel.create_api_token(name, label).await?;
    println!("{token}");
    eprintln!("API token for '{name}' ({label}); shown once. Send it as: Authorization: Bearer TOKEN");
    Ok(())
}
