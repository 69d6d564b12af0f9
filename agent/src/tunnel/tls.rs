//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, SPIFFE identities in the URI
//! SAN. The client checks that the server is exactly the expected destination identity; the
//! server requires a client certificate from the trust bundle and this trust domain.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
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
/// and whose URI SAN is exactly `expected`. A configuration of its own (its own verified-chain
/// cache); the data path builds through [`ConfigCache`], which shares one per bundle.
pub fn client_config(
    local: &WorkloadCertificate,
    bundle: &TrustBundle,
    expected: &SpiffeId,
) -> Result<ClientConfig, crate::tunnel::TunnelError> {
    client_config_for(local, &TrustAnchors::new(bundle)?, expected)
}

/// [`client_config`] against already built trust anchors (and their verified chains).
pub fn client_config_for(
    local: &WorkloadCertificate,
    anchors: &Arc<TrustAnchors>,
    expected: &SpiffeId,
) -> Result<ClientConfig, crate::tunnel::TunnelError> {
    let provider = provider();
    let verifier = Arc::new(ServerIdentityVerifier {
        anchors: anchors.clone(),
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
/// names an identity in `trust_domain`. A configuration of its own, like [`client_config`]
/// (the agent builds through [`ConfigCache`]; tests build one directly).
#[cfg(test)]
pub fn server_config(
    local: &WorkloadCertificate,
    bundle: &TrustBundle,
    trust_domain: &str,
) -> Result<ServerConfig, crate::tunnel::TunnelError> {
    server_config_for(local, &TrustAnchors::new(bundle)?, trust_domain)
}

/// [`server_config`] against already built trust anchors (and their verified chains).
pub fn server_config_for(
    local: &WorkloadCertificate,
    anchors: &Arc<TrustAnchors>,
    trust_domain: &str,
) -> Result<ServerConfig, crate::tunnel::TunnelError> {
    let provider = provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(anchors.store.clone(), provider.clone())
            .build()
            .map_err(|e| Error::General(e.to_string()))?;
    let verifier = Arc::new(ClientIdentityVerifier {
        inner,
        anchors: anchors.clone(),
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
    anchors: Arc<TrustAnchors>,
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
        let got = self.anchors.chains.verify(
            ChainUsage::ServerAuth,
            end_entity,
            intermediates,
            now,
            || {
                let parsed = ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &self.anchors.store,
                    intermediates,
                    now,
                    self.provider.signature_verification_algorithms.all,
                )
            },
        )?;
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
    anchors: Arc<TrustAnchors>,
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
        let id = self.anchors.chains.verify(
            ChainUsage::ClientAuth,
            end_entity,
            intermediates,
            now,
            || {
                self.inner
                    .verify_client_cert(end_entity, intermediates, now)
                    .map(|_| ())
            },
        )?;
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

/// The peer identity of an established TLS session, parsed from its (verified) leaf.
pub fn peer_identity(certs: Option<&[CertificateDer<'static>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| identity_from_cert(leaf).ok())
}

/// The trust bundle in the form the verifiers use, built once per bundle and shared by every
/// configuration built against it, together with the peer chains already verified against
/// exactly these roots. A changed bundle gets new anchors with an empty chain cache, so a
/// chain verified under old roots is never taken on trust under new ones.
pub struct TrustAnchors {
    bundle: Arc<TrustBundle>,
    store: Arc<RootCertStore>,
    chains: VerifiedChains,
}

impl TrustAnchors {
    pub fn new(bundle: &TrustBundle) -> Result<Arc<Self>, crate::tunnel::TunnelError> {
        Self::shared(&Arc::new(bundle.clone()), &ChainCacheCounters::default())
    }

    /// Anchors holding `bundle` itself rather than a copy of it, counting their chain cache's
    /// hits and misses in `counters`.
    fn shared(
        bundle: &Arc<TrustBundle>,
        counters: &ChainCacheCounters,
    ) -> Result<Arc<Self>, crate::tunnel::TunnelError> {
        Ok(Arc::new(Self {
            bundle: bundle.clone(),
            store: Arc::new(bundle.root_store()?),
            chains: VerifiedChains::new(VERIFIED_CHAINS_CAPACITY, counters.clone()),
        }))
    }

    /// The client identity of a session whose handshake a server configuration built on
    /// these anchors has just completed: the identity the verifier recorded when it accepted
    /// exactly this chain, which saves parsing the certificate again; parsed from the leaf
    /// when the chain is not (or no longer) recorded. Only for `peer_certificates()` of an
    /// established session: rustls hands out only certificates its verifier accepted.
    pub fn verified_client_identity(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
    ) -> Option<SpiffeId> {
        let certs = certs?;
        let (leaf, intermediates) = certs.split_first()?;
        self.chains
            .recorded_identity(ChainUsage::ClientAuth, leaf, intermediates)
            .or_else(|| peer_identity(Some(certs)))
    }

    /// Chains currently cached as verified.
    #[cfg(test)]
    pub fn verified_chains(&self) -> usize {
        self.chains.len()
    }
}

impl std::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("bundle", &self.bundle)
            .field("verified_chains", &self.chains.len())
            .finish()
    }
}

/// Enough for every peer certificate a node's pods talk to within a renewal period; an entry
/// is the chain's DER (about a KiB for a leaf and no intermediate).
const VERIFIED_CHAINS_CAPACITY: usize = 1024;

/// What a chain was verified for: the extended key usage checked differs (a chain good as a
/// client certificate need not be good as a server certificate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ChainUsage {
    ServerAuth,
    ClientAuth,
}

/// The exact DER of the leaf and the intermediates, each length-prefixed so that no two
/// different chains share a key.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ChainKey {
    usage: ChainUsage,
    der: Box<[u8]>,
}

impl ChainKey {
    fn new(
        usage: ChainUsage,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Self {
        let certs = || std::iter::once(end_entity).chain(intermediates);
        let mut der = Vec::with_capacity(certs().map(|c| c.len() + 4).sum());
        for cert in certs() {
            // A certificate's DER is far below 4 GiB (rustls bounds a handshake message at 16 MiB).
            der.extend_from_slice(&(cert.len() as u32).to_be_bytes());
            der.extend_from_slice(cert);
        }
        Self {
            usage,
            der: der.into_boxed_slice(),
        }
    }
}

/// What a full verification established about a chain and what must still be checked at
/// each use: the time window in which every certificate of the chain is valid (checked
/// against the handshake's time, as WebPKI does), and the SPIFFE ID of the leaf (checked
/// against the expected identity or trust domain by the caller).
struct VerifiedChain {
    valid_from: u64,
    valid_until: u64,
    identity: SpiffeId,
}

/// Peer chains whose signatures up to a trust anchor were verified in full. A full
/// verification of a P-256 chain is an ECDSA verify, about a quarter of a handshake's
/// instructions on each end; peers present the same certificate on every connection until
/// it renews. A hit still checks the validity time and hands back the leaf's identity for
/// the caller's identity check; the handshake's CertificateVerify (proof that the peer holds
/// the key) is verified by rustls on every handshake, cached chain or not. Anything the cache
/// cannot vouch for (no entry, outside the window, a poisoned lock) takes the full path,
/// whose error is the one reported.
struct VerifiedChains {
    entries: std::sync::Mutex<std::collections::HashMap<ChainKey, VerifiedChain>>,
    capacity: usize,
    counters: ChainCacheCounters,
}

/// Verifications the verified-chain cache answered (`hits`) and those that took the full
/// path (`misses`, whatever their outcome); the agent's metrics register them
/// ([`crate::tunnel::Metrics`]), every pod's anchors add to the same two counters.
#[derive(Clone, Debug, Default)]
pub struct ChainCacheCounters {
    pub hits: Counter,
    pub misses: Counter,
}

impl VerifiedChains {
    fn new(capacity: usize, counters: ChainCacheCounters) -> Self {
        Self {
            entries: std::sync::Mutex::new(std::collections::HashMap::new()),
            capacity: capacity.max(1),
            counters,
        }
    }

    fn len(&self) -> usize {
        self.entries.lock().map_or(0, |e| e.len())
    }

    #[cfg(test)]
    fn hits(&self) -> u64 {
        self.counters.hits.get()
    }

    #[cfg(test)]
    fn misses(&self) -> u64 {
        self.counters.misses.get()
    }

    /// The identity recorded for a chain that passed a full verification for `usage`; `None`
    /// for any chain that did not (or was evicted since). No time check: the caller's
    /// handshake has just checked the chain's validity.
    fn recorded_identity(
        &self,
        usage: ChainUsage,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Option<SpiffeId> {
        let key = ChainKey::new(usage, end_entity, intermediates);
        let entries = self.entries.lock().ok()?;
        entries.get(&key).map(|hit| hit.identity.clone())
    }

    /// The leaf's SPIFFE ID once the chain is known good at `now`: from the cache, or after
    /// `full_verify` (chain building, signatures, validity, key usage) succeeds.
    fn verify(
        &self,
        usage: ChainUsage,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        full_verify: impl FnOnce() -> Result<(), Error>,
    ) -> Result<SpiffeId, Error> {
        let key = ChainKey::new(usage, end_entity, intermediates);
        let now_secs = now.as_secs();
        if let Ok(entries) = self.entries.lock()
            && let Some(hit) = entries.get(&key)
            // WebPKI's own bounds: valid from not_before through not_after, both inclusive.
            && hit.valid_from <= now_secs
            && now_secs <= hit.valid_until
        {
            self.counters.hits.inc();
            return Ok(hit.identity.clone());
        }
        self.counters.misses.inc();
        full_verify()?;
        let identity = identity_from_cert(end_entity)
            .map_err(|_| spiffe_error(HandshakeFailure::NoSpiffeId))?;
        if let Some((valid_from, valid_until)) = validity_window(end_entity, intermediates)
            && valid_from <= now_secs
            && now_secs <= valid_until
            && let Ok(mut entries) = self.entries.lock()
        {
            if entries.len() >= self.capacity {
                entries.retain(|_, e| e.valid_until >= now_secs);
            }
            if entries.len() >= self.capacity
                && let Some(victim) = entries.keys().next().map(|k| ChainKey {
                    usage: k.usage,
                    der: k.der.clone(),
                })
            {
                entries.remove(&victim);
            }
            entries.insert(
                key,
                VerifiedChain {
                    valid_from,
                    valid_until,
                    identity: identity.clone(),
                },
            );
        }
        Ok(identity)
    }
}

/// The seconds-since-epoch window in which every certificate given is valid: the latest
/// not_before and the earliest not_after. `None` (do not cache) if any does not parse or
/// dates from before 1970, which WebPKI would not have accepted anyway.
fn validity_window(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<(u64, u64)> {
    let mut window = (0u64, u64::MAX);
    for cert in std::iter::once(end_entity).chain(intermediates) {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
        let validity = parsed.validity();
        let not_before = u64::try_from(validity.not_before.timestamp()).ok()?;
        let not_after = u64::try_from(validity.not_after.timestamp()).ok()?;
        window = (window.0.max(not_before), window.1.min(not_after));
    }
    Some(window)
}

/// Built rustls configurations, shared by every handshake with the same local certificate,
/// trust bundle and peer expectation. Building one parses the private key, the roots and
/// sets up a verifier, which is a sizeable share of a full handshake's cost; an entry is
/// rebuilt when the certificate renews (new serial) or the bundle changes. Every
/// configuration built for the same bundle shares one [`TrustAnchors`], so a peer chain
/// verified for one configuration is a cache hit for the others.
pub struct ConfigCache<C> {
    entries: std::sync::Mutex<std::collections::HashMap<String, CachedConfig<C>>>,
    anchors: std::sync::Mutex<Option<Arc<TrustAnchors>>>,
    chain_counters: ChainCacheCounters,
}

struct CachedConfig<C> {
    serial: String,
    bundle: Arc<TrustBundle>,
    config: Arc<C>,
    /// What `config`'s verifier verifies against (and records accepted chains in).
    anchors: Arc<TrustAnchors>,
}

/// Whether two bundles hold the same roots; the CA hands out one shared bundle until its
/// roots change, so the pointer comparison almost always decides.
fn same_bundle(a: &Arc<TrustBundle>, b: &Arc<TrustBundle>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

impl<C> Default for ConfigCache<C> {
    fn default() -> Self {
        Self {
            entries: std::sync::Mutex::new(std::collections::HashMap::new()),
            anchors: std::sync::Mutex::new(None),
            chain_counters: ChainCacheCounters::default(),
        }
    }
}

impl<C> ConfigCache<C> {
    /// A cache whose anchors count their verified-chain hits and misses in `counters`.
    pub fn with_chain_counters(counters: ChainCacheCounters) -> Self {
        Self {
            chain_counters: counters,
            ..Self::default()
        }
    }

    /// The configuration, and the anchors its verifier uses (see
    /// [`TrustAnchors::verified_client_identity`]).
    pub fn get_or_build(
        &self,
        key: String,
        local: &WorkloadCertificate,
        bundle: &Arc<TrustBundle>,
        build: impl FnOnce(&Arc<TrustAnchors>) -> Result<C, crate::tunnel::TunnelError>,
    ) -> Result<(Arc<C>, Arc<TrustAnchors>), crate::tunnel::TunnelError> {
        if let Ok(entries) = self.entries.lock()
            && let Some(hit) = entries.get(&key)
            && hit.serial == local.serial
            && same_bundle(&hit.bundle, bundle)
        {
            return Ok((hit.config.clone(), hit.anchors.clone()));
        }
        let anchors = self.anchors_for(bundle)?;
        let config = Arc::new(build(&anchors)?);
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                key,
                CachedConfig {
                    serial: local.serial.clone(),
                    bundle: bundle.clone(),
                    config: config.clone(),
                    anchors: anchors.clone(),
                },
            );
        }
        Ok((config, anchors))
    }

    /// The anchors for `bundle`: the current ones while the bundle is unchanged, else new
    /// ones (with an empty verified-chain cache) that replace them.
    pub fn anchors_for(
        &self,
        bundle: &Arc<TrustBundle>,
    ) -> Result<Arc<TrustAnchors>, crate::tunnel::TunnelError> {
        let mut current = match self.anchors.lock() {
            Ok(current) => current,
            Err(_) => return TrustAnchors::shared(bundle, &self.chain_counters),
        };
        if let Some(anchors) = current.as_ref()
            && same_bundle(&anchors.bundle, bundle)
        {
            return Ok(anchors.clone());
        }
        let anchors = TrustAnchors::shared(bundle, &self.chain_counters)?;
        *current = Some(anchors.clone());
        Ok(anchors)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::identity::{CertificateAuthority as _, LocalCa};

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).expect("SPIFFE ID")
    }

    fn at(time: SystemTime) -> UnixTime {
        UnixTime::since_unix_epoch(time.duration_since(UNIX_EPOCH).expect("after 1970"))
    }

    /// A certificate valid for ten minutes from `start`.
    fn issue(ca: &LocalCa, sa: &str, start: SystemTime) -> WorkloadCertificate {
        ca.issue_with_validity(&id(sa), start, start + Duration::from_secs(600))
            .expect("certificate")
    }

    fn server_verifier(anchors: &Arc<TrustAnchors>, expected: &str) -> ServerIdentityVerifier {
        ServerIdentityVerifier {
            anchors: anchors.clone(),
            expected: id(expected),
            provider: provider(),
        }
    }

    fn client_verifier(anchors: &Arc<TrustAnchors>, trust_domain: &str) -> ClientIdentityVerifier {
        ClientIdentityVerifier {
            inner: WebPkiClientVerifier::builder_with_provider(anchors.store.clone(), provider())
                .build()
                .expect("verifier"),
            anchors: anchors.clone(),
            trust_domain: trust_domain.to_string(),
        }
    }

    fn as_server(
        verifier: &ServerIdentityVerifier,
        cert: &WorkloadCertificate,
        now: SystemTime,
    ) -> Result<(), HandshakeFailure> {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        verifier
            .verify_server_cert(cert.leaf(), &cert.chain[1..], &name, &[], at(now))
            .map(|_| ())
            .map_err(|e| HandshakeFailure::from_tls_error(&e))
    }

    fn as_client(
        verifier: &ClientIdentityVerifier,
        cert: &WorkloadCertificate,
        now: SystemTime,
    ) -> Result<(), HandshakeFailure> {
        verifier
            .verify_client_cert(cert.leaf(), &cert.chain[1..], at(now))
            .map(|_| ())
            .map_err(|e| HandshakeFailure::from_tls_error(&e))
    }

    #[test]
    fn a_cached_chain_is_refused_outside_its_validity() {
        crate::identity::install_crypto_provider();
        let ca = LocalCa::generate().expect("CA");
        let start = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let cert = issue(&ca, "server", start);
        let anchors = TrustAnchors::new(&ca.trust_bundle()).expect("anchors");
        let server = server_verifier(&anchors, "server");
        let client = client_verifier(&anchors, "cluster.local");
        let secs = |s| start + Duration::from_secs(s);

        assert_eq!(as_server(&server, &cert, secs(10)), Ok(()));
        assert_eq!(as_client(&client, &cert, secs(10)), Ok(()));
        assert_eq!(anchors.verified_chains(), 2, "one entry per usage");
        assert_eq!(as_server(&server, &cert, secs(20)), Ok(()));
        assert_eq!(as_client(&client, &cert, secs(20)), Ok(()));
        assert_eq!(anchors.chains.hits(), 2, "both verified from the cache");

        // With the chain in the cache: after not_after, and before not_before.
        assert_eq!(
            as_server(&server, &cert, secs(601)),
            Err(HandshakeFailure::Expired)
        );
        assert_eq!(
            as_client(&client, &cert, secs(601)),
            Err(HandshakeFailure::Expired)
        );
        assert_eq!(
            as_server(&server, &cert, start - Duration::from_secs(1)),
            Err(HandshakeFailure::NotYetValid)
        );
        assert_eq!(
            as_client(&client, &cert, start - Duration::from_secs(1)),
            Err(HandshakeFailure::NotYetValid)
        );
        assert_eq!(anchors.chains.hits(), 2, "no hit outside the window");
        // WebPKI's bounds are inclusive; the cache's are the same.
        assert_eq!(as_server(&server, &cert, secs(600)), Ok(()));
        assert_eq!(as_server(&server, &cert, start), Ok(()));
        assert_eq!(anchors.chains.hits(), 4);
    }

    #[test]
    fn a_cached_chain_is_refused_for_another_identity_or_trust_domain() {
        crate::identity::install_crypto_provider();
        let ca = LocalCa::generate().expect("CA");
        let now = SystemTime::now();
        let cert = issue(&ca, "server", now);
        let anchors = TrustAnchors::new(&ca.trust_bundle()).expect("anchors");

        assert_eq!(
            as_server(&server_verifier(&anchors, "server"), &cert, now),
            Ok(())
        );
        assert_eq!(
            as_server(&server_verifier(&anchors, "other"), &cert, now),
            Err(HandshakeFailure::SanMismatch {
                expected: id("other").to_string(),
                got: id("server").to_string(),
            })
        );
        assert_eq!(
            as_client(&client_verifier(&anchors, "cluster.local"), &cert, now),
            Ok(())
        );
        assert_eq!(
            as_client(&client_verifier(&anchors, "example.org"), &cert, now),
            Err(HandshakeFailure::WrongTrustDomain {
                got: id("server").to_string()
            })
        );
        assert_eq!(
            anchors.chains.hits(),
            2,
            "both refusals came with the chain cached"
        );
    }

    #[test]
    fn a_trust_swap_refuses_chains_verified_under_the_old_roots() {
        crate::identity::install_crypto_provider();
        let old_ca = LocalCa::generate().expect("CA");
        let new_ca = LocalCa::generate().expect("CA");
        let now = SystemTime::now();
        let cert = issue(&old_ca, "client", now);
        let cache = ConfigCache::<ServerConfig>::default();

        let old = cache.anchors_for(&old_ca.trust_bundle()).expect("anchors");
        assert_eq!(
            as_client(&client_verifier(&old, "cluster.local"), &cert, now),
            Ok(())
        );
        assert_eq!(
            as_server(&server_verifier(&old, "client"), &cert, now),
            Ok(())
        );
        assert_eq!(old.verified_chains(), 2);
        let same = cache.anchors_for(&old_ca.trust_bundle()).expect("anchors");
        assert!(
            Arc::ptr_eq(&old, &same),
            "an unchanged bundle keeps its anchors"
        );

        let swapped = cache.anchors_for(&new_ca.trust_bundle()).expect("anchors");
        assert!(!Arc::ptr_eq(&old, &swapped));
        assert_eq!(
            swapped.verified_chains(),
            0,
            "new roots start with no verified chain"
        );
        assert_eq!(
            as_client(&client_verifier(&swapped, "cluster.local"), &cert, now),
            Err(HandshakeFailure::UnknownCa)
        );
        assert_eq!(
            as_server(&server_verifier(&swapped, "client"), &cert, now),
            Err(HandshakeFailure::UnknownCa)
        );
        assert_eq!(
            swapped.verified_chains(),
            0,
            "refused chains are not cached"
        );
    }

    #[test]
    fn a_chain_verified_for_one_usage_is_not_a_hit_for_the_other() {
        crate::identity::install_crypto_provider();
        let ca = LocalCa::generate().expect("CA");
        let now = SystemTime::now();
        let cert = issue(&ca, "server", now);
        let anchors = TrustAnchors::new(&ca.trust_bundle()).expect("anchors");
        assert_eq!(
            as_server(&server_verifier(&anchors, "server"), &cert, now),
            Ok(())
        );
        assert_eq!(
            as_client(&client_verifier(&anchors, "cluster.local"), &cert, now),
            Ok(())
        );
        assert_eq!(
            anchors.chains.hits(),
            0,
            "the client-auth check ran in full"
        );
        assert_eq!(
            ChainKey::new(ChainUsage::ServerAuth, cert.leaf(), &[]),
            ChainKey::new(ChainUsage::ServerAuth, cert.leaf(), &[])
        );
        assert_ne!(
            ChainKey::new(ChainUsage::ServerAuth, cert.leaf(), &[]),
            ChainKey::new(ChainUsage::ClientAuth, cert.leaf(), &[])
        );
        // Moving a certificate between leaf and intermediates changes the key.
        let other = issue(&ca, "other", now);
        assert_ne!(
            ChainKey::new(
                ChainUsage::ServerAuth,
                cert.leaf(),
                std::slice::from_ref(other.leaf())
            ),
            ChainKey::new(
                ChainUsage::ServerAuth,
                other.leaf(),
                std::slice::from_ref(cert.leaf())
            )
        );
    }

    #[test]
    fn the_verified_chain_cache_is_bounded() {
        crate::identity::install_crypto_provider();
        let ca = LocalCa::generate().expect("CA");
        let now = SystemTime::now();
        let chains = VerifiedChains::new(2, ChainCacheCounters::default());
        let certs: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|sa| issue(&ca, sa, now))
            .collect();
        for cert in &certs {
            let got = chains.verify(ChainUsage::ServerAuth, cert.leaf(), &[], at(now), || Ok(()));
            assert_eq!(got, Ok(cert.identity.clone()));
        }
        assert_eq!(chains.len(), 2);
        let last = &certs[2];
        let got = chains.verify(ChainUsage::ServerAuth, last.leaf(), &[], at(now), || {
            Err(Error::General(
                "must not run: the newest chain is cached".into(),
            ))
        });
        assert_eq!(got, Ok(last.identity.clone()));
    }

    #[test]
    fn only_a_chain_that_passed_a_full_verification_has_a_recorded_identity() {
        crate::identity::install_crypto_provider();
        let ca = LocalCa::generate().expect("CA");
        let now = SystemTime::now();
        let cert = issue(&ca, "client", now);
        let chains = VerifiedChains::new(8, ChainCacheCounters::default());
        let recorded = |usage| chains.recorded_identity(usage, cert.leaf(), &cert.chain[1..]);

        assert_eq!(recorded(ChainUsage::ClientAuth), None, "never verified");
        let refused = chains.verify(
            ChainUsage::ClientAuth,
            cert.leaf(),
            &cert.chain[1..],
            at(now),
            || Err(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
        );
        assert!(refused.is_err());
        assert_eq!(recorded(ChainUsage::ClientAuth), None, "refused");
        assert_eq!((chains.hits(), chains.misses()), (0, 1));

        let accepted = chains.verify(
            ChainUsage::ClientAuth,
            cert.leaf(),
            &cert.chain[1..],
            at(now),
            || Ok(()),
        );
        assert_eq!(accepted, Ok(id("client")));
        assert_eq!(recorded(ChainUsage::ClientAuth), Some(id("client")));
        assert_eq!(
            recorded(ChainUsage::ServerAuth),
            None,
            "verified for the other usage"
        );
        assert_eq!(
            (chains.hits(), chains.misses()),
            (0, 2),
            "a lookup is no verification"
        );
    }

    /// Both ends of real handshakes, each with its own configuration cache (as the inbound
    /// and outbound sides have) and the agent's metrics: the first handshake verifies both
    /// chains in full, the second takes both from the cache; the server side reads the
    /// client's identity from what its verifier recorded.
    #[tokio::test]
    async fn a_second_handshake_with_the_same_chain_counts_a_hit() {
        crate::identity::install_crypto_provider();
        let ca = LocalCa::generate().expect("CA");
        let now = SystemTime::now();
        let server = issue(&ca, "server", now);
        let client = issue(&ca, "client", now);
        let bundle = ca.trust_bundle();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = crate::tunnel::Metrics::new(&mut registry);
        let servers = ConfigCache::<ServerConfig>::with_chain_counters(metrics.verified_chains());
        let clients = ConfigCache::<ClientConfig>::with_chain_counters(metrics.verified_chains());
        let counted = || {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("{name} missing in {text}"))
            };
            (
                value("ambit_tls_verified_chain_cache_hits_total"),
                value("ambit_tls_verified_chain_cache_misses_total"),
            )
        };
        assert_eq!(counted(), (0, 0));

        for round in 1..=2u64 {
            let (server_config, anchors) = servers
                .get_or_build("server".into(), &server, &bundle, |anchors| {
                    server_config_for(&server, anchors, "cluster.local")
                })
                .expect("server config");
            let (client_config, _) = clients
                .get_or_build("client -> server".into(), &client, &bundle, |anchors| {
                    client_config_for(&client, anchors, &id("server"))
                })
                .expect("client config");
            let (a, b) = tokio::io::duplex(64 * 1024);
            let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let (connected, accepted) = tokio::join!(
                tokio_rustls::TlsConnector::from(client_config).connect(name, a),
                tokio_rustls::TlsAcceptor::from(server_config).accept(b),
            );
            connected.expect("client handshake");
            let accepted = accepted.expect("server handshake");
            let certs = accepted.get_ref().1.peer_certificates();
            let recorded = certs
                .and_then(|c| c.split_first())
                .and_then(|(leaf, rest)| {
                    anchors
                        .chains
                        .recorded_identity(ChainUsage::ClientAuth, leaf, rest)
                });
            assert_eq!(recorded, Some(id("client")), "recorded by the verifier");
            assert_eq!(anchors.verified_client_identity(certs), Some(id("client")));
            let expected = if round == 1 { (0, 2) } else { (2, 2) };
            assert_eq!(
                counted(),
                expected,
                "(hits, misses) after handshake {round}"
            );
        }
    }

    /// The chain being cached does not excuse the handshake's CertificateVerify: a client
    /// presenting a known-good chain without its private key is refused.
    #[tokio::test]
    async fn a_cached_chain_without_its_key_is_refused() {
        crate::identity::install_crypto_provider();
        let ca = LocalCa::generate().expect("CA");
        let now = SystemTime::now();
        let server = issue(&ca, "server", now);
        let client = issue(&ca, "client", now);
        let impostor = issue(&ca, "impostor", now);
        let anchors = TrustAnchors::new(&ca.trust_bundle()).expect("anchors");
        let server_config =
            Arc::new(server_config_for(&server, &anchors, "cluster.local").expect("config"));

        async fn handshake(
            client: ClientConfig,
            server: Arc<ServerConfig>,
        ) -> Result<(), std::io::Error> {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let (_, accepted) = tokio::join!(
                tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, a),
                tokio_rustls::TlsAcceptor::from(server).accept(b),
            );
            accepted.map(|_| ())
        }

        let genuine = client_config_for(&client, &anchors, &id("server")).expect("config");
        handshake(genuine, server_config.clone())
            .await
            .expect("the genuine client is accepted");
        let hits = anchors.chains.hits();

        // The client's chain, signed for with the impostor's key.
        let wrong_key = provider()
            .key_provider
            .load_private_key(impostor.key.clone_key())
            .expect("key");
        let stolen = Arc::new(rustls::sign::CertifiedKey::new(
            client.chain.clone(),
            wrong_key,
        ));
        let forged = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(server_verifier(&anchors, "server")))
            .with_client_cert_resolver(Arc::new(SingleCert(stolen)));
        let mut forged = forged;
        forged.alpn_protocols = vec![ALPN_H2.to_vec()];
        let refused = handshake(forged, server_config)
            .await
            .expect_err("the stolen chain is refused");
        let tls = refused
            .get_ref()
            .and_then(|e| e.downcast_ref::<Error>())
            .expect("a TLS error");
        assert!(
            matches!(
                tls,
                Error::InvalidCertificate(CertificateError::BadSignature)
            ),
            "refused for its signature, got {tls:?}"
        );
        assert!(
            anchors.chains.hits() >= hits + 2,
            "the server chain on the client and the client chain on the server were cache hits"
        );
    }
}
