//! The `[tls]` section: the files of the cluster's CA and of this agent's
//! certificate, for the peer links and the TCP client listener. Either
//! listener refuses to start without them unless `insecure = true` says,
//! in so many words, that anyone who reaches the port is trusted.
//!
//! ```toml
//! [tls]
//! ca = "/etc/dlm/ca.pem"        # signs every member's and client's certificate
//! cert = "/etc/dlm/node1.pem"   # this agent's chain; valid for its member's tls_name
//! key = "/etc/dlm/node1.key"
//! client_certificates = "optional"   # TCP clients: "optional" or "required"
//! ```

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// Whether TCP clients must present a certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertificates {
    /// A client may connect without one (it then has no identity but `*`).
    #[default]
    Optional,
    /// A client without a valid certificate is refused in the handshake.
    Required,
}

/// The TLS files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the CA certificates that sign members' and clients' certificates.
    pub ca: PathBuf,
    /// PEM: this agent's certificate chain, its own first.
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Whether TCP clients must present a certificate.
    pub client_certificates: ClientCertificates,
}

/// How the TCP listeners (peer and client) are secured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TlsSettings {
    /// No `[tls]`: an agent with a TCP listener refuses to start.
    #[default]
    Unset,
    /// TLS with these files.
    Files(TlsFiles),
    /// `insecure = true`: plain TCP.
    Insecure,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_certificates: Option<ClientCertificates>,
    insecure: Option<bool>,
}

/// What the file's `[tls]` says.
pub(super) fn tls_settings(file: FileTls) -> Result<TlsSettings, ConfigError> {
    match (file.insecure.unwrap_or(false), file.ca, file.cert, file.key) {
        (true, None, None, None) => Ok(TlsSettings::Insecure),
        (true, ..) => Err(invalid("tls.insecure", "is true, but certificate files are given too: choose one")),
        (false, Some(ca), Some(cert), Some(key)) => Ok(TlsSettings::Files(TlsFiles {
            ca,
            cert,
            key,
            client_certificates: file.client_certificates.unwrap_or_default(),
        })),
        (false, ..) => Err(invalid("tls", "needs ca, cert and key (or insecure = true)")),
    }
}

/// Refuses a TCP listener (named by `what`) without TLS or `insecure = true`.
pub(super) fn check_listener(settings: &TlsSettings, what: &str) -> Result<(), ConfigError> {
    match settings {
        TlsSettings::Unset => Err(invalid(
            "tls",
            format!(
                "{what} is a TCP listener: give [tls] ca, cert and key, or set [tls] insecure = true \
                 to trust anyone who can reach it"
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TlsSettings, ConfigError> {
        tls_settings(toml::from_str(text).expect("parses"))
    }

    #[test]
    fn tls_is_files_or_insecure_in_so_many_words() {
        assert_eq!(parse("insecure = true").expect("valid"), TlsSettings::Insecure);
        let files = parse("ca = \"a\"\ncert = \"b\"\nkey = \"c\"\nclient_certificates = \"required\"").expect("valid");
        assert!(matches!(files, TlsSettings::Files(f) if f.client_certificates == ClientCertificates::Required));
        assert!(parse("ca = \"a\"\ncert = \"b\"").unwrap_err().to_string().contains("needs ca, cert and key"));
        assert!(parse("insecure = true\nca = \"a\"").unwrap_err().to_string().contains("choose one"));
        assert!(parse("insecure = false").is_err());
        let error = check_listener(&TlsSettings::Unset, "the peer listener").unwrap_err().to_string();
        assert!(error.contains("insecure = true"), "{error}");
        assert!(check_listener(&TlsSettings::Insecure, "x").is_ok());
    }
}
