//! The gRPC service: Istio's `IstioCertificateService/CreateCertificate` over TLS.
//!
//! One request: bearer token → TokenReview (through [`TokenReviewer`]) → [`authorize`] over
//! the pod index → sign the CSR's public key → chain (leaf first, root last). Every request
//! is counted by result and reason; denials are logged with node, caller and requested
//! identity, never with the token.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use prost_types::value::Kind;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::authz::{
    AuthzPolicy, CertificateRequest, IMPERSONATED_IDENTITY, PodIndex, Refusal, RefusalReason,
    ReviewedCaller, authorize,
};
use super::metrics::{CaMetrics, Outcome};
use super::proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use super::proto::{IstioCertificateRequest, IstioCertificateResponse};
use super::{CaError, pem};
use crate::identity::{CLOCK_SKEW_BACKDATE, LocalCa};

/// The gRPC trailer carrying the refusal reason's stable name, for clients that want more
/// than the status code (the message starts with it too).
pub const REASON_METADATA: &str = "ambit-ca-reason";
/// Longest a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one request may take, TokenReview included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the API server who a bearer token belongs to. Kube-backed in production
/// ([`super::kube::KubeTokenReviewer`]), a table in tests.
pub trait TokenReviewer: Send + Sync {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<ReviewedCaller, Refusal>>;
}

/// The certificate service; cheap to clone.
#[derive(Clone)]
pub struct CaService {
    inner: Arc<Inner>,
}

struct Inner {
    signer: Arc<LocalCa>,
    /// Every root of the CA's bundle, concatenated: the last element of each chain (during
    /// a root rotation it holds the old and the new root).
    roots_pem: String,
    reviewer: Arc<dyn TokenReviewer>,
    pods: Arc<dyn PodIndex>,
    policy: AuthzPolicy,
    metrics: CaMetrics,
}

impl CaService {
    pub fn new(
        signer: Arc<LocalCa>,
        reviewer: Arc<dyn TokenReviewer>,
        pods: Arc<dyn PodIndex>,
        policy: AuthzPolicy,
        metrics: CaMetrics,
    ) -> Self {
        let roots_pem = super::roots_pem(&signer);
        Self {
            inner: Arc::new(Inner {
                signer,
                roots_pem,
                reviewer,
                pods,
                policy,
                metrics,
            }),
        }
    }

    /// The tonic service to mount.
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }

    async fn handle(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Failure> {
        let token = bearer_token(request.metadata())?;
        let caller = self.inner.reviewer.review(token).await?;
        let body = request.into_inner();
        let impersonated = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            });
        let wanted = CertificateRequest {
            csr_pem: &body.csr,
            impersonated_identity: impersonated,
            validity_seconds: body.validity_duration,
        };
        let inner = &self.inner;
        let granted =
            authorize(&inner.policy, &caller, inner.pods.as_ref(), &wanted).map_err(|refusal| {
                // Without ImpersonatedIdentity the caller asked for its own identity.
                let requested = impersonated.filter(|s| !s.is_empty()).map_or_else(
                    || {
                        let sa = &caller.service_account;
                        let td = &inner.policy.trust_domain;
                        format!("spiffe://{td}/ns/{}/sa/{}", sa.namespace, sa.name)
                    },
                    str::to_owned,
                );
                Failure::Denied {
                    refusal,
                    caller: Some(caller.clone()),
                    requested: Some(requested),
                }
            })?;

        let now = SystemTime::now();
        let chain = inner
            .signer
            .sign_csr(
                &granted.csr,
                &granted.identity,
                now - CLOCK_SKEW_BACKDATE,
                now + granted.validity,
            )
            .map_err(|e| Failure::Signing(e.to_string()))?;
        let mut cert_chain: Vec<String> = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
        cert_chain.push(inner.roots_pem.clone());
        tracing::debug!(
            identity = %granted.identity,
            caller = %caller.service_account,
            node = granted.node.as_deref().unwrap_or(""),
            validity_secs = granted.validity.as_secs(),
            "issued certificate"
        );
        Ok(IstioCertificateResponse { cert_chain })
    }

    /// The node of the caller's pod, for denial logs; empty when unknown.
    fn caller_node(&self, caller: &ReviewedCaller) -> String {
        caller
            .pod_name
            .as_deref()
            .and_then(|name| self.inner.pods.pod(&caller.service_account.namespace, name))
            .and_then(|pod| pod.node)
            .unwrap_or_default()
    }
}

/// Why a request got no certificate.
enum Failure {
    Denied {
        refusal: Refusal,
        caller: Option<ReviewedCaller>,
        requested: Option<String>,
    },
    Signing(String),
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        Self::Denied {
            refusal,
            caller: None,
            requested: None,
        }
    }
}

fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<&str, Refusal> {
    let missing = |detail: &str| Refusal::new(RefusalReason::MissingToken, detail);
    let value = metadata
        .get("authorization")
        .ok_or_else(|| missing("no authorization header"))?
        .to_str()
        .map_err(|_| missing("authorization header is not ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| missing("authorization header is not `Bearer <token>`"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(missing("authorization header is not `Bearer <token>`"));
    }
    Ok(token)
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let started = Instant::now();
        let result = self.handle(request).await;
        let metrics = &self.inner.metrics;
        match result {
            Ok(response) => {
                metrics.record(Outcome::Issued, started.elapsed());
                Ok(tonic::Response::new(response))
            }
            Err(Failure::Denied {
                refusal,
                caller,
                requested,
            }) => {
                metrics.record(Outcome::Denied(refusal.reason), started.elapsed());
                let node = caller.as_ref().map(|c| self.caller_node(c));
                let caller_text = caller.as_ref().map(Caller).map(|c| c.to_string());
                tracing::warn!(
                    reason = refusal.reason.as_str(),
                    detail = %refusal.detail,
                    node = node.as_deref().unwrap_or(""),
                    caller = caller_text.as_deref().unwrap_or(""),
                    requested = requested.as_deref().unwrap_or(""),
                    "certificate request denied"
                );
                let mut status = tonic::Status::new(
                    refusal.reason.grpc_code(),
                    format!("{}: {}", refusal.reason, refusal.detail),
                );
                if let Ok(value) = refusal.reason.as_str().parse() {
                    status.metadata_mut().insert(REASON_METADATA, value);
                }
                Err(status)
            }
            Err(Failure::Signing(error)) => {
                metrics.record(Outcome::Error, started.elapsed());
                tracing::error!(%error, "signing an authorized request failed");
                Err(tonic::Status::internal("the CA failed to sign the request"))
            }
        }
    }
}

/// `namespace/service-account (pod name)` for logs.
struct Caller<'a>(&'a ReviewedCaller);

impl fmt::Display for Caller<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.service_account)?;
        if let Some(pod) = &self.0.pod_name {
            write!(f, " (pod {pod})")?;
        }
        Ok(())
    }
}

/// The CA's own TLS certificate, issued by the CA key for the configured DNS names and
/// re-issued in place once half its lifetime has passed, so a long-running replica never
/// serves an expired one.
pub struct ServingCert {
    ca: Arc<LocalCa>,
    dns_names: Vec<String>,
    ttl: Duration,
    current: RwLock<(Arc<CertifiedKey>, SystemTime)>,
}

impl ServingCert {
    pub fn new(ca: Arc<LocalCa>, dns_names: Vec<String>, ttl: Duration) -> Result<Self, CaError> {
        let current = issue_serving(&ca, &dns_names, ttl)?;
        Ok(Self {
            ca,
            dns_names,
            ttl,
            current: RwLock::new(current),
        })
    }

    pub(crate) fn current(&self) -> Arc<CertifiedKey> {
        let (key, renew_at) = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if SystemTime::now() < renew_at {
            return key;
        }
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Handshakes that queued behind the one renewing take its result.
        if SystemTime::now() < current.1 {
            return current.0.clone();
        }
        match issue_serving(&self.ca, &self.dns_names, self.ttl) {
            Ok(fresh) => {
                let key = fresh.0.clone();
                *current = fresh;
                tracing::info!("renewed the CA's serving certificate");
                key
            }
            Err(e) => {
                // The old one is still valid for the second half of its life.
                tracing::warn!(error = %e, "renewing the CA's serving certificate failed");
                key
            }
        }
    }
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("dns_names", &self.dns_names)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn issue_serving(
    ca: &LocalCa,
    dns_names: &[String],
    ttl: Duration,
) -> Result<(Arc<CertifiedKey>, SystemTime), CaError> {
    let (chain, key) = ca.issue_serving_certificate(dns_names, ttl)?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let certified =
        CertifiedKey::from_der(chain, key, &provider).map_err(|e| CaError::Tls(e.to_string()))?;
    Ok((Arc::new(certified), SystemTime::now() + ttl / 2))
}

/// TLS for the gRPC port: TLS 1.3 and 1.2 (istiod's clients may still offer 1.2), ALPN h2
/// (gRPC clients such as grpc-go insist on it), no client certificate (callers
/// authenticate with their token).
pub fn server_tls_config(serving: Arc<ServingCert>) -> Result<Arc<rustls::ServerConfig>, CaError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CaError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the certificate service on `listener` until `shutdown` completes. TLS handshakes
/// run in their own tasks with a deadline, so a slow or silent client never holds up
/// others.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: CaService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CaError> {
    let acceptor = TlsAcceptor::from(tls);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "CA accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return; // the server stopped
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "CA TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "CA TLS handshake timed out"),
                }
            });
        }
    });
    let incoming = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let result = tonic::transport::Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| CaError::Serve(e.to_string()));
    accept.abort();
    result
}
