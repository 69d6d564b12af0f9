//! The running agent: takes the mesh state from its source (the local-mode file or the
//! Kubernetes API), enrolls this node's pods, opens their in-pod listeners and connects
//! capture, tunnel and policy. `ambit run` calls [`run`].
//!
//! Every source hands over whole [`MeshState`] snapshots through one channel, and
//! [`Agent::apply`] is the one update: it swaps the state (routing, workloads and the
//! policies the authorizer reads, all in one `Arc`), then makes the enrolled pods match.

mod cli;
mod cni;
mod enroll;
mod heap;
mod pod;
mod sockets;
mod view;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::capture::{Capture, CaptureConfig};
use crate::config::{ConfigWatcher, MeshSettings, MeshSpec, MeshState};
use crate::identity::{CertManager, LocalCa};
use crate::k8s::KubeSource;
use crate::observability::{Admin, Listeners, LogControl};
use crate::policy::{PolicyAuthorizer, PolicySet, PolicySource};
use crate::tunnel::{LocalWorkload, LocalWorkloads, TunnelConfig, WorkloadMeta};

pub use cli::RunArgs;
pub use pod::PodKey;

/// Everything `ambit run` needs; flags map onto these one to one ([`RunArgs`]). Serialized
/// whole as the config dump's `config` and the start-up log's effective options, so a new
/// field shows up there by itself; nothing in here may hold a secret (paths to them only).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentOptions {
    pub node: String,
    pub source: SourceOptions,
    #[serde(serialize_with = "crate::observability::readable::path")]
    pub pin_dir: PathBuf,
    #[serde(serialize_with = "crate::observability::readable::path")]
    pub state_dir: PathBuf,
    /// A CA service to ask for certificates; when set, `ca_cert`/`ca_key` are unused.
    pub remote_ca: Option<crate::identity::RemoteCaConfig>,
    /// CA certificate and key (PEM); when absent a root is created once in `state_dir`.
    #[serde(serialize_with = "crate::observability::readable::option_path")]
    pub ca_cert: Option<PathBuf>,
    /// The key's path only; the key is read by the CA, never kept here.
    #[serde(serialize_with = "crate::observability::readable::option_path")]
    pub ca_key: Option<PathBuf>,
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub cert_ttl: Duration,
    pub tunnel: TunnelConfig,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    /// How long a drain waits for open connections before closing them.
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub drain_deadline: Duration,
    /// The live log filter, for `/logging`; `None` when logging is set up elsewhere.
    #[serde(skip)] // a handle on the log filter, not a setting (`/logging` shows it)
    pub log: Option<LogControl>,
    /// Most verbose level of the eBPF programs' own log messages.
    #[serde(serialize_with = "crate::observability::readable::display")]
    pub ebpf_log_level: tracing::Level,
    /// Local legs (app <-> agent inside a pod) move their bytes through the sockmap
    /// rather than loopback TCP.
    pub sockmap: bool,
    /// Threads that run connections (`tunnel::Shards`).
    pub worker_threads: usize,
    /// The container's CPU limit as given (`--cpu-limit-millis`), which lowered the
    /// default of `worker_threads`.
    pub cpu_limit_millis: Option<u64>,
}

/// Where the mesh state comes from.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SourceOptions {
    /// A local-mode file, watched (docs/LOCAL-MODE.md).
    #[serde(rename_all = "camelCase")]
    File {
        /// Named `config` in the dump, after its flag.
        #[serde(
            rename = "config",
            serialize_with = "crate::observability::readable::path"
        )]
        path: PathBuf,
        #[serde(serialize_with = "crate::observability::readable::duration")]
        reload_interval: Duration,
    },
    /// The Kubernetes API (docs/KUBERNETES.md).
    Kubernetes(KubernetesOptions),
}

#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesOptions {
    /// `None`: in-cluster configuration, or `KUBECONFIG`.
    #[serde(serialize_with = "crate::observability::readable::option_path")]
    pub kubeconfig: Option<PathBuf>,
    pub settings: MeshSettings,
    /// The host's /proc (`/host/proc` in the DaemonSet), scanned for pods' netns.
    #[serde(serialize_with = "crate::observability::readable::path")]
    pub proc_root: PathBuf,
    /// Unix socket the `ambit-cni` plugin asks; `None`: no CNI plugin.
    #[serde(serialize_with = "crate::observability::readable::option_path")]
    pub cni_socket: Option<PathBuf>,
    /// File listing the opted-in namespaces, for the CNI plugin when the agent is away.
    #[serde(serialize_with = "crate::observability::readable::option_path")]
    pub namespaces_file: Option<PathBuf>,
    /// Keep ambit-cni chained in the node's CNI config; `None`: the init container's chain
    /// is left as it is.
    pub cni_chain: Option<Box<crate::cni::watch::ChainWatch>>,
}

/// Which source the state in force came from and when it last changed.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceInfo {
    /// `file` or `kubernetes`.
    pub kind: &'static str,
    /// The file's path, or the API server's address.
    pub origin: String,
    /// Seconds since the Unix epoch; 0 before the first state.
    pub last_change_unix: u64,
}

/// What every pod runtime shares.
pub(crate) struct Shared {
    pub capture: Mutex<Capture>,
    pub certs: CertManager,
    pub authorizer: Arc<PolicyAuthorizer>,
    /// The one current mesh state; the authorizer reads its policies and labels from it.
    /// Connections load it without a lock, so a state swap never makes one wait.
    pub state: Arc<ArcSwap<MeshState>>,
    pub source: Mutex<SourceInfo>,
    pub tunnel: TunnelConfig,
    pub metrics: Arc<crate::tunnel::Metrics>,
    /// Turns true when the agent drains.
    pub drain: watch::Receiver<bool>,
    /// The threads that run connections.
    pub shards: Arc<crate::tunnel::Shards>,
}

impl Shared {
    pub fn state(&self) -> Arc<MeshState> {
        self.state.load_full()
    }

    pub fn source(&self) -> SourceInfo {
        self.source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The mesh state's local workloads, as the tunnel's inbound side asks for them.
struct StateWorkloads(Arc<Shared>);

impl LocalWorkloads for StateWorkloads {
    fn by_ip(&self, ip: IpAddr) -> Option<LocalWorkload> {
        let state = self.0.state();
        let w = state.workload_by_ip(ip)?;
        (w.node == state.node && w.in_mesh).then(|| LocalWorkload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity: w.identity.clone(),
        })
    }

    fn describe(&self, ip: IpAddr) -> Option<WorkloadMeta> {
        self.0.state().workload_by_ip(ip).map(|w| view::meta_of(w))
    }

    /// Both answers come from the state in force, and a change swaps it whole.
    fn describe_epoch(&self) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        Some(self.0.state())
    }
}

/// Policies and workload labels from the one current state.
struct StatePolicies(Arc<ArcSwap<MeshState>>);

impl PolicySource for StatePolicies {
    fn policies(&self) -> Arc<PolicySet> {
        self.0.load().policies().clone()
    }

    fn policies_and_labels(
        &self,
        workload: &LocalWorkload,
    ) -> (Arc<PolicySet>, BTreeMap<String, String>) {
        let state = self.0.load();
        let labels = state
            .workload_by_name(&workload.namespace, &workload.name)
            .map(|w| w.labels.clone())
            .unwrap_or_default();
        (state.policies().clone(), labels)
    }
}

/// The state before a source has said anything: no workloads, no policies.
fn empty_state(settings: MeshSettings, node: &str) -> anyhow::Result<MeshState> {
    Ok(MeshState::build(
        MeshSpec {
            settings,
            namespaces: BTreeMap::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            policies: PolicySet::from_documents(Vec::new(), "default", "istio-system")?.0,
            warnings: Vec::new(),
        },
        node,
    )?)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    crate::identity::install_crypto_provider();
    // Once, on one line: what this agent runs with, flags and defaults alike.
    match serde_json::to_string(&options) {
        Ok(json) => info!(options = %json, "effective options"),
        Err(e) => warn!(error = %e, "cannot serialize the effective options"),
    }
    let (tx, mut rx) = watch::channel(Arc::new(empty_state(
        MeshSettings::default(),
        &options.node,
    )?));
    // The first state: the file's, at once; the cluster's, once every kind is listed.
    let (initial, source_info, kube) = match &options.source {
        SourceOptions::File {
            path,
            reload_interval,
        } => {
            let watcher = ConfigWatcher::new(path.clone(), options.node.clone(), *reload_interval);
            let (text, state) = watcher
                .load()
                .with_context(|| format!("loading {}", path.display()))?;
            let state = Arc::new(state);
            tx.send_replace(state.clone());
            tokio::spawn(watcher.run(text, tx));
            let info = SourceInfo {
                kind: "file",
                origin: path.display().to_string(),
                last_change_unix: now_unix(),
            };
            (Some(state), info, None)
        }
        SourceOptions::Kubernetes(k) => {
            let client = crate::k8s::client(k.kubeconfig.as_deref()).await?;
            let origin = client.default_namespace().to_owned();
            let source = KubeSource::new(client, options.node.clone(), k.settings.clone());
            tokio::spawn(source.clone().run(tx));
            let info = SourceInfo {
                kind: "kubernetes",
                origin: format!("API server (default namespace {origin})"),
                last_change_unix: 0,
            };
            (None, info, Some((source, k.clone())))
        }
    };
    rx.mark_unchanged();
    let state = match &initial {
        Some(state) => state.clone(),
        None => rx.borrow().clone(),
    };
    info!(node = %options.node, source = source_info.kind, origin = %source_info.origin, "starting");

    let ca: Arc<dyn crate::identity::CertificateAuthority> =
        match (&options.remote_ca, &options.ca_cert, &options.ca_key) {
            (Some(remote), _, _) => {
                info!(address = %remote.address, "certificates from a CA service");
                Arc::new(crate::identity::RemoteCa::new(remote.clone())?)
            }
            (None, Some(cert), Some(key)) => Arc::new(LocalCa::load(cert, key)?),
            (None, None, None) => Arc::new(LocalCa::load_or_create(&options.state_dir)?),
            _ => anyhow::bail!("--ca-cert and --ca-key go together"),
        };
    let certs = CertManager::new(ca, options.cert_ttl);
    let excluded_ports = match &kube {
        Some((_, k)) => k.settings.excluded_ports.clone(),
        None => state.excluded_ports.clone(),
    };
    let mut capture = Capture::attach(&CaptureConfig {
        pin_dir: options.pin_dir.clone(),
        cgroup: None,
        excluded_ports,
        ebpf_log_level: options.ebpf_log_level,
        sockmap: options.sockmap,
    })
    .context("attaching the capture programs")?;
    if let Some(logger) = capture.take_ebpf_logger() {
        tokio::spawn(forward_ebpf_logs(logger));
    }

    // Bound first, so that readiness answers (503) while pods are being enrolled.
    let listeners = Listeners::bind(
        options.admin_addr,
        options.metrics_addr,
        options.readiness_addr,
    )
    .await?;
    let (admin_addr, metrics_addr, readiness_addr) = listeners.addrs()?;
    let mut registry = prometheus_client::registry::Registry::default();
    let tunnel_metrics = Arc::new(crate::tunnel::Metrics::new(&mut registry));
    let (drain_tx, mut drain_rx) = watch::channel(false);
    if let Some(chain) = kube.as_ref().and_then(|(_, k)| k.cni_chain.clone()) {
        let metrics = crate::cni::watch::ChainMetrics::new(&mut registry);
        info!(conf_dir = %chain.chain.conf_dir.display(), "keeping ambit-cni chained");
        // Ends when the agent drains, so an uninstall after shutdown is never undone.
        tokio::spawn((*chain).run(metrics, drain_rx.clone()));
    }

    let current_state = Arc::new(ArcSwap::new(state.clone()));
    let authorizer = Arc::new(PolicyAuthorizer::from_source(Arc::new(StatePolicies(
        current_state.clone(),
    ))));
    let shared = Arc::new(Shared {
        capture: Mutex::new(capture),
        certs,
        authorizer,
        state: current_state,
        source: Mutex::new(source_info),
        tunnel: options.tunnel.clone(),
        metrics: tunnel_metrics.clone(),
        drain: drain_rx.clone(),
        shards: Arc::new(
            crate::tunnel::Shards::start(options.worker_threads)
                .context("starting the data path's threads")?,
        ),
    });
    tokio::spawn(heap::release_after_load(tunnel_metrics.clone()));
    let mut agent = enroll::Agent::new(
        shared.clone(),
        kube.as_ref().map(|(source, k)| enroll::KubeParts {
            source: source.clone(),
            status: crate::k8s::StatusWriter::spawn(source.client().clone()),
            proc_root: k.proc_root.clone(),
            namespaces_file: k.namespaces_file.clone(),
        }),
    );
    let view = Arc::new(view::View {
        shared: shared.clone(),
        options: options.clone(),
        agent_metrics: crate::observability::AgentMetrics::new(&mut registry),
        policy_metrics: crate::policy::metrics::Metrics::new(&mut registry),
        cert_metrics: crate::identity::metrics::Metrics::new(&mut registry),
        started: std::sync::atomic::AtomicBool::new(false),
        enrollment: agent.problems(),
        kube: kube.as_ref().map(|(source, _)| source.clone()),
    });
    let admin = Arc::new(Admin::new(
        view.clone(),
        registry,
        options.log.clone(),
        drain_tx.clone(),
    ));
    listeners.spawn(admin);
    info!(%admin_addr, %metrics_addr, %readiness_addr, "observability endpoints listening");

    if let Some(state) = initial {
        agent.apply(state).await;
        view.started
            .store(true, std::sync::atomic::Ordering::Release);
        info!(enrolled = agent.enrolled(), "ready");
    }
    // Entries left in the pinned map by an earlier run for pods that are gone now. In
    // Kubernetes mode this waits for the first complete state (see below).
    let mut stale_checked = kube.is_none();
    if stale_checked {
        agent.forget_stale_enrollments();
    }
    let mut cni_requests = match kube.as_ref().and_then(|(_, k)| k.cni_socket.clone()) {
        Some(path) => Some(agent.serve_cni(&path).await?),
        None => None,
    };

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let retry = agent.retry_delay();
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let state = rx.borrow_and_update().clone();
                agent.apply(state).await;
                if !stale_checked {
                    agent.forget_stale_enrollments();
                    stale_checked = true;
                    view.started.store(true, std::sync::atomic::Ordering::Release);
                    info!(enrolled = agent.enrolled(), "ready");
                }
            }
            () = sleep_or_forever(retry) => agent.retry().await,
            Some(request) = recv_or_forever(&mut cni_requests) => agent.cni_request(request).await,
            _ = drain_rx.wait_for(|d| *d) => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    agent.drain(&drain_tx, options.drain_deadline).await;
    // Pins stay: enrolled pods fail closed until an agent is back.
    info!("shutting down; capture stays pinned (fail closed)");
    Ok(())
}

async fn sleep_or_forever(delay: Option<Duration>) {
    match delay {
        Some(delay) => tokio::time::sleep(delay).await,
        None => std::future::pending().await,
    }
}

async fn recv_or_forever<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Moves the eBPF programs' log records (aya-log's ring buffer) into the agent's log as
/// they arrive.
async fn forward_ebpf_logs(logger: crate::capture::EbpfLogger) {
    let mut ring = match crate::sys::async_readable(logger) {
        Ok(ring) => ring,
        Err(e) => {
            warn!(error = %e, "cannot poll the eBPF log ring");
            return;
        }
    };
    loop {
        let Ok(mut ready) = ring.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}
