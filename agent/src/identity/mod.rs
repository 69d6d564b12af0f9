//! Workload identity: SPIFFE IDs, the X.509 certificates that carry them, the
//! certificate authority that signs them and the manager that keeps one fresh
//! certificate per workload identity on this node.
//!
//! The TLS layer (HBONE on :15008) builds on this module: it asks the
//! [`CertManager`] for the certificate of the local workload it speaks for,
//! trusts the [`TrustBundle`] and maps a peer's certificate back to a
//! [`SpiffeId`] with [`identity_from_cert`].

mod ca;
mod cert;
mod manager;
pub mod metrics;
mod remote;
mod spiffe;

use std::path::PathBuf;
use std::sync::{Arc, Once};

pub use ca::{
    CLOCK_SKEW_BACKDATE, CertificateAuthority, DEFAULT_CERT_TTL, LocalCa, TrustBundle, generate_csr,
};
pub use cert::{WorkloadCertificate, identity_from_cert};
pub use manager::{CertManager, CertManagerStats, CertSummary, Clock, SystemClock};
pub use remote::{RemoteCa, RemoteCaConfig, TrustReload};
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdProblem};

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid SPIFFE ID {input:?}: {problem}")]
    InvalidSpiffeId {
        /// The rejected input, shortened when it is very long so logs stay readable.
        input: String,
        problem: SpiffeIdProblem,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot parse certificate: {0}")]
    ParseCertificate(String),
    #[error("certificate carries no URI SAN, so no SPIFFE ID")]
    NoUriSan,
    #[error("certificate carries {0} URI SANs; an X.509-SVID must carry exactly one")]
    MultipleUriSans(usize),
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("rustls rejected the certificate or key: {0}")]
    Tls(#[from] rustls::Error),
    #[error("invalid PEM in {what}: {reason}")]
    Pem { what: String, reason: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA state in {path} is inconsistent: {reason}")]
    CaState { path: PathBuf, reason: String },
    #[error("certificate signing request rejected: {0}")]
    CsrRejected(String),
    #[error("invalid validity window: {0}")]
    InvalidValidity(String),
    #[error("certificate authority failed: {0}")]
    Ca(String),
    /// The remote CA answered with a gRPC error. `reason` is `ambit ca`'s stable refusal
    /// name (e.g. `identity_not_on_node`); other CAs (istiod) send none.
    #[error("the CA refused the request ({code:?}): {message}")]
    CaRefused {
        code: tonic::Code,
        reason: Option<String>,
        message: String,
    },
    /// One failed issuance reported to every caller that waited on it
    /// (single flight), so the original error is shared rather than cloned.
    #[error(transparent)]
    Shared(Arc<IdentityError>),
}

/// Result alias for this module.
pub type Result<T, E = IdentityError> = std::result::Result<T, E>;

/// Installs aws-lc-rs as rustls's process-wide default crypto provider.
///
/// Why aws-lc-rs rather than ring: on x86_64 it has markedly faster AES-GCM
/// and P-256 (the two primitives every HBONE handshake and byte goes through),
/// and it offers a FIPS-validated build should a deployment need one.
///
/// Idempotent: only the first call does anything. If some other part of the
/// process installed a provider first, that one stays; rustls allows only one.
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if rustls::crypto::aws_lc_rs::default_provider()
            .install_default()
            .is_err()
        {
            tracing::debug!("a rustls crypto provider was already installed; keeping it");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_crypto_provider_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
