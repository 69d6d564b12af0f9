//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, SPIFFE identities in the URI
//! SAN. The client checks that the server is exactly the expected destination identity; the
//! server requires a client certificate from the trust bundle and this trust domain.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
};

use crate::identity::{SpiffeId, TrustBundle, WorkloadCertificate, identity_from_cert};

const ALPN_H2: &[u8] = b"h2";

/// Why a handshake failed, as an operator reads it (and as a bounded metric label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    UnknownCa,
    NoClientCertificate,
    Expired,
    NotYetValid,
    SanMismatch { expected: String, got: String },
    WrongTrustDomain { got: String },
    NoSpiffeId,
    Protocol(String),
}

impl HandshakeFailure {
    /// Short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown_ca",
            Self::NoClientCertificate => "no_client_cert",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::SanMismatch { .. } => "san_mismatch",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::NoSpiffeId => "no_spiffe_id",
            Self::Protocol(_) => "protocol",
        }
    }

    /// Classifies a rustls error seen on either side of a failed handshake.
    pub fn from_tls_error(err: &Error) -> Self {
        match err {
            Error::InvalidCertificate(CertificateError::UnknownIssuer)
            | Error::InvalidCertificate(CertificateError::BadSignature) => Self::UnknownCa,
            Error::InvalidCertificate(CertificateError::Expired)
            | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => Self::Expired,
            Error::InvalidCertificate(CertificateError::NotValidYet)
            | Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
                Self::NotYetValid
            }
            Error::NoCertificatesPresented => Self::NoClientCertificate,
            Error::InvalidCertificate(CertificateError::Other(other)) => {
                if let Some(ours) = other.0.downcast_ref::<SpiffeCheckError>() {
                    ours.0.clone()
                } else {
                    Self::Protocol(other.to_string())
                }
            }
            Error::AlertReceived(alert) => Self::Protocol(format!("peer sent alert {alert:?}")),
            other => Self::Protocol(other.to_string()),
        }
    }
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownCa => f.write_str("certificate not signed by a trusted root"),
            Self::NoClientCertificate => f.write_str("client presented no certificate"),
            Self::Expired => f.write_str("certificate expired"),
            Self::NotYetValid => f.write_str("certificate not yet valid"),
            Self::SanMismatch { expected, got } => {
                write!(f, "peer is {got}, expected {expected}")
            }
            Self::WrongTrustDomain { got } => write!(f, "peer {got} is outside our trust domain"),
            Self::NoSpiffeId => f.write_str("certificate carries no SPIFFE ID"),
            Self::Protocol(detail) => write!(f, "protocol error: {detail}"),
        }
    }
}

/// Carries our own verification verdicts through rustls's `CertificateError::Other`.
#[derive(Debug)]
struct SpiffeCheckError(HandshakeFailure);

impl std::fmt::Display for SpiffeCheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SpiffeCheckError {}

fn spiffe_error(failure: HandshakeFailure) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        SpiffeCheckError(failure),
    ))))
}

/// The process's provider with the TLS 1.3 suites HBONE peers use (AES-GCM), AES-128 with
/// SHA-256 first: its key schedule and transcript hash SHA-256 instead of SHA-384 (a tenth of
/// a full handshake's instructions) and it encrypts with 10 AES rounds instead of 14. Both
/// suites stay offered and accepted, so a peer that insists on AES-256 still connects.
fn provider() -> Arc<CryptoProvider> {
    static HBONE_PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    HBONE_PROVIDER
        .get_or_init(|| {
            crate::identity::install_crypto_provider();
            let base = CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
            use rustls::crypto::aws_lc_rs::cipher_suite::{
                TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384,
            };
            Arc::new(CryptoProvider {
                cipher_suites: vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384],
                ..(*base).clone()
            })
        })
        .clone()
}

/// Client side: present `local`, accept only a server whose chain verifies against `bundle`
/// and whose URI SAN is exactly `expected`.
pub fn client_config(
    local: &WorkloadCertificate,
    bundle: &TrustBundle,
    expected: &SpiffeId,
) -> Result<ClientConfig, crate::tunnel::TunnelError> {
    let provider = provider();
    let verifier = Arc::new(ServerIdentityVerifier {
        roots: bundle.root_store()?,
        expected: expected.clone(),
        provider: provider.clone(),
    });
    let certified = local.certified_key()?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCert(certified)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE peers use no SNI and no session resumption.
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Server side: present `local`, require a client certificate that chains to `bundle` and
/// names an identity in `trust_domain`.
pub fn server_config(
    local: &WorkloadCertificate,
    bundle: &TrustBundle,
    trust_domain: &str,
) -> Result<ServerConfig, crate::tunnel::TunnelError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(
        Arc::new(bundle.root_store()?),
        provider.clone(),
    )
    .build()
    .map_err(|e| Error::General(e.to_string()))?;
    let verifier = Arc::new(ClientIdentityVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCert(local.certified_key()?)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The one certificate a workload presents, parsed once per configuration rather than per
/// handshake.
#[derive(Debug)]
struct SingleCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for SingleCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for SingleCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Verifies the server's chain against our roots (no DNS name check: HBONE identities live
/// in the URI SAN) and then that the SAN is the identity we meant to reach.
#[derive(Debug)]
struct ServerIdentityVerifier {
    roots: RootCertStore,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let got = identity_from_cert(end_entity)
            .map_err(|_| spiffe_error(HandshakeFailure::NoSpiffeId))?;
        if got != self.expected {
            return Err(spiffe_error(HandshakeFailure::SanMismatch {
                expected: self.expected.to_string(),
                got: got.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The config allows TLS 1.3 only, so this is never reached; refuse rather than trust.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// rustls's WebPKI client verifier for the chain, plus our trust-domain check on the SAN.
#[derive(Debug)]
struct ClientIdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = identity_from_cert(end_entity)
            .map_err(|_| spiffe_error(HandshakeFailure::NoSpiffeId))?;
        if id.trust_domain() != self.trust_domain {
            return Err(spiffe_error(HandshakeFailure::WrongTrustDomain {
                got: id.to_string(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The verified peer identity of an established TLS session.
pub fn peer_identity(certs: Option<&[CertificateDer<'static>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| identity_from_cert(leaf).ok())
}

/// Built rustls configurations, shared by every handshake with the same local certificate,
/// trust bundle and peer expectation. Building one parses the private key, the roots and
/// sets up a verifier, which is a sizeable share of a full handshake's cost; an entry is
/// rebuilt when the certificate renews (new serial) or the bundle changes.
pub struct ConfigCache<C> {
    entries: std::sync::Mutex<std::collections::HashMap<String, CachedConfig<C>>>,
}

struct CachedConfig<C> {
    serial: String,
    bundle: TrustBundle,
    config: Arc<C>,
}

impl<C> Default for ConfigCache<C> {
    fn default() -> Self {
        Self {
            entries: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

impl<C> ConfigCache<C> {
    pub fn get_or_build(
        &self,
        key: String,
        local: &WorkloadCertificate,
        bundle: &TrustBundle,
        build: impl FnOnce() -> Result<C, crate::tunnel::TunnelError>,
    ) -> Result<Arc<C>, crate::tunnel::TunnelError> {
        if let Ok(entries) = self.entries.lock()
            && let Some(hit) = entries.get(&key)
            && hit.serial == local.serial
            && hit.bundle == *bundle
        {
            return Ok(hit.config.clone());
        }
        let config = Arc::new(build()?);
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                key,
                CachedConfig {
                    serial: local.serial.clone(),
                    bundle: bundle.clone(),
                    config: config.clone(),
                },
            );
        }
        Ok(config)
    }
}
