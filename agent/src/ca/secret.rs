//! Where the CA key lives: a Kubernetes Secret, so that every replica signs with the same key
//! and the Deployment itself stays stateless.
//!
//! Like istiod: a user-provided intermediate in the `cacerts` Secret (`ca-cert.pem`,
//! `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`) wins; otherwise the CA's own Secret
//! (`ambit-ca`, keys `ca.crt`/`ca.key`) holds a self-signed root, created at first start.
//! Two replicas starting together both try to create it; the API server accepts one, the
//! other gets 409 Conflict and reads the winner's, so both sign with the same root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::CaError;
use crate::identity::LocalCa;

/// Keys of the CA's own Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
/// Keys of a user-provided (Istio-style) `cacerts` Secret.
pub const CACERTS_CA_CERT: &str = "ca-cert.pem";
pub const CACERTS_CA_KEY: &str = "ca-key.pem";
pub const CACERTS_CERT_CHAIN: &str = "cert-chain.pem";
pub const CACERTS_ROOT_CERT: &str = "root-cert.pem";

pub type SecretData = BTreeMap<String, Vec<u8>>;

/// What creating a Secret did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    Created,
    /// Someone else created it first (HTTP 409).
    AlreadyExists,
}

/// The Secrets of the CA's namespace. Implemented over kube-rs in production and in memory
/// in tests.
pub trait SecretStore: Send + Sync {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<SecretData>, CaError>>;
    fn create<'a>(
        &'a self,
        name: &'a str,
        data: SecretData,
    ) -> BoxFuture<'a, Result<Created, CaError>>;
}

/// Where the key came from, for the start-up log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaSource {
    /// The user's intermediate from the `cacerts` Secret.
    PluggedIn,
    /// The self-signed root this CA (or another replica) created earlier.
    Existing,
    /// A root created just now.
    Created,
}

/// Loads the signing CA: `cacerts_name` if that Secret exists, else `own_name`, created with
/// a fresh root if absent.
pub async fn load_or_bootstrap(
    store: &dyn SecretStore,
    cacerts_name: &str,
    own_name: &str,
) -> Result<(LocalCa, CaSource), CaError> {
    if let Some(data) = store.get(cacerts_name).await? {
        return Ok((from_cacerts(cacerts_name, &data)?, CaSource::PluggedIn));
    }
    if let Some(data) = store.get(own_name).await? {
        return Ok((from_own(own_name, &data)?, CaSource::Existing));
    }
    let (ca, cert_pem, key_pem) = LocalCa::generate_root_pem()?;
    let data = SecretData::from([
        (CA_CERT_KEY.to_owned(), cert_pem.into_bytes()),
        (CA_KEY_KEY.to_owned(), key_pem.into_bytes()),
    ]);
    match store.create(own_name, data).await? {
        Created::Created => Ok((ca, CaSource::Created)),
        Created::AlreadyExists => {
            // Lost the race: ours was never stored, so nothing was signed with it; use the
            // winner's.
            let data = store.get(own_name).await?.ok_or_else(|| {
                CaError::Secret(format!(
                    "Secret {own_name} was reported as existing but cannot be read"
                ))
            })?;
            Ok((from_own(own_name, &data)?, CaSource::Existing))
        }
    }
}

fn from_own(name: &str, data: &SecretData) -> Result<LocalCa, CaError> {
    let cert = field(name, data, CA_CERT_KEY)?;
    let key = field(name, data, CA_KEY_KEY)?;
    let certs = certificates(name, CA_CERT_KEY, cert)?;
    Ok(LocalCa::from_certs_and_key(
        certs,
        key,
        &source(name, CA_CERT_KEY),
        &source(name, CA_KEY_KEY),
    )?)
}

/// Istio's layout: the CA certificate, its key, the chain from it up to the root (which
/// may or may not repeat the CA certificate and the root) and the root. Assembled as
/// CA certificate, intermediates, root(s), each once.
fn from_cacerts(name: &str, data: &SecretData) -> Result<LocalCa, CaError> {
    let ca_cert = certificates(name, CACERTS_CA_CERT, field(name, data, CACERTS_CA_CERT)?)?;
    let key = field(name, data, CACERTS_CA_KEY)?;
    let root = certificates(
        name,
        CACERTS_ROOT_CERT,
        field(name, data, CACERTS_ROOT_CERT)?,
    )?;
    // An intermediate signed directly by the root may come without a chain file.
    let chain = match data.get(CACERTS_CERT_CHAIN) {
        Some(pem) => certificates(name, CACERTS_CERT_CHAIN, pem)?,
        None => Vec::new(),
    };
    let mut all: Vec<CertificateDer<'static>> = Vec::new();
    for cert in ca_cert.into_iter().take(1).chain(chain).chain(root) {
        if !all.contains(&cert) {
            all.push(cert);
        }
    }
    Ok(LocalCa::from_certs_and_key(
        all,
        key,
        &source(name, CACERTS_CA_CERT),
        &source(name, CACERTS_CA_KEY),
    )?)
}

fn field<'a>(name: &str, data: &'a SecretData, key: &str) -> Result<&'a [u8], CaError> {
    data.get(key)
        .map(Vec::as_slice)
        .ok_or_else(|| CaError::Secret(format!("Secret {name} has no key {key:?}")))
}

fn certificates(
    name: &str,
    key: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Secret(format!("Secret {name}, key {key}: {e}")))?;
    if certs.is_empty() {
        return Err(CaError::Secret(format!(
            "Secret {name}, key {key}: no PEM certificate"
        )));
    }
    Ok(certs)
}

/// Names a Secret key in errors that take a path.
fn source(name: &str, key: &str) -> PathBuf {
    Path::new("secret").join(name).join(key)
}

#[cfg(test)]
pub(crate) mod memory {
    use std::sync::{Arc, Mutex};

    use futures::FutureExt;

    use super::*;

    /// Secrets in a map. `race` holds every `get` until two callers wait in it, so both
    /// replicas of a test see "absent" before either creates.
    #[derive(Default)]
    pub struct MemorySecrets {
        pub secrets: Mutex<NamedSecrets>,
        pub race: Option<Arc<tokio::sync::Barrier>>,
        pub creates: Mutex<u32>,
    }

    pub type NamedSecrets = BTreeMap<String, SecretData>;

    impl SecretStore for MemorySecrets {
        fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<SecretData>, CaError>> {
            async move {
                let found = self.secrets.lock().unwrap().get(name).cloned();
                if found.is_none()
                    && let Some(race) = &self.race
                {
                    race.wait().await;
                }
                Ok(found)
            }
            .boxed()
        }

        fn create<'a>(
            &'a self,
            name: &'a str,
            data: SecretData,
        ) -> BoxFuture<'a, Result<Created, CaError>> {
            async move {
                *self.creates.lock().unwrap() += 1;
                let mut secrets = self.secrets.lock().unwrap();
                if secrets.contains_key(name) {
                    return Ok(Created::AlreadyExists);
                }
                secrets.insert(name.to_owned(), data);
                Ok(Created::Created)
            }
            .boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        PKCS_ECDSA_P256_SHA256,
    };

    use super::memory::MemorySecrets;
    use super::*;
    use crate::identity::{CertificateAuthority, DEFAULT_CERT_TTL, SpiffeId};

    #[tokio::test]
    async fn first_start_creates_a_root_and_later_starts_reuse_it() {
        let store = MemorySecrets::default();
        let (first, source) = load_or_bootstrap(&store, "cacerts", "ambit-ca")
            .await
            .unwrap();
        assert_eq!(source, CaSource::Created);
        let stored = store.secrets.lock().unwrap()["ambit-ca"].clone();
        assert!(stored.contains_key(CA_CERT_KEY) && stored.contains_key(CA_KEY_KEY));

        let (second, source) = load_or_bootstrap(&store, "cacerts", "ambit-ca")
            .await
            .unwrap();
        assert_eq!(source, CaSource::Existing);
        assert_eq!(first.trust_bundle(), second.trust_bundle());
        assert_eq!(*store.creates.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn two_replicas_racing_end_up_with_one_root() {
        let store = Arc::new(MemorySecrets {
            race: Some(Arc::new(tokio::sync::Barrier::new(2))),
            ..MemorySecrets::default()
        });
        // Each replica's first two gets (cacerts, ambit-ca) find nothing and meet at the
        // barrier, so both go on to create.
        let a = tokio::spawn({
            let store = store.clone();
            async move { load_or_bootstrap(store.as_ref(), "cacerts", "ambit-ca").await }
        });
        let b = tokio::spawn({
            let store = store.clone();
            async move { load_or_bootstrap(store.as_ref(), "cacerts", "ambit-ca").await }
        });
        let (a, a_source) = a.await.unwrap().unwrap();
        let (b, b_source) = b.await.unwrap().unwrap();
        assert_eq!(*store.creates.lock().unwrap(), 2, "both tried to create");
        let mut sources = [a_source, b_source];
        sources.sort_by_key(|s| *s as u8);
        assert_eq!(sources, [CaSource::Existing, CaSource::Created]);
        assert_eq!(a.trust_bundle(), b.trust_bundle());
        // And a leaf from one verifies against the other's bundle: same key.
        let id = SpiffeId::new("cluster.local", "a", "b").unwrap();
        let cert = a.issue(&id, DEFAULT_CERT_TTL).await.unwrap();
        assert!(
            b.trust_bundle()
                .roots
                .iter()
                .any(|root| root_signed(root, &cert.chain[0]))
        );
    }

    fn root_signed(root: &CertificateDer<'_>, leaf: &CertificateDer<'_>) -> bool {
        let (_, root) = x509_parser::parse_x509_certificate(root).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf).unwrap();
        leaf.verify_signature(Some(root.public_key())).is_ok()
    }

    fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(match path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params
    }

    #[tokio::test]
    async fn plugged_in_intermediate_wins_and_chains_to_its_root() {
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let root_params = ca_params("corp root", None);
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let int = ca_params("mesh intermediate", Some(0))
            .signed_by(&int_key, &root_issuer)
            .unwrap();

        let store = MemorySecrets::default();
        store.secrets.lock().unwrap().insert(
            "cacerts".into(),
            SecretData::from([
                (CACERTS_CA_CERT.into(), int.pem().into_bytes()),
                (CACERTS_CA_KEY.into(), int_key.serialize_pem().into_bytes()),
                // Istio's tools write the CA certificate and the root into the chain too.
                (
                    CACERTS_CERT_CHAIN.into(),
                    format!("{}{}", int.pem(), root.pem()).into_bytes(),
                ),
                (CACERTS_ROOT_CERT.into(), root.pem().into_bytes()),
            ]),
        );
        let (ca, source) = load_or_bootstrap(&store, "cacerts", "ambit-ca")
            .await
            .unwrap();
        assert_eq!(source, CaSource::PluggedIn);
        assert_eq!(*store.creates.lock().unwrap(), 0);
        assert_eq!(ca.trust_bundle().roots, vec![root.der().clone()]);
        let id = SpiffeId::new("cluster.local", "a", "b").unwrap();
        let cert = ca.issue(&id, DEFAULT_CERT_TTL).await.unwrap();
        // Leaf, then the intermediate; the root is not repeated in the chain.
        assert_eq!(cert.chain, vec![cert.chain[0].clone(), int.der().clone()]);
    }

    #[tokio::test]
    async fn broken_secrets_are_refused_with_the_key_named() {
        let store = MemorySecrets::default();
        store.secrets.lock().unwrap().insert(
            "ambit-ca".into(),
            SecretData::from([(CA_CERT_KEY.into(), b"junk".to_vec())]),
        );
        let err = load_or_bootstrap(&store, "cacerts", "ambit-ca")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
        // A mismatched key in the CA's own Secret is refused, not replaced.
        let (_, cert_a, _) = LocalCa::generate_root_pem().unwrap();
        let (_, _, key_b) = LocalCa::generate_root_pem().unwrap();
        store.secrets.lock().unwrap().insert(
            "ambit-ca".into(),
            SecretData::from([
                (CA_CERT_KEY.into(), cert_a.into_bytes()),
                (CA_KEY_KEY.into(), key_b.into_bytes()),
            ]),
        );
        let err = load_or_bootstrap(&store, "cacerts", "ambit-ca")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert_eq!(*store.creates.lock().unwrap(), 0);
    }
}
