//! How the connection to the relay is protected. Its own module because both the settings and
//! the classification of failures depend on it (the same silence means something else on 465).

crate::string_enum!(
    /// How the connection to the relay is protected.
    Security {
        /// Implicit TLS from the first byte (SMTPS, usually port 465).
        Tls = "tls" => "Implicit TLS",
        /// STARTTLS required: fail if the relay does not offer it.
        Starttls = "starttls" => "STARTTLS (required)",
        /// STARTTLS when offered, plain otherwise.
        Opportunistic = "opportunistic" => "STARTTLS when offered",
        /// Plain SMTP.
        None = "none" => "None",
    }
);

impl Security {
    pub fn default_port(self) -> u16 {
        match self {
            Self::Tls => 465,
            Self::Starttls => 587,
            Self::Opportunistic | Self::None => 25,
        }
    }
}
