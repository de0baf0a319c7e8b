//! TLS for the agent's TCP listeners and its dials to peers (rustls, with
//! ring's cryptography), from the files of `[tls]`.
//!
//! | use | this side | the other side |
//! |---|---|---|
//! | peer link, accepted | server certificate | a client certificate signed by the cluster's CA, required; it must name the member the hello claims ([`crate::access::names`]) |
//! | peer link, dialled | client certificate | a server certificate signed by the CA, valid for the member's `tls_name` |
//! | TCP client API | server certificate, ALPN `h2` (gRPC) | a client certificate signed by the CA: optional or required (`client_certificates`); it is the client's identity for the access policy |
//!
//! [`Tls::reload`] reads the files again (on SIGHUP): new handshakes use
//! the new certificates; connections already made keep theirs, so no
//! session is dropped. A reload that fails keeps the old ones.

use std::sync::{Arc, PoisonError, RwLock};

use prometheus::{IntCounterVec, IntGauge, Opts};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ClientCertificates, TlsFiles};
use crate::metrics::Metrics;

/// The three configurations one set of files gives.
struct Configs {
    peer_server: Arc<ServerConfig>,
    peer_client: Arc<ClientConfig>,
    api_server: Arc<ServerConfig>,
}

/// The agent's TLS: its configurations, reloadable.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Configs>,
    reloads: IntCounterVec,
}

/// ring's provider, AES-128-GCM first: a peer link's records are small
/// (a few hundred bytes), and its fewer rounds are the cheapest of the
/// TLS 1.3 suites there; the others stay, for clients that prefer them.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let first = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    provider.cipher_suites.retain(|suite| suite.suite() != first.suite());
    provider.cipher_suites.insert(0, first);
    Arc::new(provider)
}

fn read_certificates(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certificates)
}

fn load(files: &TlsFiles) -> Result<Configs, String> {
    let mut roots = RootCertStore::empty();
    for ca in read_certificates(&files.ca)? {
        roots.add(ca).map_err(|e| format!("{}: not a CA certificate: {e}", files.ca.display()))?;
    }
    let roots = Arc::new(roots);
    let chain = read_certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| format!("{}: {e}", files.key.display()))?;
    let tls_error = |what: &str, e: rustls::Error| format!("{what}: {e}");
    let verifier = |anonymous: bool| {
        let builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
        let builder = if anonymous { builder.allow_unauthenticated() } else { builder };
        builder.build().map_err(|e| format!("{}: {e}", files.ca.display()))
    };
    let server = |verifier| {
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error("protocol versions", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| tls_error("the certificate and key", e))
    };

    let peer_server = server(verifier(false)?)?;
    let peer_client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("protocol versions", e))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .map_err(|e| tls_error("the certificate and key", e))?;
    let mut api_server = server(verifier(files.client_certificates == ClientCertificates::Optional)?)?;
    // gRPC clients insist on HTTP/2 being agreed in the handshake.
    api_server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Configs {
        peer_server: Arc::new(peer_server),
        peer_client: Arc::new(peer_client),
        api_server: Arc::new(api_server),
    })
}

impl Tls {
    /// Reads the files.
    ///
    /// # Errors
    /// A file is unreadable, or not what it should be: the message names it.
    ///
    /// # Panics
    /// Never: the metric's name and labels are valid.
    pub fn load(files: &TlsFiles, metrics: &Metrics) -> Result<Tls, String> {
        let current = RwLock::new(load(files)?);
        let reloads = IntCounterVec::new(
            Opts::new("dlm_tls_reloads_total", "Reloads of the TLS files (SIGHUP), by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        for outcome in ["success", "failure"] {
            reloads.with_label_values(&[outcome]);
        }
        metrics.register(Box::new(reloads.clone()));
        Ok(Tls { files: files.clone(), current, reloads })
    }

    /// Reads the files again; on failure the certificates in use stay.
    ///
    /// # Errors
    /// As [`Tls::load`].
    pub fn reload(&self) -> Result<(), String> {
        let loaded = load(&self.files);
        let outcome = if loaded.is_ok() { "success" } else { "failure" };
        self.reloads.with_label_values(&[outcome]).inc();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = loaded?;
        Ok(())
    }

    fn with<T>(&self, pick: impl FnOnce(&Configs) -> T) -> T {
        pick(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// For a peer's incoming connection.
    #[must_use]
    pub fn peer_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.with(|c| c.peer_server.clone()))
    }

    /// For a dial to a peer.
    #[must_use]
    pub fn peer_connector(&self) -> TlsConnector {
        TlsConnector::from(self.with(|c| c.peer_client.clone()))
    }

    /// For a TCP client's connection.
    #[must_use]
    pub fn api_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.with(|c| c.api_server.clone()))
    }
}

/// `dlm_tls_insecure`: 1 while a TCP listener runs without TLS
/// (`insecure = true`), so that it shows on every dashboard and alert.
///
/// # Panics
/// Never: the metric's name is valid.
pub fn report_insecure(metrics: &Metrics, insecure: bool) {
    let gauge = IntGauge::new(
        "dlm_tls_insecure",
        "1 when the peer links and the TCP client listener run without TLS (insecure = true)",
    )
    .expect("valid metric");
    gauge.set(i64::from(insecure));
    metrics.register(Box::new(gauge));
}

/// What a TCP client's requests carry (tonic puts it in their extensions):
/// the certificate it presented, its identity for the access policy. Here,
/// beside the TLS it comes from, so that the gRPC service reads it without
/// importing the TCP transport.
#[derive(Clone, Debug)]
pub struct TcpClient {
    /// The certificate it presented, checked against the cluster's CA.
    pub certificate: Option<Arc<CertificateDer<'static>>>,
}
