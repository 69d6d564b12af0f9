//! Certificate authorities: the [`CertificateAuthority`] trait the manager
//! talks to, the [`TrustBundle`] peers are verified against, and [`LocalCa`],
//! the built-in CA for single-cluster and test setups.
//!
//! The split mirrors a remote CA: the agent generates the key pair and a CSR
//! ([`generate_csr`]); the CA only ever sees the CSR (public key plus the
//! requested identity) and returns a chain. [`LocalCa`] follows the same path
//! in-process so swapping in a remote CA changes nothing upstream.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};

use super::{IdentityError, Result, SpiffeId, WorkloadCertificate};

/// Default lifetime of workload certificates. Short enough that a leaked key
/// is useful only briefly (there is no revocation), long enough that a CA
/// outage of several hours goes unnoticed thanks to half-life renewal.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How far `not_before` is set into the past. Node clocks drift apart; a peer
/// whose clock runs a little behind ours would otherwise reject a freshly
/// issued certificate as "not yet valid" for the first seconds or minutes.
pub const CLOCK_SKEW_BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Lifetime of a root created by [`LocalCa::generate`]. Long, because rotating
/// it means distributing a new bundle to every node.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

const CA_CERT_FILE: &str = "ca-cert.pem";
const CA_KEY_FILE: &str = "ca-key.pem";

/// Signs workload certificates. Implemented by [`LocalCa`]; a remote CA
/// (CSR over the network) implements the same trait.
pub trait CertificateAuthority: Send + Sync {
    /// Obtains a fresh certificate for `id`, valid for about `ttl` from now.
    fn issue(
        &self,
        id: &SpiffeId,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<WorkloadCertificate, IdentityError>>;

    /// Roots that certificates issued by this CA (and older CAs still
    /// trusted during a rotation) chain up to. Shared rather than copied: every new HBONE
    /// connection asks for it.
    fn trust_bundle(&self) -> Arc<TrustBundle>;
}

/// The set of root certificates peers are verified against. Several roots
/// may be present at once: during a root rotation, certificates from both the
/// old and the new root must verify.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct TrustBundle {
    pub roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Self {
        Self { roots }
    }

    /// Parses every `CERTIFICATE` block in `pem`; other blocks are skipped.
    pub fn from_pem(pem: &[u8]) -> Result<Self> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| pem_error("trust bundle", e))?;
        if roots.is_empty() {
            return Err(IdentityError::Pem {
                what: "trust bundle".into(),
                reason: "no certificates found".into(),
            });
        }
        Ok(Self { roots })
    }

    /// A rustls root store holding every root. Fails on the first root rustls
    /// cannot use rather than silently trusting fewer roots than configured.
    pub fn root_store(&self) -> Result<RootCertStore> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store.add(root.clone())?;
        }
        Ok(store)
    }

    /// Adds roots not already present (keeps order, avoids duplicates).
    pub fn extend(&mut self, roots: impl IntoIterator<Item = CertificateDer<'static>>) {
        for root in roots {
            if !self.roots.contains(&root) {
                self.roots.push(root);
            }
        }
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// Agent side of issuance: a fresh ECDSA P-256 key and a CSR for `id` signed
/// with it. The key never leaves the agent; only the CSR goes to the CA.
pub fn generate_csr(
    id: &SpiffeId,
) -> Result<(
    PrivateKeyDer<'static>,
    CertificateSigningRequestDer<'static>,
)> {
    // P-256: what every TLS stack accelerates and what Istio/ztunnel use.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    // The identity lives in the URI SAN only; the subject stays empty.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![uri_san(id)?];
    let csr = params.serialize_request(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((key_der, csr.into()))
}

fn uri_san(id: &SpiffeId) -> Result<SanType> {
    Ok(SanType::URI(id.to_string().try_into()?))
}

/// The built-in CA: an rcgen issuer held in memory.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// Appended after the leaf in every issued chain: the CA's own
    /// certificate when it is an intermediate, plus any further
    /// intermediates. Empty when the CA is itself a root.
    chain_tail: Vec<CertificateDer<'static>>,
    bundle: Arc<TrustBundle>,
}

impl LocalCa {
    /// A new in-memory CA with a fresh self-signed ECDSA P-256 root.
    /// Used by tests (including "certificate from another CA") and by
    /// [`LocalCa::load_or_create`].
    pub fn generate() -> Result<Self> {
        let (ca, _key_pem, _cert_pem) = Self::generate_with_pem()?;
        Ok(ca)
    }

    fn generate_with_pem() -> Result<(Self, String, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ambit");
        dn.push(DnType::CommonName, "ambit local CA");
        params.distinguished_name = dn;
        // Path length 0: this root signs workload leaves directly; nobody
        // can mint an intermediate from a leaf or from this root.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - CLOCK_SKEW_BACKDATE).into();
        params.not_after = (now + ROOT_TTL).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        let ca = Self {
            issuer: Issuer::new(params, key),
            chain_tail: Vec::new(),
            bundle: Arc::new(TrustBundle::new(vec![cert.der().clone()])),
        };
        Ok((ca, key_pem, cert_pem))
    }

    /// Loads a CA from PEM files. `cert_pem_path` holds the CA certificate
    /// first, optionally followed by its issuers; self-signed certificates in
    /// it become the trust bundle, the others are sent along with leaves.
    pub fn load(cert_pem_path: impl AsRef<Path>, key_pem_path: impl AsRef<Path>) -> Result<Self> {
        let cert_path = cert_pem_path.as_ref();
        let key_path = key_pem_path.as_ref();
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;

        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| pem_error(&cert_path.display().to_string(), e))?;
        Self::from_certs_and_key(certs, &key_pem, cert_path, key_path)
    }

    /// Builds a CA from its certificate (first), its issuers up to and including the
    /// root(s), and its PEM key. `cert_source` and `key_source` name where they came from
    /// (a file, a Secret) in errors.
    pub fn from_certs_and_key(
        certs: Vec<CertificateDer<'static>>,
        key_pem: &[u8],
        cert_source: &Path,
        key_source: &Path,
    ) -> Result<Self> {
        let Some(ca_cert) = certs.first().cloned() else {
            return Err(ca_state(cert_source, "no certificate found"));
        };
        let key_str = std::str::from_utf8(key_pem)
            .map_err(|_| ca_state(key_source, "key is not valid UTF-8 PEM"))?;
        let key = KeyPair::from_pem(key_str)?;

        // A mismatched pair would issue leaves nobody can verify; fail now.
        let (_, parsed) = x509_parser::parse_x509_certificate(&ca_cert)
            .map_err(|e| IdentityError::ParseCertificate(e.to_string()))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(ca_state(
                key_source,
                "key does not match the CA certificate",
            ));
        }

        let mut chain_tail = Vec::new();
        let mut roots = Vec::new();
        for cert in &certs {
            if is_self_signed(cert)? {
                roots.push(cert.clone());
            } else {
                chain_tail.push(cert.clone());
            }
        }
        if roots.is_empty() {
            return Err(ca_state(
                cert_source,
                "no self-signed root found; append the root after the CA certificate",
            ));
        }
        Ok(Self {
            issuer: Issuer::from_ca_cert_der(&ca_cert, key)?,
            chain_tail,
            bundle: Arc::new(TrustBundle::new(roots)),
        })
    }

    /// A fresh self-signed root, with its certificate and key as PEM (certificate, key) for
    /// whoever stores it (the `ambit ca` Secret).
    pub fn generate_root_pem() -> Result<(Self, String, String)> {
        let (ca, key_pem, cert_pem) = Self::generate_with_pem()?;
        Ok((ca, cert_pem, key_pem))
    }

    /// Loads the CA from `state_dir`, creating a self-signed root there on
    /// first start so restarts keep the same root (and existing certificates
    /// stay valid). The key file is created with mode 0600.
    pub fn load_or_create(state_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = state_dir.as_ref();
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => return Self::load(&cert_path, &key_path),
            // The certificate may already be trusted by peers; regenerating
            // the key would silently split the mesh. Make an operator decide.
            (true, false) => {
                return Err(ca_state(
                    dir,
                    "ca-cert.pem exists without ca-key.pem; restore the key or remove both",
                ));
            }
            // The certificate is written last, so a lone key is a creation
            // that was interrupted before anything could trust it: redo it.
            (false, true) | (false, false) => {}
        }
        fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
        let (ca, key_pem, cert_pem) = Self::generate_with_pem()?;
        write_atomically(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomically(&cert_path, cert_pem.as_bytes(), 0o644)?;
        tracing::info!(dir = %dir.display(), "created new local CA root");
        Ok(ca)
    }

    /// Adds older (or other) roots to the trust bundle, e.g. the previous
    /// root while certificates it issued are still in use.
    pub fn with_extra_roots(
        mut self,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Self {
        Arc::make_mut(&mut self.bundle).extend(roots);
        self
    }

    /// Issues a certificate with an explicit validity window, following the
    /// same agent-side-key + CSR path as [`CertificateAuthority::issue`].
    ///
    /// Meant for tests that need certificates normal issuance never yields,
    /// e.g. an already expired one (`not_after` in the past) or one not yet
    /// valid. No backdating is applied here.
    pub fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate> {
        let (key, csr) = generate_csr(id)?;
        let chain = self.sign_csr(&csr, id, not_before, not_after)?;
        WorkloadCertificate::from_parts(chain, key)
    }

    /// CA side of issuance: signs the public key in `csr` for `id`, which
    /// the caller has already authorised. Returns the chain, leaf first.
    ///
    /// Only the CSR's public key is used; every other property of the leaf
    /// is set here, so a crafted CSR cannot ask for CA rights or extra names.
    pub fn sign_csr(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>> {
        if not_after <= not_before {
            return Err(IdentityError::InvalidValidity(
                "not_after must be later than not_before".into(),
            ));
        }
        // Parsing also checks the CSR's self-signature, i.e. that the
        // requester holds the private key.
        let request = CertificateSigningRequestParams::from_der(csr)
            .map_err(|e| IdentityError::CsrRejected(e.to_string()))?;
        let expected = uri_san(id)?;
        if request.params.subject_alt_names != [expected] {
            return Err(IdentityError::CsrRejected(format!(
                "CSR must request exactly the URI SAN {id}"
            )));
        }
        if *request.public_key.algorithm() != PKCS_ECDSA_P256_SHA256 {
            return Err(IdentityError::CsrRejected(
                "only ECDSA P-256 keys are accepted".into(),
            ));
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![uri_san(id)?];
        params.is_ca = IsCa::ExplicitNoCa;
        // keyEncipherment is left out: it only applies to RSA key transport,
        // which TLS 1.3 does not have and an ECDSA key cannot do anyway.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Both: every workload is a server for inbound and a client for
        // outbound HBONE connections with the same certificate.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&request.public_key, &self.issuer)?;

        let mut chain = Vec::with_capacity(1 + self.chain_tail.len());
        chain.push(leaf.into());
        chain.extend(self.chain_tail.iter().cloned());
        Ok(chain)
    }
}

impl LocalCa {
    /// A TLS server certificate for `dns_names`, signed by this CA, with a fresh key:
    /// the `ambit ca` service presents it so agents can verify it against the mesh root.
    /// Returns the chain (leaf first, no root) and the key.
    pub fn issue_serving_certificate(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        if dns_names.is_empty() {
            return Err(IdentityError::Ca(
                "a serving certificate needs at least one DNS name".into(),
            ));
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = (now - CLOCK_SKEW_BACKDATE).into();
        params.not_after = (now + ttl).into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let mut chain = Vec::with_capacity(1 + self.chain_tail.len());
        chain.push(leaf.into());
        chain.extend(self.chain_tail.iter().cloned());
        Ok((chain, PrivateKeyDer::Pkcs8(key.serialize_der().into())))
    }
}

impl CertificateAuthority for LocalCa {
    fn issue(
        &self,
        id: &SpiffeId,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<WorkloadCertificate, IdentityError>> {
        // Done synchronously: P-256 key generation and signing take tens of
        // microseconds, less than handing the work to a blocking thread.
        let now = SystemTime::now();
        let result = if ttl.is_zero() {
            Err(IdentityError::InvalidValidity(
                "ttl must not be zero".into(),
            ))
        } else {
            self.issue_with_validity(id, now - CLOCK_SKEW_BACKDATE, now + ttl)
        };
        futures::future::ready(result).boxed()
    }

    fn trust_bundle(&self) -> Arc<TrustBundle> {
        Arc::clone(&self.bundle)
    }
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("chain_tail", &self.chain_tail.len())
            .field("bundle", &self.bundle)
            .finish_non_exhaustive()
    }
}

/// 16 random bytes with the top bit cleared: positive as DER requires and
/// well under the 20-octet limit, with enough entropy that serials never
/// collide across restarts or nodes.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    // A leading zero byte would be dropped by the DER encoder and make the
    // printed serial differ from the encoded one; avoid it.
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn is_self_signed(cert: &CertificateDer<'_>) -> Result<bool> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::ParseCertificate(e.to_string()))?;
    Ok(parsed.subject().as_raw() == parsed.issuer().as_raw())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| io_error(path, source))
}

/// Writes via a temporary file and rename so a crash never leaves a
/// truncated key or certificate behind.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("pem.tmp");
    // A leftover temporary file would keep its old mode on reopen.
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|source| io_error(&tmp, source))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| io_error(&tmp, source))?;
    fs::rename(&tmp, path).map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn ca_state(path: &Path, reason: &str) -> IdentityError {
    IdentityError::CaState {
        path: PathBuf::from(path),
        reason: reason.to_owned(),
    }
}

fn pem_error(what: &str, e: rustls_pki_types::pem::Error) -> IdentityError {
    IdentityError::Pem {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::server::WebPkiClientVerifier;
    use rustls::{CertificateError, Error as TlsError};
    use rustls_pki_types::UnixTime;
    use x509_parser::extensions::ParsedExtension;

    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    /// Verifies `cert` as a TLS client certificate against `bundle`, which
    /// exercises chain building, validity and the clientAuth EKU.
    fn verify(
        bundle: &TrustBundle,
        cert: &WorkloadCertificate,
    ) -> std::result::Result<(), TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(bundle.root_store().unwrap()),
            provider,
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&cert.chain[0], &cert.chain[1..], UnixTime::now())
            .map(|_| ())
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ambit-identity-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn issued_leaf_has_the_expected_shape() {
        let ca = LocalCa::generate().unwrap();
        let before = SystemTime::now();
        let cert = ca.issue(&id("web"), DEFAULT_CERT_TTL).await.unwrap();
        assert_eq!(cert.chain.len(), 1);
        verify(&ca.trust_bundle(), &cert).unwrap();
        cert.certified_key().unwrap();

        // Backdated by about the skew allowance; expires after about ttl.
        let backdate = before.duration_since(cert.not_before).unwrap();
        assert!(
            backdate >= CLOCK_SKEW_BACKDATE - Duration::from_secs(2),
            "{backdate:?}"
        );
        assert!(
            backdate <= CLOCK_SKEW_BACKDATE + Duration::from_secs(2),
            "{backdate:?}"
        );
        let ttl = cert.not_after.duration_since(before).unwrap();
        assert!(
            ttl.abs_diff(DEFAULT_CERT_TTL) <= Duration::from_secs(2),
            "{ttl:?}"
        );

        let (_, x509) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
        assert!(
            x509.subject().as_raw().len() <= 2,
            "subject should be empty"
        );
        let mut saw = (false, false, false, false);
        for ext in x509.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    assert_eq!(san.general_names.len(), 1);
                    // Required by RFC 5280 when the subject is empty.
                    assert!(ext.critical);
                    saw.0 = true;
                }
                ParsedExtension::KeyUsage(ku) => {
                    assert!(ku.digital_signature() && !ku.key_cert_sign());
                    saw.1 = true;
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    assert!(eku.server_auth && eku.client_auth);
                    saw.2 = true;
                }
                ParsedExtension::BasicConstraints(bc) => {
                    assert!(!bc.ca);
                    saw.3 = true;
                }
                _ => {}
            }
        }
        assert_eq!(saw, (true, true, true, true));
    }

    #[tokio::test]
    async fn serials_are_random_and_zero_ttl_is_refused() {
        let ca = LocalCa::generate().unwrap();
        let a = ca.issue(&id("a"), DEFAULT_CERT_TTL).await.unwrap();
        let b = ca.issue(&id("a"), DEFAULT_CERT_TTL).await.unwrap();
        assert_ne!(a.serial, b.serial);
        assert_eq!(a.serial.len(), 32);
        assert!(matches!(
            ca.issue(&id("a"), Duration::ZERO).await,
            Err(IdentityError::InvalidValidity(_))
        ));
    }

    #[test]
    fn expired_and_foreign_certificates_fail_verification() {
        let ca = LocalCa::generate().unwrap();
        let other = LocalCa::generate().unwrap();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);

        let expired = ca
            .issue_with_validity(&id("a"), now - 2 * hour, now - hour)
            .unwrap();
        assert!(matches!(
            verify(&ca.trust_bundle(), &expired),
            Err(TlsError::InvalidCertificate(CertificateError::Expired))
                | Err(TlsError::InvalidCertificate(
                    CertificateError::ExpiredContext { .. }
                ))
        ));

        let foreign = other
            .issue_with_validity(&id("a"), now, now + hour)
            .unwrap();
        // Both CAs share a subject name, so webpki finds a candidate issuer
        // and fails on its signature; either way the chain is refused.
        let err = verify(&ca.trust_bundle(), &foreign).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                )
            ),
            "{err:?}"
        );

        assert!(matches!(
            ca.issue_with_validity(&id("a"), now, now),
            Err(IdentityError::InvalidValidity(_))
        ));
    }

    #[test]
    fn extra_roots_keep_old_certificates_valid() {
        let old = LocalCa::generate().unwrap();
        let new = LocalCa::generate()
            .unwrap()
            .with_extra_roots(old.trust_bundle().roots.clone());
        let bundle = new.trust_bundle();
        assert_eq!(bundle.roots.len(), 2);
        assert_eq!(bundle.root_store().unwrap().len(), 2);
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        verify(
            &bundle,
            &old.issue_with_validity(&id("a"), now, now + hour).unwrap(),
        )
        .unwrap();
        verify(
            &bundle,
            &new.issue_with_validity(&id("a"), now, now + hour).unwrap(),
        )
        .unwrap();
        // Adding the same root again does not duplicate it.
        let again = new.with_extra_roots(old.trust_bundle().roots.clone());
        assert_eq!(again.trust_bundle().roots.len(), 2);
    }

    #[test]
    fn trust_bundle_from_pem_reads_many_certificates() {
        let dir = tempdir("bundle");
        let mut pem = String::new();
        for name in ["a", "b", "c"] {
            let sub = dir.join(name);
            LocalCa::load_or_create(&sub).unwrap();
            pem.push_str(&fs::read_to_string(sub.join(CA_CERT_FILE)).unwrap());
        }
        let bundle = TrustBundle::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(bundle.roots.len(), 3);
        assert_eq!(bundle.root_store().unwrap().len(), 3);
        assert!(TrustBundle::from_pem(b"").is_err());
        assert!(TrustBundle::from_pem(b"-----BEGIN CERTIFICATE-----\n!!!\n").is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn load_or_create_persists_the_root() {
        let dir = tempdir("persist");
        let first = LocalCa::load_or_create(&dir).unwrap();
        let mode = fs::metadata(dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = LocalCa::load_or_create(&dir).unwrap();
        assert_eq!(first.trust_bundle(), second.trust_bundle());
        // Certificates from the reloaded CA verify against the original root.
        let cert = second.issue(&id("a"), DEFAULT_CERT_TTL).await.unwrap();
        verify(&first.trust_bundle(), &cert).unwrap();

        // Lone key: interrupted creation, regenerated.
        fs::remove_file(dir.join(CA_CERT_FILE)).unwrap();
        let third = LocalCa::load_or_create(&dir).unwrap();
        assert_ne!(third.trust_bundle(), first.trust_bundle());
        // Lone certificate: refused.
        fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            LocalCa::load_or_create(&dir),
            Err(IdentityError::CaState { .. })
        ));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn load_rejects_a_key_that_does_not_match() {
        let dir = tempdir("mismatch");
        LocalCa::load_or_create(dir.join("a")).unwrap();
        LocalCa::load_or_create(dir.join("b")).unwrap();
        let err = LocalCa::load(
            dir.join("a").join(CA_CERT_FILE),
            dir.join("b").join(CA_KEY_FILE),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn intermediate_ca_sends_its_certificate_along() {
        // Root (unconstrained) -> intermediate; the intermediate is the CA.
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut root_params = CertificateParams::default();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        root_params
            .distinguished_name
            .push(DnType::CommonName, "test root");
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);

        let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut int_params = CertificateParams::default();
        int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        int_params
            .distinguished_name
            .push(DnType::CommonName, "test intermediate");
        int_params.use_authority_key_identifier_extension = true;
        let int = int_params.signed_by(&int_key, &root_issuer).unwrap();

        let dir = tempdir("intermediate");
        let (cert_path, key_path) = (dir.join("c.pem"), dir.join("k.pem"));
        fs::write(&cert_path, format!("{}{}", int.pem(), root.pem())).unwrap();
        fs::write(&key_path, int_key.serialize_pem()).unwrap();

        let ca = LocalCa::load(&cert_path, &key_path).unwrap();
        assert_eq!(ca.trust_bundle().roots, vec![root.der().clone()]);
        let cert = ca.issue(&id("a"), DEFAULT_CERT_TTL).await.unwrap();
        assert_eq!(cert.chain.len(), 2);
        assert_eq!(cert.chain[1], *int.der());
        verify(&ca.trust_bundle(), &cert).unwrap();
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sign_csr_only_signs_the_requested_identity() {
        let ca = LocalCa::generate().unwrap();
        let (_key, csr) = generate_csr(&id("a")).unwrap();
        let now = SystemTime::now();
        let later = now + Duration::from_secs(60);
        assert!(matches!(
            ca.sign_csr(&csr, &id("b"), now, later),
            Err(IdentityError::CsrRejected(_))
        ));
        let chain = ca.sign_csr(&csr, &id("a"), now, later).unwrap();
        assert_eq!(
            crate::identity::identity_from_cert(&chain[0]).unwrap(),
            id("a")
        );
        let garbage = CertificateSigningRequestDer::from(vec![1, 2, 3]);
        assert!(matches!(
            ca.sign_csr(&garbage, &id("a"), now, later),
            Err(IdentityError::CsrRejected(_))
        ));
    }
}
