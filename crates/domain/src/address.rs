//! Parse-don't-validate email addresses: once a value is an `EmailAddress` or `Mailbox`, it is
//! safe to put on the wire (no CR/LF/NUL, a syntactically valid addr-spec).

use std::fmt;
use std::str::FromStr;

use crate::errors::{FieldError, check_header_safe};

/// A bare addr-spec (`local@domain`), as used in the SMTP envelope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EmailAddress(lettre::Address);

impl EmailAddress {
    /// Parses `value` for the input field `field`, naming the field in the error.
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        check_header_safe(field, value)?;
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(FieldError::new(field, "is empty; give an address like someone@example.org"));
        }
        if trimmed.contains('<') || trimmed.contains('>') {
            return Err(FieldError::new(
                field,
                format!("'{trimmed}' is not a bare address; give only someone@example.org here"),
            ));
        }
        lettre::Address::from_str(trimmed).map(Self).map_err(|e| {
            FieldError::new(
                field,
                format!("'{trimmed}' is not a valid email address ({e}); give an address like someone@example.org"),
            )
        })
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }

    pub fn domain(&self) -> &str {
        self.0.domain()
    }

    pub(crate) fn as_lettre(&self) -> &lettre::Address {
        &self.0
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address with an optional display name: `Identity Panel <panel@example.org>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub name: Option<String>,
    pub address: EmailAddress,
}

impl Mailbox {
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        check_header_safe(field, value)?;
        let trimmed = value.trim();
        match (trimmed.rfind('<'), trimmed.ends_with('>')) {
            (Some(open), true) => {
                let name = crate::header::unquote(trimmed[..open].trim());
                let name = name.trim();
                let address = EmailAddress::parse(field, &trimmed[open + 1..trimmed.len() - 1])?;
                if name.contains(['<', '>']) {
                    return Err(FieldError::new(field, format!("'{trimmed}' has a malformed display name")));
                }
                let name = (!name.is_empty()).then(|| name.to_string());
                Ok(Self { name, address })
            }
            (None, false) => Ok(Self { name: None, address: EmailAddress::parse(field, trimmed)? }),
            _ => Err(FieldError::new(
                field,
                format!(
                    "'{trimmed}' is not a valid mailbox; write 'Name <someone@example.org>' or 'someone@example.org'"
                ),
            )),
        }
    }
}

impl From<EmailAddress> for Mailbox {
    fn from(address: EmailAddress) -> Self {
        Self { name: None, address }
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            // A name that would read back otherwise (one that is itself in quotes) is written
            // as a quoted-string, so that the text parses to the same mailbox.
            Some(name) if crate::header::unquote(name) != *name => {
                write!(f, "\"{}\" <{}>", name.replace('\\', "\\\\").replace('"', "\\\""), self.address)
            }
            Some(name) => write!(f, "{name} <{}>", self.address),
            None => write!(f, "{}", self.address),
        }
    }
}

macro_rules! string_serde {
    ($t:ty, $field:literal, $description:literal) => {
        impl schemars::JsonSchema for $t {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($t).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({"type": "string", "description": $description})
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <$t>::parse($field, &s).map_err(|e| serde::de::Error::custom(e.message))
            }
        }
    };
}
string_serde!(EmailAddress, "address", "An address: local@domain");
string_serde!(Mailbox, "mailbox", "A mailbox: an address with an optional display name, Name <local@domain>");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bare_and_named_mailboxes() {
        let m = Mailbox::parse("from", "Identity Panel <panel@example.org>").unwrap();
        assert_eq!(m.name.as_deref(), Some("Identity Panel"));
        assert_eq!(m.address.as_str(), "panel@example.org");
        let m = Mailbox::parse("from", "\"Quoted Name\" <a@b.example>").unwrap();
        assert_eq!(m.name.as_deref(), Some("Quoted Name"));
        let m = Mailbox::parse("from", " panel@example.org ").unwrap();
        assert_eq!(m.name, None);
        assert_eq!(m.to_string(), "panel@example.org");
    }

    #[test]
    fn rejects_line_breaks_and_nul_naming_the_field() {
        for bad in ["a@b.org\r\nBcc: x@y.org", "a@b.org\n", "a\0@b.org"] {
            let e = EmailAddress::parse("to", bad).unwrap_err();
            assert_eq!(e.field, "to");
            assert!(e.message.contains("single line"), "{}", e.message);
        }
        let e = Mailbox::parse("from", "Evil\r\nBcc: x@y.org <a@b.org>").unwrap_err();
        assert_eq!(e.field, "from");
    }

    #[test]
    fn rejects_invalid_addresses_with_a_fix() {
        for bad in ["", "nobody", "a@", "@b.org", "a b@c.org", "<a@b.org>"] {
            let e = EmailAddress::parse("fallback_recipient", bad).unwrap_err();
            assert_eq!(e.field, "fallback_recipient");
            assert!(e.message.contains("someone@example.org"), "{bad}: {}", e.message);
        }
        assert!(Mailbox::parse("from", "Name <a@b.org").is_err());
    }

    #[test]
    fn serde_round_trip_validates() {
        let m: Mailbox = serde_json::from_str("\"Ops <ops@example.org>\"").unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"Ops <ops@example.org>\"");
        assert!(serde_json::from_str::<EmailAddress>("\"not-an-address\"").is_err());
    }
}
