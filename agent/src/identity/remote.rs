//! [`RemoteCa`]: certificates from a CA service speaking Istio's
//! `IstioCertificateService` (ambit's own `ambit ca`, or istiod on port 15012).
//!
//! The agent generates each key pair itself ([`generate_csr`]); only the CSR travels. It
//! authenticates with its projected service-account token (re-read for every request,
//! because the kubelet rotates it) and names the workload it asks for in the
//! `ImpersonatedIdentity` metadata, as ztunnel does. A returned leaf whose SAN is not the
//! requested identity, or that does not match the generated key or chain to the returned
//! roots, is refused.
//!
//! One request per identity at a time is the [`CertManager`](super::CertManager)'s job
//! (single flight per identity); this client does no caching of its own. The gRPC channel
//! reconnects by itself, so a CA that comes back needs no agent restart.
//!
//! The trust file (the ConfigMap `ambit-root`, which the kubelet updates by swapping the
//! `..data` symlink) is polled for changes: new roots replace the channel, so a root
//! rotation needs no agent restart either; a malformed file keeps the trust in force.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::BoxFuture;
use prost_types::value::Kind;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{
    CertificateAuthority, IdentityError, Result, SpiffeId, TrustBundle, WorkloadCertificate,
    generate_csr,
};
use crate::ca::proto::IstioCertificateRequest;
use crate::ca::proto::istio_certificate_service_client::IstioCertificateServiceClient;

/// Metadata key naming the identity a node agent asks for (Istio's name).
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// gRPC trailer in which `ambit ca` names the refusal reason.
const REASON_METADATA: &str = "ambit-ca-reason";

/// How to reach the CA. The lead's flags map onto it one to one: `--ca-address`,
/// `--ca-token-file`, `--ca-trust-file`, `--ca-extra-bundle-file`, `--cluster-id`.
/// Serialized for the config dump: the token file's path, never the token (it is re-read
/// for every request and held nowhere in here).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteCaConfig {
    /// `https://host:port`, e.g. `https://ambit-ca.ambit-system.svc:15012` or
    /// `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// Projected service-account token (audience `ambit-ca`, or `istio-ca` for istiod).
    #[serde(serialize_with = "crate::observability::readable::path")]
    pub token_file: PathBuf,
    /// PEM roots the CA's serving certificate must chain to.
    #[serde(serialize_with = "crate::observability::readable::path")]
    pub trust_file: PathBuf,
    /// Extra PEM roots added to the mesh trust bundle (read once, at construction).
    #[serde(serialize_with = "crate::observability::readable::option_path")]
    pub extra_bundle_file: Option<PathBuf>,
    /// Sent as the `clusterid` header when set: istiod uses it to pick the cluster whose
    /// API server reviews the token.
    pub cluster_id: Option<String>,
    /// Name to verify the serving certificate against when it is not the address's host
    /// (e.g. when dialing an IP).
    pub tls_server_name: Option<String>,
    /// Deadline for connecting.
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub connect_timeout: Duration,
    /// Deadline for one request (connect included).
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub request_timeout: Duration,
    /// How often the trust file is read for changes; zero: never (read once).
    pub trust_reload_interval: Duration,
}

/// What one look at the trust file found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustReload {
    /// Same bytes as last time (or as the last rejected content).
    Unchanged,
    /// New roots, now used for every new connection to the CA.
    Reloaded { roots: usize },
    /// Unusable; the trust in force is kept. The error names the file and the fault.
    Rejected(String),
}

impl RemoteCaConfig {
    /// The required settings, with 5 s to connect and 15 s per request.
    pub fn new(
        address: impl Into<String>,
        token_file: impl Into<PathBuf>,
        trust_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            address: address.into(),
            token_file: token_file.into(),
            trust_file: trust_file.into(),
            extra_bundle_file: None,
            cluster_id: None,
            tls_server_name: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            trust_reload_interval: Duration::from_secs(5),
        }
    }
}

/// A remote CA behind the [`CertificateAuthority`] trait.
pub struct RemoteCa {
    channel: Arc<CaChannel>,
    token_file: PathBuf,
    cluster_id: Option<tonic::metadata::AsciiMetadataValue>,
    extra_roots: Vec<CertificateDer<'static>>,
    /// The roots from the latest response plus the extra roots, built once per response
    /// that brings roots. Swapped, never locked: the connection path that reads the bundle
    /// never waits on the issuance that replaces it (nor copies it).
    bundle: arc_swap::ArcSwap<TrustBundle>,
}

/// The gRPC client and what rebuilding it for new trust takes. Shared with the task that
/// polls the trust file (through a `Weak`, so the task ends with the `RemoteCa`).
struct CaChannel {
    settings: ChannelSettings,
    trust_file: PathBuf,
    /// Swapped whole when the trust changes; held only to clone or swap.
    client: RwLock<IstioCertificateServiceClient<Channel>>,
    /// The trust file's bytes last looked at (accepted or not) and the last read error, so
    /// each fault is logged once. Only the reload touches it.
    seen: Mutex<(Vec<u8>, Option<String>)>,
}

/// How to connect, apart from the trust.
struct ChannelSettings {
    uri: http::Uri,
    tls_server_name: Option<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl ChannelSettings {
    fn client(&self, trust_pem: &[u8]) -> Result<IstioCertificateServiceClient<Channel>> {
        let ca_error = |what: String| IdentityError::Ca(what);
        // Parsed here so a bad file is named now, not as a TLS failure later.
        TrustBundle::from_pem(trust_pem)?.root_store()?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(trust_pem));
        if let Some(name) = &self.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        let endpoint = Endpoint::from(self.uri.clone())
            .tls_config(tls)
            .map_err(|e| ca_error(format!("CA TLS configuration: {e}")))?
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        Ok(IstioCertificateServiceClient::new(endpoint.connect_lazy()))
    }
}

impl CaChannel {
    fn current(&self) -> IstioCertificateServiceClient<Channel> {
        self.client
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn reload(&self) -> TrustReload {
        let path = self.trust_file.display().to_string();
        let bytes = match tokio::fs::read(&self.trust_file).await {
            Ok(bytes) => bytes,
            Err(e) => {
                let error = format!("reading the CA trust file {path}: {e}");
                let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
                if seen.1.as_deref() != Some(error.as_str()) {
                    tracing::warn!(%error, "keeping the CA trust in force");
                    seen.1 = Some(error.clone());
                }
                return TrustReload::Rejected(error);
            }
        };
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            seen.1 = None;
            if seen.0 == bytes {
                return TrustReload::Unchanged;
            }
            seen.0.clone_from(&bytes);
        }
        // Parsing a few roots and building a lazy channel: cheap, no I/O.
        match self.settings.client(&bytes) {
            Ok(client) => {
                *self.client.write().unwrap_or_else(PoisonError::into_inner) = client;
                let roots = TrustBundle::from_pem(&bytes).map_or(0, |b| b.roots.len());
                tracing::info!(file = %path, roots, "the CA trust file changed; new connections to the CA use it");
                TrustReload::Reloaded { roots }
            }
            Err(e) => {
                let error = format!("the CA trust file {path} is unusable: {e}");
                tracing::warn!(%error, "keeping the CA trust in force");
                TrustReload::Rejected(error)
            }
        }
    }

    /// Polls the trust file until the `RemoteCa` is dropped.
    async fn poll(weak: Weak<CaChannel>, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate; the file was just read
        loop {
            ticks.tick().await;
            let Some(channel) = weak.upgrade() else {
                return;
            };
            channel.reload().await;
        }
    }
}

impl RemoteCa {
    /// Checks the configuration and reads the trust files; connects lazily, on the first
    /// request, so an unreachable CA does not stop the agent from starting. Inside a tokio
    /// runtime, starts polling the trust file every `trust_reload_interval`.
    pub fn new(config: RemoteCaConfig) -> Result<Self> {
        let ca_error = |what: String| IdentityError::Ca(what);
        let uri: http::Uri = config
            .address
            .parse()
            .map_err(|e| ca_error(format!("invalid CA address {:?}: {e}", config.address)))?;
        if uri.scheme_str() != Some("https") {
            return Err(ca_error(format!(
                "CA address {:?} must start with https://",
                config.address
            )));
        }
        let trust_pem = read(&config.trust_file)?;
        let settings = ChannelSettings {
            uri,
            tls_server_name: config.tls_server_name.clone(),
            connect_timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
        };
        let client = settings.client(&trust_pem)?;
        let channel = CaChannel {
            settings,
            trust_file: config.trust_file.clone(),
            client: RwLock::new(client),
            seen: Mutex::new((trust_pem, None)),
        };
        let channel = Arc::new(channel);
        if !config.trust_reload_interval.is_zero()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(CaChannel::poll(
                Arc::downgrade(&channel),
                config.trust_reload_interval,
            ));
        }
        let extra_roots = match &config.extra_bundle_file {
            Some(path) => TrustBundle::from_pem(&read(path)?)?.roots,
            None => Vec::new(),
        };
        let cluster_id = config
            .cluster_id
            .as_deref()
            .map(|id| {
                id.parse()
                    .map_err(|_| ca_error(format!("cluster ID {id:?} is not a valid header")))
            })
            .transpose()?;
        Ok(Self {
            channel,
            token_file: config.token_file,
            cluster_id,
            bundle: arc_swap::ArcSwap::from_pointee(bundle_with(&[], &extra_roots)),
            extra_roots,
        })
    }

    /// Reads the trust file now (the poll does this every `trust_reload_interval`): new
    /// roots are used for new connections to the CA; a malformed or unreadable file keeps
    /// the trust in force and is logged once.
    pub async fn reload_trust(&self) -> TrustReload {
        self.channel.reload().await
    }

    async fn request(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCertificate> {
        let (key, csr) = generate_csr(id)?;
        let token = read_token(&self.token_file).await?;
        let body = IstioCertificateRequest {
            csr: crate::ca::pem("CERTIFICATE REQUEST", &csr),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(prost_types::Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::StringValue(id.to_string())),
                    },
                )]),
            }),
        };
        let mut request = tonic::Request::new(body);
        // The error says nothing of the value: it is the token.
        let bearer = format!("Bearer {token}").parse().map_err(|_| {
            IdentityError::Ca(format!(
                "the token in {} is not a valid header value",
                self.token_file.display()
            ))
        })?;
        request.metadata_mut().insert("authorization", bearer);
        if let Some(cluster_id) = &self.cluster_id {
            request
                .metadata_mut()
                .insert("clusterid", cluster_id.clone());
        }
        let response = self
            .channel
            .current()
            .create_certificate(request)
            .await
            .map_err(refused)?
            .into_inner();

        let (chain, roots) = split_chain(&response.cert_chain)?;
        let cert = WorkloadCertificate::from_parts(chain, key)?;
        if cert.identity != *id {
            return Err(IdentityError::Ca(format!(
                "the CA returned a certificate for {}, not for the requested {id}",
                cert.identity
            )));
        }
        // The leaf must carry our key (not one the CA chose) ...
        cert.certified_key()?;
        // ... and chain to the roots that come with it (or to the extra bundle).
        let bundle = bundle_with(&roots, &self.extra_roots);
        verify_chain(&cert, &bundle)?;
        if !roots.is_empty() {
            self.bundle.store(Arc::new(bundle));
        }
        Ok(cert)
    }
}

/// The mesh bundle: the CA's `roots`, then the `extra` ones not already among them.
fn bundle_with(
    roots: &[CertificateDer<'static>],
    extra: &[CertificateDer<'static>],
) -> TrustBundle {
    let mut bundle = TrustBundle::new(roots.to_vec());
    bundle.extend(extra.iter().cloned());
    bundle
}

impl CertificateAuthority for RemoteCa {
    fn issue(
        &self,
        id: &SpiffeId,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<WorkloadCertificate, IdentityError>> {
        let id = id.clone();
        async move { self.request(&id, ttl).await }.boxed()
    }

    fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }
}

impl fmt::Debug for RemoteCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteCa")
            .field("token_file", &self.token_file)
            .field("cluster_id", &self.cluster_id)
            .field("extra_roots", &self.extra_roots.len())
            .finish_non_exhaustive()
    }
}

/// A gRPC failure as an [`IdentityError`], keeping the code and `ambit ca`'s reason.
fn refused(status: tonic::Status) -> IdentityError {
    let reason = status
        .metadata()
        .get(REASON_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    IdentityError::CaRefused {
        code: status.code(),
        reason,
        message: status.message().to_owned(),
    }
}

/// Splits Istio's `cert_chain` (leaf first, root last; any element may hold several PEM
/// certificates, e.g. the old and new root during a rotation) into the chain to serve
/// (leaf, intermediates) and the roots (the self-signed certificates).
fn split_chain(
    elements: &[String],
) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>)> {
    let mut certs = Vec::new();
    for element in elements {
        for cert in CertificateDer::pem_slice_iter(element.as_bytes()) {
            certs.push(cert.map_err(|e| IdentityError::Pem {
                what: "the CA's response".into(),
                reason: e.to_string(),
            })?);
        }
    }
    let mut certs = certs.into_iter();
    let leaf = certs.next().ok_or(IdentityError::EmptyChain)?;
    let mut chain = vec![leaf];
    let mut roots = Vec::new();
    for cert in certs {
        if is_self_signed(&cert)? {
            if !roots.contains(&cert) {
                roots.push(cert);
            }
        } else {
            chain.push(cert);
        }
    }
    Ok((chain, roots))
}

fn is_self_signed(cert: &CertificateDer<'_>) -> Result<bool> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::ParseCertificate(e.to_string()))?;
    Ok(parsed.subject().as_raw() == parsed.issuer().as_raw())
}

/// Verifies the new certificate the way peers will (client auth, chain to a root).
fn verify_chain(cert: &WorkloadCertificate, bundle: &TrustBundle) -> Result<()> {
    if bundle.roots.is_empty() {
        return Err(IdentityError::Ca(
            "the CA returned no root and no extra bundle is configured: nothing to verify \
             the certificate against"
                .into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(bundle.root_store()?),
        provider,
    )
    .build()
    .map_err(|e| IdentityError::Ca(format!("building a verifier: {e}")))?;
    // Checked at the certificate's own start, not now: the CA may backdate less than our
    // clock is ahead of it, and validity in time is the peers' check.
    let at = cert
        .not_before
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        + Duration::from_secs(1);
    verifier
        .verify_client_cert(
            &cert.chain[0],
            &cert.chain[1..],
            UnixTime::since_unix_epoch(at),
        )
        .map_err(|e| {
            IdentityError::Ca(format!(
                "the CA's certificate does not chain to its roots: {e}"
            ))
        })?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The token, read afresh (off the async threads): the kubelet rewrites the file as it
/// rotates the token.
async fn read_token(path: &Path) -> Result<String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(IdentityError::Ca(format!(
            "the token file {} is empty",
            path.display()
        )));
    }
    Ok(token.to_owned())
}
