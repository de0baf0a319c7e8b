//! A cluster's own certificate authority, for `dlm-agent certs`, the test
//! clusters and the benchmarks: a CA, and certificates it signs, each valid
//! for one DNS name (a member's `tls_name`, or a client's name for
//! `cert:NAME` in the access policy), for both TLS server and client use
//! (a member is both on its peer links). Production clusters may use any
//! CA instead; the agent only reads PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The CA's file names in its directory.
pub const CA_CERT: &str = "ca.pem";
/// Its key.
pub const CA_KEY: &str = "ca.key";

/// A CA whose certificate and key are files in a directory.
pub struct Authority {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

impl Authority {
    /// The CA in `dir` (`ca.pem`, `ca.key`), made if it is not there yet;
    /// `common_name` names a new one.
    ///
    /// # Errors
    /// A file cannot be read or written, or is not a key.
    pub fn open_or_create(dir: &Path, common_name: &str) -> Result<Authority, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
        let params = ca_params(common_name);
        let key = if key_path.exists() {
            let pem = std::fs::read_to_string(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
            KeyPair::from_pem(&pem).map_err(|e| format!("{}: {e}", key_path.display()))?
        } else {
            let key = KeyPair::generate().map_err(|e| e.to_string())?;
            let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
            write_private(&key_path, &key.serialize_pem())?;
            std::fs::write(&cert_path, cert.pem()).map_err(|e| format!("{}: {e}", cert_path.display()))?;
            key
        };
        Ok(Authority { dir: dir.to_path_buf(), issuer: Issuer::new(params, key) })
    }

    /// The CA certificate's file.
    #[must_use]
    pub fn certificate(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// Issues `<name>.pem` and `<name>.key` in the CA's directory, valid for
    /// the DNS name `name`; returns their paths.
    ///
    /// # Errors
    /// `name` is not a DNS name, or a file cannot be written.
    pub fn issue(&self, name: &str) -> Result<(PathBuf, PathBuf), String> {
        // A DNS name: what the agent matches, and a safe file name.
        if !matches!(rustls_pki_types::ServerName::try_from(name), Ok(rustls_pki_types::ServerName::DnsName(_))) {
            return Err(format!("{name:?} is not a DNS name"));
        }
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(|e| format!("{name:?}: {e}"))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| format!("{name:?}: {e}"))?;
        let (cert_path, key_path) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")));
        std::fs::write(&cert_path, cert.pem()).map_err(|e| format!("{}: {e}", cert_path.display()))?;
        write_private(&key_path, &key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn a_ca_issues_certificates_for_names_and_is_found_again() {
        let dir = std::env::temp_dir().join(format!("dlm-pki-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Authority::open_or_create(&dir, "test CA").expect("new CA");
        let (cert, key) = ca.issue("node1").expect("issued");
        let der = CertificateDer::from_pem_file(&cert).expect("a certificate");
        assert!(crate::access::names(&der, "node1"));
        assert!(!crate::access::names(&der, "node2"));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&key).expect("key").permissions().mode() & 0o777, 0o600);
        // The same CA, opened again, signs what the first certificate's verifier accepts.
        let before = std::fs::read(ca.certificate()).expect("ca");
        let again = Authority::open_or_create(&dir, "test CA").expect("the CA again");
        again.issue("node2").expect("issued");
        assert_eq!(std::fs::read(again.certificate()).expect("ca"), before);
        assert!(ca.issue("not a name").is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
