//! OAuth2 for the relay (SASL XOAUTH2): providers, their defaults, and token endpoint URLs.

use std::fmt;
use std::net::IpAddr;

crate::string_enum!(
    /// Who issues the relay's OAuth2 tokens.
    OAuthProvider {
        /// Microsoft 365 / Exchange Online: client-credentials flow of an app registration.
        Microsoft = "microsoft" => "Microsoft 365",
        /// Google Workspace: a service account with domain-wide delegation (JWT bearer grant).
        Google = "google" => "Google Workspace",
    }
);

impl OAuthProvider {
    /// The scope that grants SMTP submission.
    pub fn scope(self) -> &'static str {
        match self {
            Self::Microsoft => "https://outlook.office365.com/.default",
            Self::Google => "https://mail.google.com/",
        }
    }

    /// The scope of a Microsoft Graph token (the app's application permissions, `Mail.Send`).
    pub const GRAPH_SCOPE: &'static str = "https://graph.microsoft.com/.default";

    /// The token endpoint when the settings name none (`tenant` only matters for Microsoft).
    pub fn default_token_endpoint(self, tenant: &str) -> String {
        match self {
            Self::Microsoft => format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"),
            Self::Google => "https://oauth2.googleapis.com/token".into(),
        }
    }
}

/// A token endpoint: HTTPS, or plain HTTP to a loopback address (local test providers only,
/// because a client secret must never cross a network in clear).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl EndpointUrl {
    pub fn parse(value: &str) -> Result<EndpointUrl, String> {
        EndpointUrl::parse_as(value, "token endpoint")
    }

    /// `parse`, naming the URL as `what` in its errors ("Graph endpoint").
    pub fn parse_as(value: &str, what: &str) -> Result<EndpointUrl, String> {
        let v = value.trim();
        let bad = |why: &str| format!("'{v}' is not a usable {what}: {why}");
        let (tls, rest) = if let Some(r) = v.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = v.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("use an https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not allowed"));
        }
        if path.chars().any(|c| c.is_control() || c == ' ' || c == '#') {
            return Err(bad("the path has spaces, control characters or a fragment"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("the host or port is invalid"))?;
        let host = crate::settings::validate_host("token_endpoint", host).map_err(|_| bad("the host is invalid"))?;
        let port = match port {
            Some(p) => p,
            None if tls => 443,
            None => 80,
        };
        if !tls && !is_loopback_host(&host) {
            return Err(bad("plain http is allowed only to a loopback address (local test providers); use https"));
        }
        Ok(EndpointUrl { tls, host, port, path: path.to_string() })
    }
}

impl fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            write!(f, "{scheme}://{host}{}", self.path)
        } else {
            write!(f, "{scheme}://{host}:{}{}", self.port, self.path)
        }
    }
}

fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((host, Some(p.parse().ok().filter(|p| *p != 0)?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok().filter(|p| *p != 0)?))),
        None => Some((authority, None)),
    }
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The SASL XOAUTH2 initial response, before base64.
pub fn xoauth2_response(user: &str, token: &str) -> String {
    format!("user={user}\x01auth=Bearer {token}\x01\x01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_require_https_except_on_loopback() {
        let u = EndpointUrl::parse("https://login.microsoftonline.com/contoso/oauth2/v2.0/token").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/contoso/oauth2/v2.0/token"));
        assert_eq!(u.to_string(), "https://login.microsoftonline.com/contoso/oauth2/v2.0/token");
        let u = EndpointUrl::parse("http://127.0.0.1:8080/token").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 8080));
        assert!(EndpointUrl::parse("http://[::1]:9/t").is_ok());
        assert!(EndpointUrl::parse("http://idp.example.org/token").unwrap_err().contains("loopback"));
        assert!(EndpointUrl::parse("ftp://x/y").is_err());
        assert!(EndpointUrl::parse("https://u:p@idp.example.org/").is_err());
        assert!(EndpointUrl::parse("https://idp.example.org:0/").is_err());
    }

    #[test]
    fn xoauth2_response_has_the_sasl_layout() {
        assert_eq!(xoauth2_response("a@b.org", "tok"), "user=a@b.org\x01auth=Bearer tok\x01\x01");
    }

    #[test]
    fn providers_have_the_documented_defaults() {
        assert_eq!(
            OAuthProvider::Microsoft.default_token_endpoint("contoso.onmicrosoft.com"),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(OAuthProvider::Microsoft.scope(), "https://outlook.office365.com/.default");
        assert_eq!(OAuthProvider::parse("Google"), Some(OAuthProvider::Google));
    }
}
