//! One error type for every operation the CLI, the API and the UI call, and one mapping of its
//! kind to exit codes and HTTP statuses.

use panel_domain::FieldErrors;
use panel_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Bad input: exit code 2, HTTP 400.
    #[error("{0}")]
    Invalid(FieldErrors),
    #[error(
        "no relay settings yet; configure them first: panel smtp set --host HOST --from ADDRESS --fallback-recipient ADDRESS"
    )]
    NotConfigured,
    #[error("the stored relay settings are invalid (version {version}): {errors}; fix them with panel smtp set")]
    StoredSettingsInvalid { version: i64, errors: FieldErrors },
    #[error("message {0} not found")]
    NotFound(i64),
    #[error("{what} '{name}' not found")]
    NotFoundNamed { what: &'static str, name: String },
    /// The request's token was revoked (or its session ended) while it was on its way: HTTP 401.
    #[error(
        "the token was revoked or the session ended while the request was on its way; sign in again or use a valid API token"
    )]
    SignedOut,
    /// The actor's role does not allow this use of an operation: exit code 1, HTTP 403.
    #[error("{0}")]
    Forbidden(String),
    /// A license is missing, invalid or refused: exit code 1, HTTP 403.
    #[error("{0}")]
    License(String),
    /// The master key file or the encrypted credentials are unusable (Panel's own words).
    #[error("{0}")]
    Vault(String),
    /// A license key that does not verify: its cause kept as it is.
    #[error(transparent)]
    LicenseKey(#[from] panel_vault::LicenseError),
    /// The master key file cannot be read or written: its cause kept as it is.
    #[error(transparent)]
    KeyFile(#[from] panel_vault::KeyFileError),
    /// A stored credential does not open: its cause kept as it is.
    #[error(transparent)]
    Sealed(#[from] panel_vault::VaultError),
    /// A template that does not render (preview): exit code 2, HTTP 400.
    #[error("the template does not render: {0}")]
    Template(panel_automation::TemplateError),
    /// A message or request larger than Panel takes: exit code 2, HTTP 413.
    #[error("{0}")]
    TooLarge(String),
    /// The request conflicts with what is stored (a name taken, a template in use): HTTP 409.
    #[error("{0}")]
    Conflict(String),
    /// Panel failed inside (a task died, a page template broke): HTTP 500, named as such.
    #[error("{what} failed inside Panel: {cause}")]
    Internal { what: &'static str, cause: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OpsError {
    /// The kind, from which the exit code, the HTTP status and the page follow.
    pub fn kind(&self) -> ErrorKind {
        match self {
            OpsError::Invalid(_) | OpsError::Template(_) => ErrorKind::Invalid,
            OpsError::TooLarge(_) => ErrorKind::TooLarge,
            OpsError::NotFound(_) | OpsError::NotFoundNamed { .. } => ErrorKind::NotFound,
            OpsError::License(_) | OpsError::LicenseKey(_) | OpsError::Forbidden(_) => ErrorKind::Forbidden,
            OpsError::NotConfigured | OpsError::Conflict(_) => ErrorKind::Conflict,
            OpsError::Store(StoreError::SettingsConflict { .. } | StoreError::MasterKeyChanged { .. }) => {
                ErrorKind::Conflict
            }
            OpsError::Store(StoreError::Conflict(_) | StoreError::Stale) => ErrorKind::Conflict,
            OpsError::SignedOut => ErrorKind::Unauthenticated,
            OpsError::Store(e) if e.is_unavailable() => ErrorKind::Unavailable,
            OpsError::StoredSettingsInvalid { .. }
            | OpsError::Vault(_)
            | OpsError::KeyFile(_)
            | OpsError::Sealed(_)
            | OpsError::Internal { .. } => ErrorKind::Internal,
            OpsError::Store(_) => ErrorKind::Internal,
        }
    }

    /// A failure from inside Panel (a task that died), with its cause.
    pub fn internal(what: &'static str, cause: impl std::fmt::Display) -> OpsError {
        OpsError::Internal { what, cause: cause.to_string() }
    }
}

/// What kind of failure an operation had. Mapped here, once, to the CLI's exit code and the
/// HTTP status that the API and the UI pages answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input: every field's problem is named.
    Invalid,
    /// Larger than the one size limit (`MAX_BODY_BYTES` of content per message).
    TooLarge,
    NotFound,
    /// Not signed in, or no longer: the token or session is gone.
    Unauthenticated,
    /// A license or role does not allow it.
    Forbidden,
    /// The request conflicts with what is stored (a name taken, nothing configured yet).
    Conflict,
    /// The database cannot be reached now; trying again later may work.
    Unavailable,
    Internal,
}

impl ErrorKind {
    /// 2 for what the user typed, 1 for an operation that failed.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Invalid | ErrorKind::TooLarge | ErrorKind::NotFound => 2,
            ErrorKind::Unauthenticated
            | ErrorKind::Forbidden
            | ErrorKind::Conflict
            | ErrorKind::Unavailable
            | ErrorKind::Internal => 1,
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::Invalid => 400,
            ErrorKind::TooLarge => 413,
            ErrorKind::NotFound => 404,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::Conflict => 409,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_one_exit_code_and_one_status() {
        let cases = [
            (OpsError::Invalid(FieldErrors::default()), 2, 400),
            (OpsError::NotFound(7), 2, 404),
            (OpsError::TooLarge("11 MiB".into()), 2, 413),
            (OpsError::License("no license".into()), 1, 403),
            (OpsError::NotConfigured, 1, 409),
            (OpsError::Conflict("taken".into()), 1, 409),
            (OpsError::SignedOut, 1, 401),
            (OpsError::Store(StoreError::Stale), 1, 409),
            (OpsError::Store(StoreError::Corrupt("messages.state".into())), 1, 500),
            (OpsError::internal("rendering the page", "syntax error"), 1, 500),
        ];
        for (e, code, status) in cases {
            assert_eq!((e.kind().exit_code(), e.kind().http_status()), (code, status), "{e}");
        }
        assert_eq!(
            OpsError::internal("rendering the page", "syntax error").to_string(),
            "rendering the page failed inside Panel: syntax error"
        );
    }
}
