//! Panel's domain: the values and rules every other crate shares. Nothing here does I/O,
//! so every rule is unit-tested without a relay or a database.

// Re-exported for `string_enum!`, which other crates expand.
pub use schemars;

pub mod address;
pub mod bounce;
pub mod classify;
pub mod closed;
pub mod credential;
pub mod delivery;
pub mod duration;
pub mod errors;
pub mod header;
pub mod message;
pub mod oauth;
pub mod policy;
pub mod retry;
pub mod run;
pub mod secret;
pub mod security;
pub mod settings;

pub use address::{EmailAddress, Mailbox};
pub use classify::{Classification, ConnectionContext, Failure, FailureClass, FailureKind, SmtpReply, Stage, classify};
pub use credential::CredentialKind;
pub use delivery::{AttemptOutcome, Earlier, RecipientResult, SendReport, Settlement, settle};
pub use errors::{FieldError, FieldErrors};
pub use message::{Draft, MessageState, Origin, OutgoingMessage, Priority, RecipientKind, RecipientState};
pub use oauth::{EndpointUrl, OAuthProvider};
pub use retry::{RelayBackoff, RetryDecision, RetryPolicy, is_relay_unreachable, is_throttling};
pub use secret::Secret;
pub use settings::{
    Auth, AuthMode, GraphSettings, PRIMARY, PasswordSource, RelaySettings, RouteDoc, Security, SendLimits, SettingsDoc,
    StandbyRoute, Transport,
};
