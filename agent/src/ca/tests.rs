//! Loopback tests: the real gRPC server over TLS on 127.0.0.1 with an in-process token
//! reviewer and pod index, and the agent's [`RemoteCa`] as its client.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use rustls_pki_types::pem::PemObject;
use tokio::sync::oneshot;

use super::authz::{
    AuthzPolicy, CertificateRequest, PodFacts, PodStore, Refusal, RefusalReason, ReviewedCaller,
    ServiceAccountRef, authorize,
};
use super::metrics::{CaMetrics, Outcome};
use super::proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use super::proto::{IstioCertificateRequest, IstioCertificateResponse};
use super::server::{CaService, ServingCert, TokenReviewer, serve, server_tls_config};
use super::*;
use crate::identity::{
    CLOCK_SKEW_BACKDATE, CertManager, CertificateAuthority, IdentityError, LocalCa, RemoteCa,
    RemoteCaConfig, SpiffeId, TrustReload, generate_csr, identity_from_cert,
};

const TD: &str = "cluster.local";
const SERVER_NAME: &str = "ambit-ca.ambit-system.svc";

/// Tokens are looked up in a table; anything else is an invalid token. Counts reviews.
struct TableReviewer {
    callers: HashMap<String, ReviewedCaller>,
    reviews: Mutex<u32>,
}

impl TokenReviewer for TableReviewer {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<ReviewedCaller, Refusal>> {
        *self.reviews.lock().unwrap() += 1;
        let result = self
            .callers
            .get(token)
            .cloned()
            .ok_or_else(|| Refusal::new(RefusalReason::TokenInvalid, "unknown token"));
        futures::future::ready(result).boxed()
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str) -> PodFacts {
    PodFacts {
        namespace: ns.into(),
        name: name.into(),
        uid: uid.into(),
        service_account: sa.into(),
        node: Some(node.into()),
    }
}

fn policy() -> AuthzPolicy {
    AuthzPolicy {
        trust_domain: TD.into(),
        node_agents: vec![ServiceAccountRef::new("ambit-system", "ambit")],
        default_validity: Duration::from_secs(3600),
        max_validity: Duration::from_secs(24 * 3600),
    }
}

struct Fixture {
    ca: Arc<LocalCa>,
    addr: std::net::SocketAddr,
    metrics: CaMetrics,
    reviewer: Arc<TableReviewer>,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
}

impl Fixture {
    /// A CA with the agent of node-a (token "agent-a"), `shop/web` on node-a and `shop/db`
    /// on node-b.
    async fn start() -> Self {
        Self::start_with(LocalCa::generate().unwrap()).await
    }

    async fn start_with(ca: LocalCa) -> Self {
        Self::start_on(ca, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_on(ca: LocalCa, addr: std::net::SocketAddr) -> Self {
        crate::identity::install_crypto_provider();
        let ca = Arc::new(ca);
        let pods = Arc::new(PodStore::new());
        pods.replace_all([
            pod("ambit-system", "ambit-a", "uid-a", "ambit", "node-a"),
            pod("shop", "web-1", "uid-w", "web", "node-a"),
            pod("shop", "db-1", "uid-d", "db", "node-b"),
        ]);
        let reviewer = Arc::new(TableReviewer {
            callers: HashMap::from([(
                "agent-a".to_owned(),
                ReviewedCaller {
                    service_account: ServiceAccountRef::new("ambit-system", "ambit"),
                    pod_name: Some("ambit-a".into()),
                    pod_uid: Some("uid-a".into()),
                },
            )]),
            reviews: Mutex::new(0),
        });
        let mut registry = Registry::default();
        let metrics = CaMetrics::new(&mut registry);
        let service = CaService::new(
            ca.clone(),
            reviewer.clone(),
            pods,
            policy(),
            metrics.clone(),
        );
        let serving = Arc::new(
            ServingCert::new(
                ca.clone(),
                vec![SERVER_NAME.into()],
                Duration::from_secs(3600),
            )
            .unwrap(),
        );
        let tls = server_tls_config(serving).unwrap();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(serve(listener, tls, service, async {
            let _ = stopped.await;
        }));

        let dir = std::env::temp_dir().join(format!(
            "ambit-ca-test-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        let roots: String = ca
            .trust_bundle()
            .roots
            .iter()
            .map(|r| pem("CERTIFICATE", r))
            .collect();
        fs::write(dir.join("trust.pem"), roots).unwrap();
        fs::write(dir.join("token"), "agent-a\n").unwrap();
        Self {
            ca,
            addr,
            metrics,
            reviewer,
            dir,
            stop: Some(stop),
        }
    }

    fn config(&self) -> RemoteCaConfig {
        let mut config = RemoteCaConfig::new(
            format!("https://{}", self.addr),
            self.dir.join("token"),
            self.dir.join("trust.pem"),
        );
        config.tls_server_name = Some(SERVER_NAME.into());
        config
    }

    fn client(&self) -> RemoteCa {
        RemoteCa::new(self.config()).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn refusal(err: IdentityError) -> (tonic::Code, Option<String>) {
    let err = match err {
        IdentityError::Shared(shared) => {
            Arc::try_unwrap(shared).unwrap_or_else(|shared| IdentityError::Ca(shared.to_string()))
        }
        other => other,
    };
    match err {
        IdentityError::CaRefused { code, reason, .. } => (code, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn agent_obtains_a_certificate_for_a_pod_on_its_node_and_not_for_another_node() {
    let fx = Fixture::start().await;
    let remote = fx.client();

    let web = id("shop", "web");
    let cert = remote.issue(&web, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(cert.identity, web);
    assert_eq!(identity_from_cert(&cert.chain[0]).unwrap(), web);
    assert_eq!(
        cert.chain.len(),
        1,
        "leaf only: the CA is a root, not repeated"
    );
    let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(lifetime, Duration::from_secs(3600) + CLOCK_SKEW_BACKDATE);
    // The bundle is what came with the chain: the CA's root.
    assert_eq!(remote.trust_bundle(), fx.ca.trust_bundle());

    let err = remote
        .issue(&id("shop", "db"), Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert_eq!(
        refusal(err),
        (
            tonic::Code::PermissionDenied,
            Some("identity_not_on_node".to_owned())
        )
    );
    assert_eq!(fx.metrics.count(Outcome::Issued), 1);
    assert_eq!(
        fx.metrics
            .count(Outcome::Denied(RefusalReason::IdentityNotOnNode)),
        1
    );
}

#[tokio::test]
async fn token_is_reread_per_request_and_validity_is_capped() {
    let fx = Fixture::start().await;
    let remote = fx.client();
    let web = id("shop", "web");

    // The kubelet rotated the file to a token the API server does not accept.
    fs::write(fx.dir.join("token"), "stale-token").unwrap();
    let err = remote
        .issue(&web, Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert_eq!(
        refusal(err),
        (
            tonic::Code::Unauthenticated,
            Some("token_invalid".to_owned())
        )
    );
    fs::write(fx.dir.join("token"), "agent-a").unwrap();
    remote.issue(&web, Duration::from_secs(3600)).await.unwrap();

    let err = remote
        .issue(&web, Duration::from_secs(48 * 3600))
        .await
        .unwrap_err();
    assert_eq!(
        refusal(err),
        (
            tonic::Code::InvalidArgument,
            Some("validity_too_long".to_owned())
        )
    );
    assert_eq!(*fx.reviewer.reviews.lock().unwrap(), 3);
}

#[tokio::test]
async fn concurrent_callers_share_one_request_per_identity() {
    let fx = Fixture::start().await;
    let certs = CertManager::new(Arc::new(fx.client()), Duration::from_secs(3600));
    let web = id("shop", "web");
    let gets = (0..16).map(|_| {
        let certs = certs.clone();
        let web = web.clone();
        tokio::spawn(async move { certs.get(&web).await.map(|c| c.serial.clone()) })
    });
    let serials: Vec<String> = futures::future::join_all(gets)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert!(serials.iter().all(|s| *s == serials[0]));
    assert_eq!(fx.metrics.count(Outcome::Issued), 1);
    assert_eq!(*fx.reviewer.reviews.lock().unwrap(), 1);
}

#[tokio::test]
async fn a_ca_serving_a_certificate_from_another_root_is_not_trusted() {
    let fx = Fixture::start().await;
    let other = LocalCa::generate().unwrap();
    let roots: String = other
        .trust_bundle()
        .roots
        .iter()
        .map(|r| pem("CERTIFICATE", r))
        .collect();
    fs::write(fx.dir.join("other.pem"), roots).unwrap();
    let mut config = fx.config();
    config.trust_file = fx.dir.join("other.pem");
    let remote = RemoteCa::new(config).unwrap();
    let err = remote
        .issue(&id("shop", "web"), Duration::from_secs(3600))
        .await
        .unwrap_err();
    // The TLS handshake fails before any request is made.
    let (code, reason) = refusal(err);
    assert_eq!(code, tonic::Code::Unavailable);
    assert_eq!(reason, None);
    assert_eq!(*fx.reviewer.reviews.lock().unwrap(), 0);
}

/// A ConfigMap volume as the kubelet lays it out: `root.pem -> ..data/root.pem`,
/// `..data -> ..<generation>`; an update writes a new generation directory and renames a
/// new `..data` symlink over the old one (one atomic swap).
struct ConfigMapVolume {
    dir: PathBuf,
    generation: u32,
}

impl ConfigMapVolume {
    fn new(dir: PathBuf, content: &str) -> Self {
        fs::create_dir_all(&dir).unwrap();
        let mut volume = Self { dir, generation: 0 };
        volume.update(content);
        std::os::unix::fs::symlink("..data/root.pem", volume.file()).unwrap();
        volume
    }

    fn file(&self) -> PathBuf {
        self.dir.join("root.pem")
    }

    fn update(&mut self, content: &str) {
        self.generation += 1;
        let generation = format!(
            "..2026_12_01_06_00_{:02}.{}",
            self.generation, self.generation
        );
        fs::create_dir(self.dir.join(&generation)).unwrap();
        fs::write(self.dir.join(&generation).join("root.pem"), content).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&generation, &tmp).unwrap();
        fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

fn roots_of(ca: &LocalCa) -> String {
    ca.trust_bundle()
        .roots
        .iter()
        .map(|r| pem("CERTIFICATE", r))
        .collect()
}

const MALFORMED_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n";

#[tokio::test]
async fn trust_file_swapped_by_the_kubelet_is_reloaded_and_a_malformed_one_keeps_the_old() {
    let fx = Fixture::start().await;
    let other = roots_of(&LocalCa::generate().unwrap());
    let mut volume = ConfigMapVolume::new(fx.dir.join("ambit-root"), &roots_of(&fx.ca));
    let mut config = fx.config();
    config.trust_file = volume.file();
    config.trust_reload_interval = Duration::ZERO; // reloaded by hand here
    let remote = RemoteCa::new(config).unwrap();
    let web = id("shop", "web");
    assert_eq!(remote.reload_trust().await, TrustReload::Unchanged);

    // Malformed before any connection was made: rejected, named, and the next connection
    // still uses the root in force.
    volume.update(MALFORMED_PEM);
    let TrustReload::Rejected(error) = remote.reload_trust().await else {
        panic!("a malformed trust file was not rejected");
    };
    assert!(
        error.contains("root.pem") && error.contains("unusable"),
        "{error}"
    );
    // Same bad bytes again: nothing new (logged once).
    assert_eq!(remote.reload_trust().await, TrustReload::Unchanged);
    remote.issue(&web, Duration::from_secs(3600)).await.unwrap();

    // Another root: taken, and new connections verify against it (this CA fails them).
    volume.update(&other);
    assert_eq!(
        remote.reload_trust().await,
        TrustReload::Reloaded { roots: 1 }
    );
    let (code, _) = refusal(
        remote
            .issue(&web, Duration::from_secs(3600))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::Unavailable);

    // Both roots (a rotation's overlap): the CA is trusted again.
    volume.update(&format!("{other}{}", roots_of(&fx.ca)));
    assert_eq!(
        remote.reload_trust().await,
        TrustReload::Reloaded { roots: 2 }
    );
    remote.issue(&web, Duration::from_secs(3600)).await.unwrap();

    // The whole volume gone: unreadable, the trust in force stays.
    fs::remove_file(volume.file()).unwrap();
    assert!(matches!(
        remote.reload_trust().await,
        TrustReload::Rejected(e) if e.contains("reading the CA trust file")
    ));
    remote
        .issue(&id("shop", "web"), Duration::from_secs(60))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_trust_file_is_polled_without_a_restart() {
    let fx = Fixture::start().await;
    let other = roots_of(&LocalCa::generate().unwrap());
    let mut volume = ConfigMapVolume::new(fx.dir.join("ambit-root"), &other);
    let mut config = fx.config();
    config.trust_file = volume.file();
    config.trust_reload_interval = Duration::from_millis(50);
    let remote = RemoteCa::new(config).unwrap();
    let web = id("shop", "web");
    let (code, _) = refusal(
        remote
            .issue(&web, Duration::from_secs(3600))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::Unavailable, "the CA is not trusted yet");
    volume.update(&roots_of(&fx.ca));
    // The poll picks the new root up by itself; generous deadline for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match remote.issue(&web, Duration::from_secs(3600)).await {
            Ok(cert) => {
                assert_eq!(cert.identity, web);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never reloaded: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn client_configuration_errors_are_named() {
    let fx = Fixture::start().await;
    let mut config = fx.config();
    config.address = format!("http://{}", fx.addr);
    let err = RemoteCa::new(config).unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
    let mut config = fx.config();
    config.trust_file = fx.dir.join("missing.pem");
    assert!(matches!(
        RemoteCa::new(config),
        Err(IdentityError::Io { .. })
    ));
    let mut config = fx.config();
    fs::write(fx.dir.join("empty.pem"), "").unwrap();
    config.extra_bundle_file = Some(fx.dir.join("empty.pem"));
    assert!(matches!(
        RemoteCa::new(config),
        Err(IdentityError::Pem { .. })
    ));
}

/// The CA is down when the agent starts, then comes up: the same client recovers on its
/// next request, without a restart.
#[tokio::test]
async fn client_recovers_when_the_ca_comes_up() {
    let ca = LocalCa::generate().unwrap();
    // A port nobody listens on (yet).
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // Closed for every holder of the fd: a child another test is forking may hold one.
        socket2::SockRef::from(&probe)
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
        probe.local_addr().unwrap()
    };
    let roots: String = ca
        .trust_bundle()
        .roots
        .iter()
        .map(|r| pem("CERTIFICATE", r))
        .collect();
    let dir = std::env::temp_dir().join(format!(
        "ambit-ca-down-{}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("trust.pem"), roots).unwrap();
    fs::write(dir.join("token"), "agent-a").unwrap();
    let mut config = RemoteCaConfig::new(
        format!("https://{addr}"),
        dir.join("token"),
        dir.join("trust.pem"),
    );
    config.tls_server_name = Some(SERVER_NAME.into());
    let remote = RemoteCa::new(config).unwrap();
    let web = id("shop", "web");
    let err = remote
        .issue(&web, Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert_eq!(refusal(err), (tonic::Code::Unavailable, None));

    let fx = Fixture::start_on(ca, addr).await;
    let cert = remote.issue(&web, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(cert.identity, web);
    assert_eq!(fx.metrics.count(Outcome::Issued), 1);
    fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn root_rotation_overlap_then_removal_follows_the_ca() {
    let old = Fixture::start().await;
    let web = id("shop", "web");
    let old_cert = old
        .client()
        .issue(&web, Duration::from_secs(3600))
        .await
        .unwrap();

    // Overlap: a new root, the old one still sent along (last element holds both).
    let (_, new_cert_pem, new_key_pem) = LocalCa::generate_root_pem().unwrap();
    let new_root =
        rustls_pki_types::CertificateDer::from_pem_slice(new_cert_pem.as_bytes()).unwrap();
    let load = || {
        LocalCa::from_certs_and_key(
            vec![new_root.clone()],
            new_key_pem.as_bytes(),
            std::path::Path::new("new.crt"),
            std::path::Path::new("new.key"),
        )
        .unwrap()
    };
    let overlap =
        Fixture::start_with(load().with_extra_roots(old.ca.trust_bundle().roots.clone())).await;
    let client = overlap.client();
    let new_cert = client.issue(&web, Duration::from_secs(3600)).await.unwrap();
    let bundle = client.trust_bundle();
    assert_eq!(bundle.roots.len(), 2);
    // Peers still on the old root and peers already on the new one both verify.
    for cert in [&old_cert, &new_cert] {
        verify_client(&bundle, cert);
    }

    // Removal: the CA stops sending the old root; the next issuance drops it.
    let after = Fixture::start_with(load()).await;
    let mut config = after.config();
    config.trust_file = overlap.dir.join("trust.pem");
    let client = RemoteCa::new(config).unwrap();
    client.issue(&web, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(client.trust_bundle().roots, vec![new_root.clone()]);
}

fn verify_client(
    bundle: &crate::identity::TrustBundle,
    cert: &crate::identity::WorkloadCertificate,
) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(bundle.root_store().unwrap()),
        provider,
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(
            &cert.chain[0],
            &cert.chain[1..],
            rustls_pki_types::UnixTime::now(),
        )
        .unwrap();
}

#[test]
fn serving_certificate_is_reissued_past_half_life() {
    crate::identity::install_crypto_provider();
    let ca = Arc::new(LocalCa::generate().unwrap());
    let names = vec![SERVER_NAME.to_owned()];
    let fresh = ServingCert::new(ca.clone(), names.clone(), Duration::from_secs(3600)).unwrap();
    assert!(Arc::ptr_eq(&fresh.current(), &fresh.current()));
    // A zero lifetime is past half life at once: every handshake gets a new one.
    let stale = ServingCert::new(ca, names, Duration::ZERO).unwrap();
    assert!(!Arc::ptr_eq(&stale.current(), &stale.current()));
}

/// What a fake istiod saw, and the chain it answers with.
#[derive(Default)]
struct Recorded {
    authorization: Option<String>,
    clusterid: Option<String>,
    request: Option<IstioCertificateRequest>,
}

struct FakeIstiod {
    seen: Arc<Mutex<Recorded>>,
    answer: Vec<String>,
}

#[tonic::async_trait]
impl IstioCertificateService for FakeIstiod {
    async fn create_certificate(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let mut seen = self.seen.lock().unwrap();
        seen.authorization = header("authorization");
        seen.clusterid = header("clusterid");
        seen.request = Some(request.into_inner());
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: self.answer.clone(),
        }))
    }
}

/// The request on the wire is what istiod expects (bearer token, `clusterid`,
/// `ImpersonatedIdentity`, a PEM CSR for the identity, the validity in seconds), and a
/// certificate for another identity than requested is refused.
#[tokio::test]
async fn request_has_istiods_shape_and_a_wrong_san_is_refused() {
    let fx = Fixture::start().await;
    let seen = Arc::new(Mutex::new(Recorded::default()));
    // The fake answers with a certificate for `shop/db` whatever is asked.
    let db = id("shop", "db");
    let (_key, csr) = generate_csr(&db).unwrap();
    let now = SystemTime::now();
    let chain = fx
        .ca
        .sign_csr(&csr, &db, now, now + Duration::from_secs(600))
        .unwrap();
    let mut answer: Vec<String> = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    answer.push(pem("CERTIFICATE", &fx.ca.trust_bundle().roots[0]));
    let service = IstioCertificateServiceServer::new(FakeIstiod {
        seen: seen.clone(),
        answer,
    });
    let serving = Arc::new(
        ServingCert::new(
            fx.ca.clone(),
            vec!["istiod.istio-system.svc".into()],
            Duration::from_secs(3600),
        )
        .unwrap(),
    );
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls_config(serving).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = futures::stream::unfold(listener, move |listener| {
        let acceptor = acceptor.clone();
        async move {
            let (tcp, _) = listener.accept().await.ok()?;
            let tls = acceptor.accept(tcp).await;
            Some((tls, listener))
        }
    });
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );

    let mut config = fx.config();
    config.address = format!("https://{addr}");
    config.tls_server_name = Some("istiod.istio-system.svc".into());
    config.cluster_id = Some("Kubernetes".into());
    let remote = RemoteCa::new(config).unwrap();
    let web = id("shop", "web");
    let err = remote
        .issue(&web, Duration::from_secs(1800))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, IdentityError::Ca(msg) if msg.contains("spiffe://cluster.local/ns/shop/sa/db") && msg.contains("not for the requested")),
        "{err}"
    );
    // A refused answer leaves the bundle as it was.
    assert!(remote.trust_bundle().roots.is_empty());

    let seen = seen.lock().unwrap();
    assert_eq!(seen.authorization.as_deref(), Some("Bearer agent-a"));
    assert_eq!(seen.clusterid.as_deref(), Some("Kubernetes"));
    let request = seen.request.as_ref().unwrap();
    assert_eq!(request.validity_duration, 1800);
    let impersonated = &request.metadata.as_ref().unwrap().fields["ImpersonatedIdentity"];
    assert_eq!(
        impersonated.kind,
        Some(prost_types::value::Kind::StringValue(web.to_string()))
    );
    assert!(
        request
            .csr
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----\n")
    );
    // The CSR is one our own CA accepts for exactly that identity.
    let check = CertificateRequest {
        csr_pem: &request.csr,
        impersonated_identity: None,
        validity_seconds: 0,
    };
    let caller = ReviewedCaller {
        service_account: ServiceAccountRef::new("shop", "web"),
        pod_name: None,
        pod_uid: None,
    };
    authorize(&policy(), &caller, &PodStore::new(), &check).unwrap();
    server.abort();
}

/// Certificates per second, printed; run with
/// `cargo test -p ambit-agent --release --lib ca::tests::issuance_rate -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a test"]
async fn issuance_rate() {
    // Signing alone (what the CA does per request once authorized).
    let ca = LocalCa::generate().unwrap();
    let web = id("shop", "web");
    let (_key, csr) = generate_csr(&web).unwrap();
    let csr_pem = pem("CERTIFICATE REQUEST", &csr);
    let pods = PodStore::new();
    pods.replace_all([
        pod("ambit-system", "ambit-a", "uid-a", "ambit", "node-a"),
        pod("shop", "web-1", "uid-w", "web", "node-a"),
    ]);
    let caller = ReviewedCaller {
        service_account: ServiceAccountRef::new("ambit-system", "ambit"),
        pod_name: Some("ambit-a".into()),
        pod_uid: Some("uid-a".into()),
    };
    let n = 2000;
    let started = Instant::now();
    for _ in 0..n {
        let request = CertificateRequest {
            csr_pem: &csr_pem,
            impersonated_identity: Some("spiffe://cluster.local/ns/shop/sa/web"),
            validity_seconds: 0,
        };
        let ok = authorize(&policy(), &caller, &pods, &request).unwrap();
        let now = SystemTime::now();
        ca.sign_csr(&ok.csr, &ok.identity, now, now + ok.validity)
            .unwrap();
    }
    let rate = f64::from(n) / started.elapsed().as_secs_f64();
    println!("authorize + sign (one thread): {rate:.0} certificates/s");

    // End to end over gRPC/TLS, 8 concurrent clients, key generation in the client included.
    let fx = Fixture::start().await;
    let remote = Arc::new(fx.client());
    let n = 2000u32;
    let started = Instant::now();
    let tasks = (0..8).map(|_| {
        let remote = remote.clone();
        let web = web.clone();
        tokio::spawn(async move {
            for _ in 0..n / 8 {
                remote.issue(&web, Duration::from_secs(3600)).await.unwrap();
            }
        })
    });
    for t in futures::future::join_all(tasks).await {
        t.unwrap();
    }
    let rate = f64::from(n) / started.elapsed().as_secs_f64();
    println!("end to end over gRPC/TLS (8 callers): {rate:.0} certificates/s");
}
