//! HBONE on loopback: outbound -> inbound -> echo server, with real certificates.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::identity::{
    CertManager, CertificateAuthority, IdentityError, LocalCa, SpiffeId, TrustBundle,
    WorkloadCertificate,
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Another pod on the same node (loopback answers on all of 127/8).
const OTHER_POD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa).expect("valid id")
}

/// Issues with `signer` but hands out `bundle` as the trust bundle: lets a test build a
/// client whose certificate comes from a CA the server does not trust.
struct SplitCa {
    signer: LocalCa,
    bundle: Arc<TrustBundle>,
}

impl CertificateAuthority for SplitCa {
    fn issue(
        &self,
        id: &SpiffeId,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<WorkloadCertificate, IdentityError>> {
        let id = id.clone();
        Box::pin(async move {
            let now = SystemTime::now();
            self.signer
                .issue_with_validity(&id, now - Duration::from_secs(60), now + ttl)
        })
    }

    fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.bundle.clone()
    }
}

struct Workloads(HashMap<IpAddr, LocalWorkload>);

impl LocalWorkloads for Workloads {
    fn by_ip(&self, ip: IpAddr) -> Option<LocalWorkload> {
        self.0.get(&ip).cloned()
    }
}

/// Records what it was asked; denies the identities in `deny`.
#[derive(Default)]
struct RecordingAuthorizer {
    seen: Mutex<Vec<InboundConnection>>,
    deny: Vec<SpiffeId>,
    deny_plaintext: bool,
}

impl Authorizer for RecordingAuthorizer {
    fn authorize(&self, conn: &InboundConnection) -> Verdict {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(conn.clone());
        }
        match &conn.source_identity {
            Some(src) if self.deny.contains(src) => Verdict::Deny {
                reason: "test denies this identity".into(),
            },
            None if self.deny_plaintext => Verdict::Deny {
                reason: "test denies plaintext".into(),
            },
            _ => Verdict::Allow,
        }
    }
}

struct Env {
    ca: Arc<LocalCa>,
    inbound: Arc<Inbound>,
    metrics: Arc<Metrics>,
    authorizer: Arc<RecordingAuthorizer>,
    hbone_addr: SocketAddr,
    echo_addr: SocketAddr,
    client_certs: CertManager,
    /// The inbound's drain signal (GOAWAY on every HBONE connection when set).
    drain: tokio::sync::watch::Sender<bool>,
}

impl Env {
    async fn start(config: TunnelConfig, cert_ttl: Duration, deny: Vec<SpiffeId>) -> Self {
        Self::start_with(config, cert_ttl, deny, false).await
    }

    async fn start_with(
        config: TunnelConfig,
        cert_ttl: Duration,
        deny: Vec<SpiffeId>,
        deny_plaintext: bool,
    ) -> Self {
        Self::build(config, cert_ttl, deny, deny_plaintext, None).await
    }

    /// `config`, long-lived certificates, nobody denied.
    async fn with_config(config: TunnelConfig) -> Self {
        Self::start(config, Duration::from_secs(3600), vec![]).await
    }

    /// The listener of the pod at 127.0.0.1 only, as the agent runs it.
    async fn for_pod(config: TunnelConfig) -> Self {
        Self::build(
            config,
            Duration::from_secs(3600),
            vec![],
            false,
            Some(vec![LOCALHOST]),
        )
        .await
    }

    /// Two local workloads: `server` at 127.0.0.1 and `other` at 127.0.0.2. With `for_pod`
    /// the Inbound serves those addresses only; without, every local workload.
    async fn build(
        config: TunnelConfig,
        cert_ttl: Duration,
        deny: Vec<SpiffeId>,
        deny_plaintext: bool,
        for_pod: Option<Vec<IpAddr>>,
    ) -> Self {
        let ca = Arc::new(LocalCa::generate().expect("CA"));
        let server_certs = CertManager::new(ca.clone(), cert_ttl);
        let client_certs = CertManager::new(ca.clone(), cert_ttl);
        let workload = |name: &str| LocalWorkload {
            name: name.into(),
            namespace: "default".into(),
            identity: id(name),
        };
        let workloads = Arc::new(Workloads(HashMap::from([
            (LOCALHOST, workload("server")),
            (OTHER_POD, workload("other")),
        ])));
        let authorizer = Arc::new(RecordingAuthorizer {
            deny,
            deny_plaintext,
            ..Default::default()
        });
        let metrics = Arc::new(Metrics::new(
            &mut prometheus_client::registry::Registry::default(),
        ));
        let mut inbound = Inbound::new(
            server_certs,
            workloads,
            authorizer.clone(),
            Arc::new(DirectDialer),
            config,
            false,
        )
        .with_metrics(metrics.clone());
        let (drain, draining) = tokio::sync::watch::channel(false);
        inbound = inbound.with_drain(draining);
        if let Some(ips) = for_pod {
            inbound = inbound.for_pod(ips);
        }
        let inbound = Arc::new(inbound);
        let listener = hbone_listener((LOCALHOST, 0));
        let hbone_addr = listener.local_addr().expect("addr");
        tokio::spawn(inbound.clone().serve(listener));
        let echo_addr = spawn_echo().await;
        Self {
            ca,
            inbound,
            metrics,
            authorizer,
            hbone_addr,
            echo_addr,
            client_certs,
            drain,
        }
    }

    async fn default() -> Self {
        Self::start(TunnelConfig::default(), Duration::from_secs(3600), vec![]).await
    }

    fn outbound(&self, config: TunnelConfig) -> Outbound {
        Outbound::new(self.client_certs.clone(), Arc::new(DirectDialer), config)
    }

    fn request(&self, source: &str, destination: &str, target: SocketAddr) -> OutboundRequest {
        OutboundRequest {
            source: id(source),
            source_addr: "127.0.0.1:40000".parse().expect("addr"),
            source_workload: source.into(),
            destination: id(destination),
            hbone_addr: self.hbone_addr,
            original_destination: target,
        }
    }

    /// Proxies a fresh loopback TCP connection through `outbound` and returns the client end.
    async fn proxied_client(
        &self,
        outbound: Arc<Outbound>,
        request: OutboundRequest,
    ) -> (TcpStream, tokio::task::JoinHandle<Result<(), TunnelError>>) {
        let capture = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        let client = TcpStream::connect(capture.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = capture.accept().await.expect("accept");
        // As the outbound listener's options arm every socket it accepts.
        super::reset_on_close(&accepted);
        let task = tokio::spawn(async move {
            outbound
                .proxy(request, accepted, CopyStats::default())
                .await
        });
        (client, task)
    }
}

/// A listener for `Inbound::serve`, on the test's runtime, with TCP_NODELAY as the agent's.
fn hbone_listener(addr: (IpAddr, u16)) -> super::Listener {
    let listener = std::net::TcpListener::bind(addr).expect("bind hbone");
    socket2::SockRef::from(&listener)
        .set_tcp_nodelay(true)
        .expect("TCP_NODELAY");
    super::Listener::from_std(listener).expect("listener registers")
}

/// Echoes every byte back and half-closes after the client does.
async fn spawn_echo() -> SocketAddr {
    spawn_echo_on(LOCALHOST).await
}

async fn spawn_echo_on(ip: IpAddr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A raw HBONE client built from a given certificate, for the cases Outbound's own
/// CertManager would refuse to produce (expired certificates).
async fn raw_hbone(
    cert: &WorkloadCertificate,
    bundle: &TrustBundle,
    expected: &SpiffeId,
    addr: SocketAddr,
) -> Result<h2::client::SendRequest<Bytes>, TunnelError> {
    let config = tls::client_config(cert, bundle, expected)?;
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let (send, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(conn);
    Ok(send.ready().await?)
}

/// In TLS 1.3 the client finishes its handshake before the server has judged the client's
/// certificate; a rejection shows up on the first request. This makes that request.
async fn first_connect(
    session: Result<h2::client::SendRequest<Bytes>, TunnelError>,
    target: SocketAddr,
) -> Result<StatusCode, TunnelError> {
    let mut send = session?.ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())?;
    let (response, _body) = send.send_request(request, false)?;
    Ok(response.await?.status())
}

async fn status_of(send: h2::client::SendRequest<Bytes>, request: Request<()>) -> StatusCode {
    let mut send = send.ready().await.expect("ready");
    let (response, _body) = send.send_request(request, false).expect("send");
    response.await.expect("response").status()
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn round_trip_checks_identities_on_both_ends() {
    let env = Env::default().await;
    let outbound = Arc::new(env.outbound(TunnelConfig::default()));
    let request = env.request("client", "server", env.echo_addr);
    let (mut client, task) = env.proxied_client(outbound, request).await;

    client
        .write_all(b"hello through HBONE")
        .await
        .expect("write");
    client.shutdown().await.expect("half-close");
    let mut echoed = Vec::new();
    client.read_to_end(&mut echoed).await.expect("read");
    assert_eq!(echoed, b"hello through HBONE");
    task.await.expect("join").expect("proxy finished cleanly");

    let seen = env.authorizer.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].source_identity,
        Some(id("client")),
        "server saw the client's identity"
    );
    assert_eq!(seen[0].workload.identity, id("server"));
    assert_eq!(seen[0].destination, env.echo_addr);
    assert_eq!(seen[0].source_addr.ip(), LOCALHOST);
}

#[tokio::test]
async fn server_with_unexpected_identity_is_refused_and_counted() {
    let env = Env::default().await;
    let metrics = Arc::new(Metrics::new(
        &mut prometheus_client::registry::Registry::default(),
    ));
    let outbound = env
        .outbound(TunnelConfig::default())
        .with_metrics(metrics.clone());
    let request = env.request("client", "someone-else", env.echo_addr);
    let err = outbound
        .open_stream(&request)
        .await
        .err()
        .expect("must fail");
    match err {
        TunnelError::Handshake {
            reason: HandshakeFailure::SanMismatch { expected, got },
            ..
        } => {
            assert_eq!(expected, id("someone-else").to_string());
            assert_eq!(got, id("server").to_string());
        }
        other => panic!("expected a SAN mismatch, got {other}"),
    }
    assert_eq!(metrics.handshake_failures("san_mismatch"), 1);
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_rejected() {
    let env = Env::default().await;
    let rogue = CertManager::new(
        Arc::new(SplitCa {
            signer: LocalCa::generate().expect("rogue CA"),
            bundle: env.ca.trust_bundle(),
        }),
        Duration::from_secs(3600),
    );
    let outbound = Outbound::new(rogue, Arc::new(DirectDialer), TunnelConfig::default());
    let result = outbound
        .open_stream(&env.request("client", "server", env.echo_addr))
        .await;
    assert!(
        result.is_err(),
        "a client from an untrusted CA must not get a stream"
    );
    let metrics = env.metrics.clone();
    wait_for("server to count the failure", || {
        metrics.handshake_failures("unknown_ca") == 1
    })
    .await;
    assert!(env.authorizer.seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn expired_client_certificate_is_rejected() {
    let env = Env::default().await;
    let now = SystemTime::now();
    let expired = env
        .ca
        .issue_with_validity(
            &id("client"),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .expect("issue expired");
    let session = raw_hbone(
        &expired,
        &env.ca.trust_bundle(),
        &id("server"),
        env.hbone_addr,
    )
    .await;
    let result = first_connect(session, env.echo_addr).await;
    assert!(
        result.is_err(),
        "an expired client certificate must not be accepted: {result:?}"
    );
    let metrics = env.metrics.clone();
    wait_for("server to count the failure", || {
        metrics.handshake_failures("expired") == 1
    })
    .await;
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    #[derive(Debug)]
    struct TrustAnything;
    impl rustls::client::danger::ServerCertVerifier for TrustAnything {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let env = Env::default().await;
    crate::identity::install_crypto_provider();
    let mut config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(env.hbone_addr).await.expect("connect");
    let handshake = async {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(env.hbone_addr.ip().into()), tcp)
            .await?;
        let (send, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        Ok::<_, TunnelError>(send)
    };
    let result = first_connect(handshake.await, env.echo_addr).await;
    assert!(
        result.is_err(),
        "no client certificate, no stream: {result:?}"
    );
    let metrics = env.metrics.clone();
    wait_for("server to count the failure", || {
        metrics.handshake_failures("no_client_cert") == 1
    })
    .await;
}

#[tokio::test]
async fn inbound_answers_400_401_503_as_hbone_peers_expect() {
    let env = Start::deny_client().await;
    let client_cert = env.client_certs.get(&id("client")).await.expect("cert");
    let bundle = env.ca.trust_bundle();
    let connect = |authority: String| {
        Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .expect("request")
    };
    let send = raw_hbone(&client_cert, &bundle, &id("server"), env.hbone_addr)
        .await
        .expect("session");

    let get = Request::builder()
        .method(Method::GET)
        .uri(format!("https://{}/", env.echo_addr))
        .body(())
        .expect("request");
    assert_eq!(
        status_of(send.clone(), get).await,
        StatusCode::BAD_REQUEST,
        "only CONNECT"
    );
    assert_eq!(
        status_of(send.clone(), connect("127.0.0.9:80".into())).await,
        StatusCode::BAD_REQUEST,
        "authority must be a local workload's address"
    );
    assert_eq!(
        status_of(send.clone(), connect("echo.default:80".into())).await,
        StatusCode::BAD_REQUEST,
        "authority must be ip:port"
    );
    // Bound and never listening: connects to it are refused for as long as it holds the
    // port. (A dropped listener can live on, accepting, in a child another test is forking.)
    let closed =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    closed
        .bind(&SocketAddr::new(LOCALHOST, 0).into())
        .expect("bind");
    let closed_addr = closed
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("addr");
    assert_eq!(
        status_of(send.clone(), connect(closed_addr.to_string())).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "destination not answering"
    );
    drop(closed);

    let denied_cert = env.client_certs.get(&id("denied")).await.expect("cert");
    let denied = raw_hbone(&denied_cert, &bundle, &id("server"), env.hbone_addr)
        .await
        .expect("session");
    assert_eq!(
        status_of(denied, connect(env.echo_addr.to_string())).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status_of(send, connect(env.echo_addr.to_string())).await,
        StatusCode::OK,
        "an allowed identity still gets through"
    );
    for (reason, count) in [
        (RefusalReason::BadMethod, 1),
        (RefusalReason::NotLocalPod, 1),
        (RefusalReason::BadAuthority, 1),
        (RefusalReason::UpstreamFailed, 1),
        (RefusalReason::HeaderTooLarge, 0),
    ] {
        assert_eq!(env.metrics.refusals(reason), count, "{reason}");
    }
}

fn connect_to(target: SocketAddr) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .expect("request")
}

/// An HBONE session as `client`, with the task driving the connection: it finishes when the
/// server closes the connection.
async fn session(
    env: &Env,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let cert = env.client_certs.get(&id("client")).await.expect("cert");
    let config = tls::client_config(&cert, &env.ca.trust_bundle(), &id("server")).expect("config");
    let tcp = TcpStream::connect(env.hbone_addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(env.hbone_addr.ip().into()), tcp)
        .await
        .expect("TLS");
    let (send, conn) = h2::client::handshake(tls).await.expect("HTTP/2");
    (send, tokio::spawn(conn))
}

/// Generous: only a hung connection takes this long.
const CLOSE_BOUND: Duration = Duration::from_secs(20);

#[tokio::test]
async fn connect_to_another_pod_on_the_node_is_refused_by_this_pods_listener() {
    let env = Env::for_pod(TunnelConfig::default()).await;
    // Pod B answers: before the fix, A's listener dialled it (from A's netns in the agent).
    let other = spawn_echo_on(OTHER_POD).await;
    let (send, _conn) = session(&env).await;
    assert_eq!(
        status_of(send.clone(), connect_to(other)).await,
        StatusCode::BAD_REQUEST,
        "a pod's listener serves that pod only"
    );
    assert_eq!(env.metrics.refusals(RefusalReason::NotLocalPod), 1);
    assert!(
        env.authorizer.seen.lock().expect("lock").is_empty(),
        "refused before authorization"
    );
    assert_eq!(
        status_of(send, connect_to(env.echo_addr)).await,
        StatusCode::OK,
        "its own pod still gets through"
    );

    // The plaintext path of pod A, for a connection to pod B: reset and counted.
    let mut client = plaintext_client_to(&env, other).await;
    let mut buf = [0u8; 1];
    let err = client
        .read(&mut buf)
        .await
        .expect_err("refused with a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(env.metrics.refusals(RefusalReason::NotLocalPod), 2);
}

#[tokio::test]
async fn without_a_pod_the_inbound_serves_every_local_workload() {
    let env = Env::default().await;
    let other = spawn_echo_on(OTHER_POD).await;
    let (send, _conn) = session(&env).await;
    assert_eq!(status_of(send, connect_to(other)).await, StatusCode::OK);
    assert_eq!(env.metrics.refusals(RefusalReason::NotLocalPod), 0);
}

#[tokio::test]
async fn hbone_connection_to_an_address_the_pod_does_not_own_is_reset() {
    let env = Env::for_pod(TunnelConfig::default()).await;
    // The same Inbound, listening on pod B's address.
    let listener = hbone_listener((OTHER_POD, 0));
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(env.inbound.clone().serve(listener));
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 1];
    let err = tcp.read(&mut buf).await.expect_err("reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(env.metrics.refusals(RefusalReason::NotLocalPod), 1);
}

/// The inbound side holds a new HBONE connection's SETTINGS and SETTINGS ACK until a
/// stream task has answered, so that they leave with that answer (`held_writes`). With the
/// hold an hour long the first CONNECT is still answered: the answer sends them, not the
/// hold running out.
#[tokio::test]
async fn the_inbound_side_s_first_answer_sends_its_held_settings() {
    let env = Env::with_config(TunnelConfig {
        first_frames_hold: Duration::from_secs(3600),
        ..TunnelConfig::default()
    })
    .await;
    let cert = env.client_certs.get(&id("client")).await.expect("cert");
    let session = raw_hbone(&cert, &env.ca.trust_bundle(), &id("server"), env.hbone_addr).await;
    let status = tokio::time::timeout(CLOSE_BOUND, first_connect(session, env.echo_addr))
        .await
        .expect("answered, long before the hold would run out")
        .expect("CONNECT");
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_connection_that_never_sends_a_client_hello_is_reset_at_the_deadline() {
    let env = Env::with_config(TunnelConfig {
        tls_handshake_timeout: Duration::from_millis(200),
        ..TunnelConfig::default()
    })
    .await;
    let mut silent = TcpStream::connect(env.hbone_addr).await.expect("connect");
    let mut buf = [0u8; 1];
    let outcome = tokio::time::timeout(CLOSE_BOUND, silent.read(&mut buf))
        .await
        .expect("the server ends the connection");
    assert_eq!(
        outcome.expect_err("a reset, not a clean close").kind(),
        std::io::ErrorKind::ConnectionReset
    );
    assert_eq!(env.metrics.refusals(RefusalReason::HandshakeTimeout), 1);

    // TLS done but no HTTP/2 preface: the same deadline.
    let cert = env.client_certs.get(&id("client")).await.expect("cert");
    let config = tls::client_config(&cert, &env.ca.trust_bundle(), &id("server")).expect("config");
    let tcp = TcpStream::connect(env.hbone_addr).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(env.hbone_addr.ip().into()), tcp)
        .await
        .expect("TLS");
    // The server's SETTINGS may arrive first; what ends the stream must be the reset.
    let mut settings = Vec::new();
    let outcome = tokio::time::timeout(CLOSE_BOUND, tls.read_to_end(&mut settings))
        .await
        .expect("the server ends the connection");
    assert_eq!(
        outcome.expect_err("a reset, not a clean close").kind(),
        std::io::ErrorKind::ConnectionReset
    );
    assert_eq!(env.metrics.refusals(RefusalReason::HandshakeTimeout), 2);
}

/// Issues nothing (a CA that cannot be reached) and hands out `bundle`.
struct UnreachableCa {
    bundle: Arc<TrustBundle>,
}

impl CertificateAuthority for UnreachableCa {
    fn issue(
        &self,
        _id: &SpiffeId,
        _ttl: Duration,
    ) -> BoxFuture<'_, Result<WorkloadCertificate, IdentityError>> {
        Box::pin(async { Err(IdentityError::Ca("the CA cannot be reached".into())) })
    }

    fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.bundle.clone()
    }
}

#[tokio::test]
async fn an_inbound_with_no_certificate_resets_and_counts_the_connection() {
    let ca = LocalCa::generate().expect("CA");
    let server_certs = CertManager::new(
        Arc::new(UnreachableCa {
            bundle: ca.trust_bundle(),
        }),
        Duration::from_secs(3600),
    );
    let metrics = Arc::new(Metrics::new(
        &mut prometheus_client::registry::Registry::default(),
    ));
    let workloads = Arc::new(Workloads(HashMap::from([(
        LOCALHOST,
        LocalWorkload {
            name: "server".into(),
            namespace: "default".into(),
            identity: id("server"),
        },
    )])));
    let inbound = Arc::new(
        Inbound::new(
            server_certs,
            workloads,
            Arc::new(RecordingAuthorizer::default()),
            Arc::new(DirectDialer),
            TunnelConfig::default(),
            false,
        )
        .with_metrics(metrics.clone()),
    );
    let listener = hbone_listener((LOCALHOST, 0));
    let hbone_addr = listener.local_addr().expect("addr");
    tokio::spawn(inbound.serve(listener));

    let mut client = TcpStream::connect(hbone_addr).await.expect("connect");
    let mut buf = Vec::new();
    let outcome = tokio::time::timeout(CLOSE_BOUND, client.read_to_end(&mut buf))
        .await
        .expect("the server ends the connection");
    assert_eq!(
        outcome.expect_err("a reset, not a clean close").kind(),
        std::io::ErrorKind::ConnectionReset
    );
    assert_eq!(metrics.refusals(RefusalReason::NoCertificate), 1);
}

#[tokio::test]
async fn a_connection_without_streams_is_closed_when_idle_and_one_with_a_stream_is_not() {
    let idle = Duration::from_millis(200);
    let env = Env::with_config(TunnelConfig {
        hbone_idle_timeout: idle,
        ..TunnelConfig::default()
    })
    .await;

    // Never opens a stream: closed.
    let (_send, conn) = session(&env).await;
    tokio::time::timeout(CLOSE_BOUND, conn)
        .await
        .expect("the idle connection is closed")
        .expect("join")
        .expect("closed with GOAWAY(NO_ERROR), not an error");
    assert_eq!(env.metrics.refusals(RefusalReason::IdleTimeout), 1);

    // Holds a stream across several idle periods: kept, and closed once the stream ends.
    let (send, conn) = session(&env).await;
    let mut send = send.ready().await.expect("ready");
    let (response, mut tx) = send
        .send_request(connect_to(env.echo_addr), false)
        .expect("send");
    let response = response.await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut rx = response.into_body();
    tokio::time::sleep(idle * 3).await;
    tx.send_data(Bytes::from_static(b"still here"), true)
        .expect("the connection is still open");
    let mut echoed = Vec::new();
    while let Some(chunk) = rx.data().await {
        let chunk = chunk.expect("data");
        let _ = rx.flow_control().release_capacity(chunk.len());
        echoed.extend_from_slice(&chunk);
    }
    assert_eq!(echoed, b"still here");
    assert_eq!(env.metrics.refusals(RefusalReason::IdleTimeout), 1);
    // The client keeps its handle (an h2 client with none left closes by itself).
    drop((tx, rx));
    tokio::time::timeout(CLOSE_BOUND, conn)
        .await
        .expect("closed once idle")
        .expect("join")
        .expect("clean GOAWAY");
    assert_eq!(env.metrics.refusals(RefusalReason::IdleTimeout), 2);
    drop(send);
}

#[tokio::test]
async fn oversized_headers_get_431_logged_and_counted_and_the_connection_lives_on() {
    let env = Env::default().await;
    let (send, _conn) = session(&env).await;
    // Twice the 64 KiB default: accepted before the limit existed.
    let big = Request::builder()
        .method(Method::CONNECT)
        .uri(env.echo_addr.to_string())
        .header("x-pad", "a".repeat(128 * 1024))
        .body(())
        .expect("request");
    assert_eq!(
        status_of(send.clone(), big).await,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(env.metrics.refusals(RefusalReason::HeaderTooLarge), 1);
    assert!(env.authorizer.seen.lock().expect("lock").is_empty());
    assert_eq!(
        status_of(send, connect_to(env.echo_addr)).await,
        StatusCode::OK,
        "the connection is still good"
    );
}

#[tokio::test]
async fn headers_beyond_the_hard_limit_still_leave_a_trace() {
    let env = Env::default().await;
    let (send, conn) = session(&env).await;
    let huge = Request::builder()
        .method(Method::CONNECT)
        .uri(env.echo_addr.to_string())
        .header("x-pad", "a".repeat(1024 * 1024))
        .body(())
        .expect("request");
    let mut send = send.ready().await.expect("ready");
    let outcome = match send.send_request(huge, false) {
        Ok((response, _tx)) => response.await.map(|r| r.status()),
        Err(e) => Err(e),
    };
    // Too big for h2 to even hold: it tears the connection down with GOAWAY, and the
    // refusal is logged and counted as a protocol error (the log line carries h2's detail).
    let err = outcome.expect_err("refused");
    assert!(
        err.is_go_away() && err.is_remote(),
        "GOAWAY from the server: {err:?}"
    );
    let _ = tokio::time::timeout(CLOSE_BOUND, conn).await;
    let metrics = env.metrics.clone();
    wait_for("the refusal to be counted", move || {
        metrics.refusals(RefusalReason::ProtocolError) == 1
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_does_not_speak_http2_is_refused_as_a_protocol_error() {
    let env = Env::default().await;
    let cert = env.client_certs.get(&id("client")).await.expect("cert");
    let config = tls::client_config(&cert, &env.ca.trust_bundle(), &id("server")).expect("config");
    let tcp = TcpStream::connect(env.hbone_addr).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(env.hbone_addr.ip().into()), tcp)
        .await
        .expect("TLS");
    tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(CLOSE_BOUND, tls.read_to_end(&mut rest))
        .await
        .expect("the server ends the connection");
    let metrics = env.metrics.clone();
    wait_for("the refusal to be counted", move || {
        metrics.refusals(RefusalReason::ProtocolError) == 1
    })
    .await;
}

struct Start;
impl Start {
    async fn deny_client() -> Env {
        Env::start(
            TunnelConfig::default(),
            Duration::from_secs(3600),
            vec![id("denied")],
        )
        .await
    }
}

/// Deterministic bytes: both ends regenerate the stream from the seed, so comparing them
/// checks every byte without storing a GiB.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Writes `total` pattern bytes, half-closes, and checks that the same bytes come back
/// followed by EOF.
async fn echo_transfer(client: TcpStream, total: usize, pace: Option<Duration>) {
    const CHUNK: usize = 64 * 1024;
    let (mut r, mut w) = client.into_split();
    let writer = tokio::spawn(async move {
        let mut pattern = Pattern(0x9E37_79B9_7F4A_7C15);
        let mut buf = vec![0u8; CHUNK];
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            pattern.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).await.expect("write");
            left -= n;
            if let Some(pace) = pace {
                tokio::time::sleep(pace).await;
            }
        }
        w.shutdown().await.expect("half-close");
    });
    let mut expected = Pattern(0x9E37_79B9_7F4A_7C15);
    let mut buf = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut received = 0usize;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        // The pattern is generated in 8-byte steps; reads of any size are compared by
        // regenerating exactly the bytes received (buffering the 0-7 byte remainder).
        want.clear();
        want.resize(n, 0);
        expected.fill_exact(&mut want);
        assert_eq!(&buf[..n], &want[..], "corruption at byte {received}");
        received += n;
    }
    assert_eq!(received, total, "everything came back, then EOF");
    writer.await.expect("writer");
}

impl Pattern {
    /// Like `fill`, but for lengths that are not multiples of 8: keeps the unused tail of
    /// the last word for the next call.
    fn fill_exact(&mut self, buf: &mut [u8]) {
        thread_local! {
            static CARRY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        CARRY.with(|carry| {
            let mut carry = carry.borrow_mut();
            let mut i = 0;
            while i < buf.len() {
                if carry.is_empty() {
                    let mut word = [0u8; 8];
                    self.fill(&mut word);
                    carry.extend_from_slice(&word);
                }
                let take = carry.len().min(buf.len() - i);
                buf[i..i + take].copy_from_slice(&carry[..take]);
                carry.drain(..take);
                i += take;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_arrives_intact_with_half_close() {
    let env = Env::default().await;
    let outbound = Arc::new(env.outbound(TunnelConfig::default()));
    let (client, task) = env
        .proxied_client(outbound, env.request("client", "server", env.echo_addr))
        .await;
    echo_transfer(client, 1 << 30, None).await;
    task.await.expect("join").expect("proxy finished cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_transfer_survives_certificate_rotations() {
    let ttl = Duration::from_secs(2);
    let env = Env::start(TunnelConfig::default(), ttl, vec![]).await;
    let outbound = Arc::new(env.outbound(TunnelConfig::default()));
    let first = env.client_certs.get(&id("client")).await.expect("cert");
    let (client, task) = env
        .proxied_client(
            outbound.clone(),
            env.request("client", "server", env.echo_addr),
        )
        .await;
    // ~5 s of paced traffic: long enough for at least two renewals at half of a 2 s TTL.
    echo_transfer(client, 100 * 64 * 1024, Some(Duration::from_millis(50))).await;
    task.await.expect("join").expect("proxy finished cleanly");
    assert!(
        env.client_certs.stats().renewals >= 2,
        "certificates rotated during the transfer: {:?}",
        env.client_certs.stats()
    );
    let now = env.client_certs.get(&id("client")).await.expect("cert");
    assert_ne!(
        now.serial, first.serial,
        "new connections get the renewed certificate"
    );
}

/// Opens `count` streams concurrently, as that many clients arriving at once would.
async fn open_streams_at_once(
    outbound: &Arc<Outbound>,
    request: &OutboundRequest,
    count: usize,
) -> Vec<(h2::SendStream<Bytes>, h2::RecvStream, pool::StreamLease)> {
    let opens = (0..count).map(|_| {
        let outbound = outbound.clone();
        let request = request.clone();
        tokio::spawn(async move { outbound.open_stream(&request).await })
    });
    let mut streams = Vec::new();
    for open in opens {
        streams.push(open.await.expect("join").expect("stream"));
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_share_two_connections_until_idle() {
    let env = Env::default().await;
    let config = TunnelConfig {
        pool_idle_timeout: Duration::from_millis(300),
        ..TunnelConfig::default()
    };
    let outbound = Arc::new(env.outbound(config));
    let request = env.request("client", "server", env.echo_addr);
    let streams = open_streams_at_once(&outbound, &request, 200).await;
    assert_eq!(
        outbound.pooled_connections(),
        2,
        "100 streams per connection"
    );
    drop(streams);
    let pool_outbound = outbound.clone();
    wait_for("idle connections to be released", move || {
        pool_outbound.pooled_connections() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_one_idle_connection_per_destination_stays_pooled() {
    let env = Env::default().await;
    let config = TunnelConfig {
        // The reaper then passes every 5 s; the idle timeout alone would close nothing
        // before 20 s.
        pool_idle_timeout: Duration::from_secs(20),
        ..TunnelConfig::default()
    };
    let outbound = Arc::new(env.outbound(config));
    let request = env.request("client", "server", env.echo_addr);
    let streams = open_streams_at_once(&outbound, &request, 300).await;
    assert_eq!(
        outbound.pooled_connections(),
        3,
        "100 streams per connection"
    );
    drop(streams);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    while outbound.pooled_connections() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "surplus idle connections still pooled: {}",
            outbound.pooled_connections()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The one kept carries the next stream: no new connection.
    let stream = outbound.open_stream(&request).await.expect("stream");
    assert_eq!(outbound.pooled_connections(), 1);
    drop(stream);
}

/// A plaintext client handed to the 15006 path, as sk_lookup would.
async fn plaintext_client(env: &Env) -> TcpStream {
    plaintext_client_to(env, env.echo_addr).await
}

/// A plaintext client whose (sk_lookup) destination is `destination`.
async fn plaintext_client_to(env: &Env, destination: SocketAddr) -> TcpStream {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (accepted, peer) = listener.accept().await.expect("accept");
    // Armed to reset, as the pod's :15006 listener's options arm what it accepts.
    reset_on_close(&accepted);
    let inbound = env.inbound.clone();
    tokio::spawn(async move { inbound.handle_plaintext(accepted, peer, destination).await });
    client
}

#[tokio::test]
async fn plaintext_path_asks_the_authorizer_with_no_identity() {
    let env = Env::default().await;
    let mut client = plaintext_client(&env).await;
    client.write_all(b"plain").await.expect("write");
    client.shutdown().await.expect("half-close");
    let mut echoed = Vec::new();
    client.read_to_end(&mut echoed).await.expect("read");
    assert_eq!(echoed, b"plain");
    let seen = env.authorizer.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].source_identity, None,
        "plaintext carries no identity"
    );
}

#[tokio::test]
async fn plaintext_denied_connection_is_reset() {
    let env = Env::start_with(
        TunnelConfig::default(),
        Duration::from_secs(3600),
        vec![],
        true,
    )
    .await;
    let mut client = plaintext_client(&env).await;
    let mut buf = [0u8; 16];
    let err = client
        .read(&mut buf)
        .await
        .expect_err("a denied connection is reset, not closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

/// Allows until told to deny everything.
#[derive(Default)]
struct Switch(std::sync::atomic::AtomicBool);

impl Authorizer for Switch {
    fn authorize(&self, _conn: &InboundConnection) -> Verdict {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            Verdict::Deny {
                reason: "switched to deny".into(),
            }
        } else {
            Verdict::Allow
        }
    }
}

/// A client proxied through an outbound to an Inbound whose policy `Switch` the caller
/// flips, the Inbound dialling the echo workload through `dialer`.
async fn switchable_proxied_client(
    dialer: Arc<dyn Dialer>,
) -> (Arc<Inbound>, Arc<Switch>, TcpStream) {
    let ca = Arc::new(LocalCa::generate().expect("CA"));
    let ttl = Duration::from_secs(3600);
    let switch = Arc::new(Switch::default());
    let inbound = Arc::new(Inbound::new(
        CertManager::new(ca.clone(), ttl),
        Arc::new(Workloads(HashMap::from([(
            LOCALHOST,
            LocalWorkload {
                name: "server".into(),
                namespace: "default".into(),
                identity: id("server"),
            },
        )]))),
        switch.clone(),
        dialer,
        TunnelConfig::default(),
        false,
    ));
    let listener = hbone_listener((LOCALHOST, 0));
    let hbone_addr = listener.local_addr().expect("addr");
    tokio::spawn(inbound.clone().serve(listener));
    let echo_addr = spawn_echo().await;
    let outbound = Arc::new(Outbound::new(
        CertManager::new(ca, ttl),
        Arc::new(DirectDialer),
        TunnelConfig::default(),
    ));
    let capture = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let client = TcpStream::connect(capture.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (accepted, _) = capture.accept().await.expect("accept");
    // As the outbound listener's options arm every socket it accepts.
    super::reset_on_close(&accepted);
    let request = OutboundRequest {
        source: id("client"),
        source_addr: "127.0.0.1:40000".parse().expect("addr"),
        source_workload: "client".into(),
        destination: id("server"),
        hbone_addr,
        original_destination: echo_addr,
    };
    tokio::spawn(async move {
        outbound
            .proxy(request, accepted, CopyStats::default())
            .await
    });
    (inbound, switch, client)
}

#[tokio::test]
async fn policy_change_revokes_live_connections_it_denies() {
    let (inbound, switch, mut client) = switchable_proxied_client(Arc::new(DirectDialer)).await;

    let mut buf = [0u8; 5];
    client.write_all(b"alive").await.expect("write");
    client
        .read_exact(&mut buf)
        .await
        .expect("echo while allowed");
    assert_eq!(inbound.live_connections(), 1);
    assert_eq!(inbound.revoke_denied(), 0, "still allowed: nothing revoked");

    switch.0.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(inbound.revoke_denied(), 1);
    let mut rest = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("the revoked connection ends promptly");
    assert!(
        outcome.is_err(),
        "a revoked connection is reset, not closed cleanly: {outcome:?}"
    );
    let inbound_done = inbound.clone();
    wait_for("the live set to drop the connection", move || {
        inbound_done.live_connections() == 0
    })
    .await;
}

/// Dials only after `open` is notified, so a test can change the policy while a stream is
/// past its authorization but not yet copying.
struct GatedDialer {
    dialing: tokio::sync::Notify,
    open: tokio::sync::Notify,
}

impl Dialer for GatedDialer {
    fn dial(
        &self,
        target: SocketAddr,
        source: Option<SocketAddr>,
    ) -> BoxFuture<'_, std::io::Result<TcpStream>> {
        Box::pin(async move {
            self.dialing.notify_one();
            self.open.notified().await;
            DirectDialer.dial(target, source).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_during_the_upstream_dial_revokes_the_stream() {
    let dialer = Arc::new(GatedDialer {
        dialing: tokio::sync::Notify::new(),
        open: tokio::sync::Notify::new(),
    });
    let (inbound, switch, mut client) = switchable_proxied_client(dialer.clone()).await;
    client.write_all(b"early").await.expect("write");

    // Authorized under the old policy, now dialling the workload: the new policy denies it.
    tokio::time::timeout(Duration::from_secs(10), dialer.dialing.notified())
        .await
        .expect("the stream reaches its upstream dial");
    switch.0.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        inbound.revoke_denied(),
        1,
        "a stream between its authorization and its copy is revoked too"
    );
    dialer.open.notify_one();

    let mut rest = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("the revoked connection ends promptly");
    assert!(
        outcome.is_err(),
        "the stream the new policy denies is reset, never echoed: {outcome:?}, read {rest:?}"
    );
    let inbound_done = inbound.clone();
    wait_for("the live set to drop the connection", move || {
        inbound_done.live_connections() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pooling_every_connection_gets_its_own_and_nothing_stays_pooled() {
    let env = Env::default().await;
    let outbound = Arc::new(env.outbound(TunnelConfig {
        pooling: false,
        ..TunnelConfig::default()
    }));
    for _ in 0..2 {
        let (mut client, task) = env
            .proxied_client(
                outbound.clone(),
                env.request("client", "server", env.echo_addr),
            )
            .await;
        client.write_all(b"ping").await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut echoed = Vec::new();
        client.read_to_end(&mut echoed).await.expect("read");
        assert_eq!(echoed, b"ping");
        task.await.expect("join").expect("proxy");
        assert_eq!(outbound.pooled_connections(), 0, "nothing kept for reuse");
    }
    assert_eq!(
        env.authorizer.seen.lock().expect("lock").len(),
        2,
        "both connections went through"
    );
}

/// The pool's reaper first runs while the first handshake for a key is still going: the
/// connection that handshake makes must still be pooled and shared, not left in an entry
/// the reaper dropped.
#[tokio::test]
async fn the_first_connection_to_a_destination_is_pooled_and_shared() {
    let env = Env::default().await;
    let outbound = Arc::new(env.outbound(TunnelConfig::default()));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (mut client, task) = env
            .proxied_client(
                outbound.clone(),
                env.request("client", "server", env.echo_addr),
            )
            .await;
        let mut buf = [0u8; 4];
        client.write_all(b"ping").await.expect("write");
        client.read_exact(&mut buf).await.expect("echo");
        clients.push((client, task));
        assert_eq!(outbound.pooled_connections(), 1, "one connection, shared");
    }
}

/// A peer that sends GOAWAY on its two pooled connections while one still carries a
/// stream (and keeps accepting): a new stream goes on a third connection at once, the old
/// stream finishes.
#[tokio::test]
async fn a_new_stream_avoids_pooled_connections_the_peer_is_draining() {
    let env = Env::default().await;
    let outbound = Arc::new(env.outbound(TunnelConfig::default()));
    let (mut held, held_task) = env
        .proxied_client(
            outbound.clone(),
            env.request("client", "server", env.echo_addr),
        )
        .await;
    let mut buf = [0u8; 4];
    held.write_all(b"ping").await.expect("write");
    held.read_exact(&mut buf).await.expect("echo");
    assert_eq!(outbound.pooled_connections(), 1);
    // A burst opens a second connection; once it has gone, both have room for a stream.
    let burst = open_streams_at_once(
        &outbound,
        &env.request("client", "server", env.echo_addr),
        150,
    )
    .await;
    assert_eq!(outbound.pooled_connections(), 2);
    drop(burst);

    env.drain.send(true).expect("drain");
    // Lets the GOAWAY reach the client connection first; the new stream must get through
    // whichever comes first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut client, task) = env
        .proxied_client(
            outbound.clone(),
            env.request("client", "server", env.echo_addr),
        )
        .await;
    client.write_all(b"next").await.expect("write");
    client.shutdown().await.expect("half-close");
    let mut echoed = Vec::new();
    tokio::time::timeout(CLOSE_BOUND, client.read_to_end(&mut echoed))
        .await
        .expect("answered before the setup deadline")
        .expect("read");
    assert_eq!(echoed, b"next");
    task.await.expect("join").expect("proxy");

    held.write_all(b"pong").await.expect("write");
    held.read_exact(&mut buf)
        .await
        .expect("the draining connection still carries its stream");
    assert_eq!(&buf, b"pong");
    held.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).await.expect("read");
    held_task.await.expect("join").expect("proxy");
}

/// The client's last bytes and its FIN come after the server app has already closed its
/// side: the copy ends as soon as they are queued on the stream, and the connection of its
/// own must still deliver them (and END_STREAM) before it closes.
#[tokio::test]
async fn without_pooling_the_clients_last_bytes_arrive_after_the_server_closed_first() {
    let mut env = Env::default().await;
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    env.echo_addr = listener.local_addr().expect("addr");
    let (received_tx, received) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        stream.write_all(b"greeting").await.expect("greet");
        stream.shutdown().await.expect("server half-close");
        let mut got = Vec::new();
        let _ = received_tx.send(stream.read_to_end(&mut got).await.map(|_| got));
    });
    let outbound = Arc::new(env.outbound(TunnelConfig {
        pooling: false,
        ..TunnelConfig::default()
    }));
    let (mut client, task) = env
        .proxied_client(outbound, env.request("client", "server", env.echo_addr))
        .await;
    let mut greeting = Vec::new();
    client.read_to_end(&mut greeting).await.expect("greeting");
    assert_eq!(greeting, b"greeting");
    let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    client.write_all(&payload).await.expect("write");
    client.shutdown().await.expect("client half-close");
    task.await.expect("join").expect("proxy");
    let got = received
        .await
        .expect("server app done")
        .expect("a clean end of stream, not a reset");
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "the bytes arrive intact");
}

#[test]
fn tls_configs_are_reused_until_the_certificate_or_bundle_changes() {
    crate::identity::install_crypto_provider();
    let ca = LocalCa::generate().expect("CA");
    let now = SystemTime::now();
    let first = ca
        .issue_with_validity(&id("server"), now, now + Duration::from_secs(600))
        .expect("cert");
    let bundle = ca.trust_bundle();
    let cache = tls::ConfigCache::<rustls::ServerConfig>::default();
    let build = |cert: &WorkloadCertificate, bundle: &Arc<TrustBundle>| {
        cache
            .get_or_build("server".into(), cert, bundle, |anchors| {
                tls::server_config_for(cert, anchors, "cluster.local")
            })
            .map(|(config, _)| config)
    };
    let a = build(&first, &bundle).expect("config");
    let b = build(&first, &bundle).expect("config");
    assert!(
        Arc::ptr_eq(&a, &b),
        "same certificate and bundle: built once"
    );
    let renewed = ca
        .issue_with_validity(&id("server"), now, now + Duration::from_secs(600))
        .expect("cert");
    let c = build(&renewed, &bundle).expect("config");
    assert!(
        !Arc::ptr_eq(&a, &c),
        "a renewed certificate gets a new config"
    );
    let copy = Arc::new(TrustBundle::clone(&bundle));
    assert!(
        Arc::ptr_eq(&c, &build(&renewed, &copy).expect("config")),
        "an equal bundle in another allocation is the same bundle"
    );
    let mut rotated = TrustBundle::clone(&bundle);
    rotated.extend(
        LocalCa::generate()
            .expect("CA")
            .trust_bundle()
            .roots
            .clone(),
    );
    let rotated = Arc::new(rotated);
    let d = build(&renewed, &rotated).expect("config");
    assert!(
        !Arc::ptr_eq(&c, &d),
        "a changed trust bundle gets a new config"
    );
}

/// The request-head check the inbound path (and its fuzz target) runs, branch by branch.
#[test]
fn connect_request_check_decides_each_refusal() {
    let connect = |authority: &str| {
        Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .expect("request")
    };
    let mut ok = connect("10.0.0.2:8080");
    ok.headers_mut().insert(
        "forwarded",
        "for=\"10.0.0.1:40000\"".parse().expect("header value"),
    );
    assert_eq!(
        check_connect_request(&ok, 1024),
        Ok(ConnectRequest {
            target: "10.0.0.2:8080".parse().expect("addr"),
            forwarded: Some("10.0.0.1:40000".parse().expect("addr")),
        })
    );
    let refusal = |request: &Request<()>, limit| {
        let r = check_connect_request(request, limit).expect_err("refused");
        (r.reason, r.status)
    };
    assert_eq!(
        refusal(&ok, 64),
        (
            RefusalReason::HeaderTooLarge,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        )
    );
    let get = Request::builder()
        .method(Method::GET)
        .uri("https://10.0.0.2:8080/")
        .body(())
        .expect("request");
    assert_eq!(
        refusal(&get, 1024),
        (RefusalReason::BadMethod, StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        refusal(&connect("checkout.shop:8080"), 1024),
        (RefusalReason::BadAuthority, StatusCode::BAD_REQUEST)
    );
    assert_eq!(
        refusal(&connect("10.0.0.2:15008"), 1024),
        (RefusalReason::BadAuthority, StatusCode::BAD_REQUEST),
        "the mesh's own port is no CONNECT target"
    );
}

/// Two ambit ends agree on AES-128-GCM with SHA-256 (the cheaper suite); a peer that offers
/// only AES-256-GCM with SHA-384 (as a stricter HBONE implementation may) still connects,
/// and so does one that offers only AES-128; records then flow both ways.
#[tokio::test]
async fn hbone_ends_prefer_aes_128_and_still_accept_an_aes_256_only_peer() {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    use rustls::crypto::aws_lc_rs::cipher_suite as aws_lc;
    crate::identity::install_crypto_provider();
    let ca = LocalCa::generate().expect("CA");
    let now = SystemTime::now();
    let validity = now + Duration::from_secs(600);
    let client = ca
        .issue_with_validity(&id("client"), now, validity)
        .expect("cert");
    let server = ca
        .issue_with_validity(&id("server"), now, validity)
        .expect("cert");
    let bundle = ca.trust_bundle();
    let ours = Arc::new(tls::server_config(&server, &bundle, "cluster.local").expect("config"));

    /// Handshakes, then one record each way; the suite the client negotiated.
    async fn negotiate(
        client: rustls::ClientConfig,
        server: Arc<rustls::ServerConfig>,
    ) -> rustls::CipherSuite {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = ServerName::IpAddress(LOCALHOST.into());
        let (connected, accepted) = tokio::join!(
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, a),
            tokio_rustls::TlsAcceptor::from(server).accept(b),
        );
        let mut connected = connected.expect("client handshake");
        let mut accepted = accepted.expect("server handshake");
        let mut got = [0u8; 4];
        connected.write_all(b"ping").await.expect("client write");
        connected.flush().await.expect("client flush");
        accepted.read_exact(&mut got).await.expect("server read");
        assert_eq!(&got, b"ping");
        accepted.write_all(b"pong").await.expect("server write");
        accepted.flush().await.expect("server flush");
        connected.read_exact(&mut got).await.expect("client read");
        assert_eq!(&got, b"pong");
        connected
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .expect("suite")
            .suite()
    }

    let default_client = tls::client_config(&client, &bundle, &id("server")).expect("config");
    assert_eq!(
        negotiate(default_client, ours.clone()).await,
        TLS13_AES_128_GCM_SHA256
    );

    // Clients restricted to one suite. Our own server verifier is private to
    // `tls`: WebPKI's stands in, minus the name check (HBONE identities are URI SANs, not
    // names).
    let only = |suite: rustls::SupportedCipherSuite| {
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(bundle.root_store().expect("roots")),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NameAgnostic(webpki)))
            .with_client_auth_cert(client.chain.clone(), client.key.clone_key())
            .expect("client certificate");
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    };
    assert_eq!(
        negotiate(only(aws_lc::TLS13_AES_256_GCM_SHA384), ours.clone()).await,
        TLS13_AES_256_GCM_SHA384
    );
    assert_eq!(
        negotiate(only(aws_lc::TLS13_AES_128_GCM_SHA256), ours).await,
        TLS13_AES_128_GCM_SHA256
    );
}

/// WebPKI server verification minus the name check.
#[derive(Debug)]
struct NameAgnostic(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for NameAgnostic {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[tokio::test]
async fn a_peer_that_stalls_the_handshake_gets_the_client_reset_at_the_setup_deadline() {
    let env = Env::default().await;
    // Accepts and holds every connection without a byte: the TLS handshake never ends.
    let silent = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let (held_tx, mut held_rx) = tokio::sync::mpsc::unbounded_channel();
    let held = tokio::spawn(async move {
        while let Ok((stream, _)) = silent.accept().await {
            let _ = held_tx.send(stream);
        }
    });
    let config = TunnelConfig {
        connect_timeout: Duration::from_millis(100),
        tls_handshake_timeout: Duration::from_millis(100),
        ..TunnelConfig::default()
    };
    let outbound = Arc::new(env.outbound(config));
    let mut request = env.request("client", "server", env.echo_addr);
    request.hbone_addr = silent_addr;
    let (mut client, task) = env.proxied_client(outbound, request).await;

    let mut buf = [0u8; 1];
    let outcome = tokio::time::timeout(CLOSE_BOUND, client.read(&mut buf))
        .await
        .expect("the agent ends the client's connection");
    assert_eq!(
        outcome.expect_err("a reset, not a clean close").kind(),
        std::io::ErrorKind::ConnectionReset
    );
    let err = task.await.expect("join").expect_err("setup fails");
    assert!(
        matches!(&err, TunnelError::NotCarried(cause) if matches!(**cause, TunnelError::SetupTimeout { addr, after } if addr == silent_addr && after == Duration::from_millis(200))),
        "{err:?}"
    );
    // The abandoned HBONE connection is reset too, not closed as if the handshake had ended.
    let mut stalled = held_rx.recv().await.expect("the HBONE dial was accepted");
    let mut rest = Vec::new();
    let outcome = tokio::time::timeout(CLOSE_BOUND, stalled.read_to_end(&mut rest))
        .await
        .expect("the agent ends the abandoned HBONE connection");
    assert_eq!(
        outcome.expect_err("a reset, not a clean close").kind(),
        std::io::ErrorKind::ConnectionReset,
        "the peer saw {rest:?} first"
    );
    held.abort();
}

/// A uniquely named network namespace, deleted on drop (also when the test fails).
struct ScratchNetns(String);

impl ScratchNetns {
    fn create() -> Option<Self> {
        let name = format!(
            "ambit-test-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(name))
    }

    fn run(&self, args: &[&str]) {
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .status()
            .expect("running ip netns exec");
        assert!(status.success(), "{args:?} failed in {}", self.0);
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// Source-preserving dials to different destinations share source ports, as plain
/// connect()s do: the port is picked per 4-tuple at connect time. A bind() that picked it
/// would hold a port of the range per connection whatever the destination (and skip ports in
/// TIME_WAIT), which exhausted the range under a stream of short upstream connections.
#[tokio::test]
async fn preserved_source_dials_share_ports_across_destinations() {
    let Some(ns) = ScratchNetns::create() else {
        eprintln!("skipping: cannot create a network namespace (needs root)");
        return;
    };
    ns.run(&["ip", "link", "set", "lo", "up"]);
    // Two ports for outgoing connections: without port sharing, at most two connect.
    ns.run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40001"]);
    const DESTINATIONS: usize = 4;
    let netns = crate::netns::NetNs::open(format!("/run/netns/{}", ns.0)).expect("open netns");
    let (listeners, sockets) = netns
        .run(|| {
            // Fixed ports: port 0 would take them from the tiny range.
            let listeners = (0..DESTINATIONS as u16)
                .map(|i| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 5001 + i)))
                .collect::<std::io::Result<Vec<_>>>()?;
            let sockets = (0..DESTINATIONS)
                .map(|_| {
                    let s = socket2::Socket::new(
                        socket2::Domain::IPV4,
                        socket2::Type::STREAM.nonblocking(),
                        None,
                    )?;
                    Ok(std::net::TcpStream::from(s))
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok((listeners, sockets))
        })
        .expect("sockets inside the namespace");
    let mut streams = Vec::new();
    for (listener, socket) in listeners.iter().zip(sockets) {
        let target = listener.local_addr().expect("listener address");
        let stream = connect_from(
            TcpSocket::from_std_stream(socket),
            target,
            Some(SocketAddr::new(LOCALHOST, 0)),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "dial {} of {DESTINATIONS} to {target}: {e}",
                streams.len() + 1
            )
        });
        let local = stream.local_addr().expect("local address");
        assert_eq!(
            local.ip(),
            LOCALHOST,
            "bound to the preserved source address"
        );
        assert!(
            (40000..=40001).contains(&local.port()),
            "port {} outside the namespace's range",
            local.port()
        );
        streams.push(stream);
    }
    assert_eq!(streams.len(), DESTINATIONS);
}

/// Forwards TCP connections to `target` until frozen, then holds them open and silent, like
/// a peer whose node vanished: no FIN, no reset, no answer (the kernel still ACKs).
async fn spawn_freezable_relay(
    target: SocketAddr,
) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind relay");
    let addr = listener.local_addr().expect("addr");
    let (freeze, frozen) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut near, _)) = listener.accept().await {
            let mut frozen = frozen.clone();
            tokio::spawn(async move {
                let Ok(mut far) = TcpStream::connect(target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut near, &mut far) => {}
                    _ = async { frozen.wait_for(|frozen| *frozen).await.map(drop) } => {
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    (addr, freeze)
}

/// An echo server that reports how each connection ended: `Ok` at EOF, else the error.
async fn spawn_reporting_echo() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<std::io::Result<()>>,
) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    let (report, reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let ended = loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            if let Err(e) = stream.write_all(&buf[..n]).await {
                                break Err(e);
                            }
                        }
                        Err(e) => break Err(e),
                    }
                };
                let _ = report.send(ended);
            });
        }
    });
    (addr, reports)
}

/// Short enough for a test, with an answer window no loaded machine misses.
fn quick_keepalive() -> TunnelConfig {
    TunnelConfig {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_secs(2),
        ..TunnelConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_silent_is_dropped_and_its_workload_connection_reset() {
    let env = Env::with_config(quick_keepalive()).await;
    let (relay, freeze) = spawn_freezable_relay(env.hbone_addr).await;
    let (workload, mut ended) = spawn_reporting_echo().await;
    // The client side would ping only after 10 s: the server's keepalive is what acts.
    let outbound = Arc::new(env.outbound(TunnelConfig::default()));
    let mut request = env.request("client", "server", workload);
    request.hbone_addr = relay;
    let (mut client, _task) = env.proxied_client(outbound, request).await;
    let mut buf = [0u8; 5];
    client.write_all(b"alive").await.expect("write");
    client
        .read_exact(&mut buf)
        .await
        .expect("echo through the relay");
    // Several PINGs answered: a live peer is not dropped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.write_all(b"still").await.expect("write");
    client.read_exact(&mut buf).await.expect("echo after PINGs");
    assert_eq!(env.metrics.keepalive_timeouts("server").get(), 0);

    freeze.send_replace(true);
    let outcome = tokio::time::timeout(Duration::from_secs(20), ended.recv())
        .await
        .expect("the workload's connection ends once the silent client is dropped")
        .expect("a report");
    let error = outcome.expect_err("a reset, not a clean close");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    assert_eq!(env.metrics.keepalive_timeouts("server").get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_goes_silent_is_dropped_and_the_client_reset() {
    let env = Env::default().await;
    let (relay, freeze) = spawn_freezable_relay(env.hbone_addr).await;
    let outbound = Arc::new(
        env.outbound(quick_keepalive())
            .with_metrics(env.metrics.clone()),
    );
    let mut request = env.request("client", "server", env.echo_addr);
    request.hbone_addr = relay;
    let (mut client, task) = env.proxied_client(outbound, request).await;
    let mut buf = [0u8; 5];
    client.write_all(b"alive").await.expect("write");
    client
        .read_exact(&mut buf)
        .await
        .expect("echo through the relay");
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.write_all(b"still").await.expect("write");
    client.read_exact(&mut buf).await.expect("echo after PINGs");
    assert_eq!(env.metrics.keepalive_timeouts("client").get(), 0);

    freeze.send_replace(true);
    let mut rest = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut rest))
        .await
        .expect("the client's connection ends once the silent server is dropped");
    let error = outcome.expect_err("a reset, not a clean close");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    assert_eq!(env.metrics.keepalive_timeouts("client").get(), 1);
    assert!(
        task.await.expect("proxy task").is_err(),
        "the proxy reports the failure"
    );
}
