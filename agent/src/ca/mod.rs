//! The CA service, `ambit ca`: Istio's certificate service (gRPC over TLS, port 15012) with
//! istiod's node authorization, run as its own Deployment. Replicas are stateless apart from
//! the CA key, which lives in a Secret ([`secret`]).
//!
//! - [`authz`]: who may have which certificate (pure functions, table-tested);
//! - [`server`]: the gRPC service, its TLS and the serving certificate;
//! - [`kube`]: TokenReview, the Pod index's watch and the Secrets, over kube-rs;
//! - [`publish`]: the roots handed out, published in the ConfigMap the agents mount;
//! - [`metrics`]: `ambit_ca_requests_total{result,reason}`, the issuance latency histogram.
//!
//! The agent's side (the client) is `identity::RemoteCa`.

pub mod authz;
pub mod kube;
pub mod metrics;
pub mod publish;
pub mod secret;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::identity::{DEFAULT_TRUST_DOMAIN, IdentityError};
use authz::{AuthzPolicy, PodIndex, PodStore, ServiceAccountRef};

/// Generated from `proto/istio/v1/auth/ca.proto` at build time.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("istio.v1.auth");
}

/// Istio's port for the certificate service (and XDS) on istiod.
pub const DEFAULT_CA_ADDR: &str = "0.0.0.0:15012";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15014";
/// The audience agents' projected tokens must be issued for.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "ambit-ca";

/// Everything that can go wrong in the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("CA Secret: {0}")]
    Secret(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("publishing the root: {0}")]
    Publish(String),
    #[error("Kubernetes client: {0}")]
    Kube(String),
    #[error("gRPC server: {0}")]
    Serve(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Flags of `ambit ca`.
#[derive(clap::Args, Debug, Clone)]
pub struct CaArgs {
    /// gRPC (TLS) listen address of the certificate service.
    #[arg(long, env = "AMBIT_CA_ADDR", default_value = DEFAULT_CA_ADDR)]
    pub listen_addr: SocketAddr,
    /// Prometheus metrics (/metrics) and readiness (/healthz/ready).
    #[arg(long, env = "AMBIT_CA_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Namespace of the CA's Secrets (normally its own, from the downward API).
    #[arg(long, env = "AMBIT_CA_NAMESPACE", default_value = "ambit-system")]
    pub namespace: String,
    /// Secret holding the CA's self-signed root (`ca.crt`, `ca.key`); created if absent.
    #[arg(long, default_value = "ambit-ca")]
    pub secret_name: String,
    /// Secret with a user-provided intermediate, Istio's layout (`ca-cert.pem`,
    /// `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`); used instead when it exists.
    #[arg(long, default_value = "cacerts")]
    pub cacerts_secret: String,
    /// ConfigMap (in --namespace) the CA publishes the roots it hands out to, key
    /// `root.pem`: the agents' --ca-trust-file. Written at start (race-safe between
    /// replicas); empty: do not publish.
    #[arg(long, default_value = "ambit-root")]
    pub root_configmap: String,
    /// Trust domain of the identities this CA signs.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Service accounts (NAMESPACE/NAME, comma-separated) of the node agents that may ask
    /// for the identities of the pods on their node.
    #[arg(long, value_delimiter = ',', default_value = "ambit-system/ambit")]
    pub node_agents: Vec<ServiceAccountRef>,
    /// Audience callers' tokens must be issued for (TokenReview `spec.audiences`).
    #[arg(long, default_value = DEFAULT_TOKEN_AUDIENCE)]
    pub token_audience: String,
    /// Validity of certificates when a request asks for none, in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    pub default_cert_ttl_secs: u64,
    /// Longest validity granted, in seconds; longer requests are refused.
    #[arg(long, default_value_t = 24 * 3600)]
    pub max_cert_ttl_secs: u64,
    /// DNS names of the CA's serving certificate (comma-separated): the names agents dial.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ambit-ca.ambit-system.svc,ambit-ca.ambit-system.svc.cluster.local"
    )]
    pub dns_names: Vec<String>,
}

impl CaArgs {
    pub fn policy(&self) -> Result<AuthzPolicy, CaError> {
        if self.max_cert_ttl_secs == 0 || self.default_cert_ttl_secs == 0 {
            return Err(CaError::Config(
                "--default-cert-ttl-secs and --max-cert-ttl-secs must be positive".into(),
            ));
        }
        if self.default_cert_ttl_secs > self.max_cert_ttl_secs {
            return Err(CaError::Config(format!(
                "--default-cert-ttl-secs ({}) is over --max-cert-ttl-secs ({})",
                self.default_cert_ttl_secs, self.max_cert_ttl_secs
            )));
        }
        // Validated the same way identities are, so a typo fails at start.
        crate::identity::SpiffeId::new(self.trust_domain.as_str(), "ns", "sa")?;
        Ok(AuthzPolicy {
            trust_domain: self.trust_domain.clone(),
            node_agents: self.node_agents.clone(),
            default_validity: Duration::from_secs(self.default_cert_ttl_secs),
            max_validity: Duration::from_secs(self.max_cert_ttl_secs),
        })
    }
}

/// Lifetime of the CA's serving certificate (renewed at half life while serving).
const SERVING_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Runs the CA until SIGTERM or Ctrl-C.
pub async fn run(args: CaArgs) -> anyhow::Result<()> {
    crate::identity::install_crypto_provider();
    let policy = args.policy()?;
    let client = ::kube::Client::try_default()
        .await
        .map_err(|e| CaError::Kube(e.to_string()))?;

    let secrets = kube::KubeSecrets::new(client.clone(), &args.namespace);
    let (signer, source) =
        secret::load_or_bootstrap(&secrets, &args.cacerts_secret, &args.secret_name).await?;
    tracing::info!(
        ?source,
        namespace = %args.namespace,
        trust_domain = %policy.trust_domain,
        "CA key loaded"
    );
    let signer = Arc::new(signer);
    if !args.root_configmap.is_empty() {
        let maps = kube::KubeConfigMaps::new(client.clone(), &args.namespace);
        tokio::spawn(publish_until_done(
            maps,
            args.root_configmap.clone(),
            roots_pem(&signer),
        ));
    }

    let pods = Arc::new(PodStore::new());
    kube::spawn_pod_watch(client.clone(), pods.clone());
    let reviewer = Arc::new(kube::KubeTokenReviewer::new(
        client,
        args.token_audience.clone(),
    ));

    let mut registry = Registry::default();
    let ca_metrics = metrics::CaMetrics::new(&mut registry);
    let metrics_listener = bind(args.metrics_addr).await?;
    // What was bound (port 0 picks one): the address to scrape.
    let metrics_addr = metrics_listener.local_addr().unwrap_or(args.metrics_addr);
    let ready_pods = pods.clone();
    metrics::spawn_http(
        metrics_listener,
        Arc::new(registry),
        Arc::new(move || {
            if ready_pods.synced() {
                Ok(())
            } else {
                Err("the pod index has not finished its first list".to_owned())
            }
        }),
    );

    let serving = Arc::new(server::ServingCert::new(
        signer.clone(),
        args.dns_names.clone(),
        SERVING_CERT_TTL,
    )?);
    let tls = server::server_tls_config(serving)?;
    let service = server::CaService::new(signer, reviewer, pods, policy, ca_metrics);
    let listener = bind(args.listen_addr).await?;
    let addr = listener.local_addr().unwrap_or(args.listen_addr);
    tracing::info!(%addr, metrics = %metrics_addr, dns_names = ?args.dns_names, "CA serving");
    server::serve(listener, tls, service, shutdown_signal()).await?;
    tracing::info!("CA stopped");
    Ok(())
}

/// Every root of the CA's bundle as PEM, concatenated: what it hands out as the last
/// element of each chain and publishes for the agents (old and new during a rotation).
pub fn roots_pem(signer: &crate::identity::LocalCa) -> String {
    use crate::identity::CertificateAuthority as _;
    signer
        .trust_bundle()
        .roots
        .iter()
        .map(|root| pem("CERTIFICATE", root))
        .collect()
}

/// Publishes the roots, retrying with back-off while the API server refuses (the agents
/// wait for the ConfigMap; the CA serves meanwhile).
async fn publish_until_done(maps: kube::KubeConfigMaps, name: String, roots_pem: String) {
    let mut delay = Duration::from_secs(1);
    loop {
        match publish::publish_roots(&maps, &name, &roots_pem).await {
            Ok(outcome) => {
                tracing::info!(configmap = %name, outcome = outcome.as_str(), "published the root");
                return;
            }
            Err(e) => {
                tracing::warn!(configmap = %name, error = %e, retry_in = ?delay, "publishing the root failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, CaError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| CaError::Bind { addr, source })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// PEM with any label (`CERTIFICATE`, `CERTIFICATE REQUEST`), through the encoder the admin
/// endpoint already uses for certificates.
pub fn pem(label: &str, der: &[u8]) -> String {
    let certificate = crate::observability::pem_certificate(der);
    if label == "CERTIFICATE" {
        certificate
    } else {
        certificate.replace("CERTIFICATE-----", &format!("{label}-----"))
    }
}

#[cfg(test)]
mod tests;
