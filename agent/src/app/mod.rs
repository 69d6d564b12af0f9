//! The running agent: reads the mesh state, enrolls this node's pods, opens their in-pod
//! listeners and connects capture, tunnel and policy. `ambit run` calls [`run`].

mod pod;
mod sockets;
mod view;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::capture::{Capture, CaptureConfig};
use crate::config::{ConfigWatcher, MeshState};
use crate::identity::{CertManager, LocalCa};
use crate::observability::{Admin, Listeners, LogControl};
use crate::policy::PolicyAuthorizer;
use crate::tunnel::{LocalWorkload, LocalWorkloads, TunnelConfig, WorkloadMeta};

pub use pod::PodKey;

/// Everything `ambit run` needs; flags map onto these one to one.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node: String,
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    /// CA certificate and key (PEM); when absent a root is created once in `state_dir`.
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub cert_ttl: Duration,
    pub reload_interval: Duration,
    pub tunnel: TunnelConfig,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    /// How long a drain waits for open connections before closing them.
    pub drain_deadline: Duration,
    /// The live log filter, for `/logging`; `None` when logging is set up elsewhere.
    pub log: Option<LogControl>,
    /// Most verbose level of the eBPF programs' own log messages.
    pub ebpf_log_level: tracing::Level,
}

/// What every pod runtime shares.
pub(crate) struct Shared {
    pub capture: Mutex<Capture>,
    pub certs: CertManager,
    pub authorizer: Arc<PolicyAuthorizer>,
    /// The one current mesh state; the policy authorizer's label lookup reads it too.
    pub state: Arc<RwLock<Arc<MeshState>>>,
    pub tunnel: TunnelConfig,
    pub metrics: Arc<crate::tunnel::Metrics>,
    /// Turns true when the agent drains.
    pub drain: watch::Receiver<bool>,
}

impl Shared {
    pub fn state(&self) -> Arc<MeshState> {
        self.state
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
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
}

pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    crate::identity::install_crypto_provider();
    let watcher = ConfigWatcher::new(
        options.config.clone(),
        options.node.clone(),
        options.reload_interval,
    );
    let (text, state) = watcher
        .load()
        .with_context(|| format!("loading {}", options.config.display()))?;
    let state = Arc::new(state);
    info!(node = %options.node, config = %options.config.display(), pods = state.local_pods().count(), "starting");

    let ca = match (&options.ca_cert, &options.ca_key) {
        (Some(cert), Some(key)) => LocalCa::load(cert, key)?,
        (None, None) => LocalCa::load_or_create(&options.state_dir)?,
        _ => anyhow::bail!("--ca-cert and --ca-key go together"),
    };
    let certs = CertManager::new(Arc::new(ca), options.cert_ttl);
    let mut capture = Capture::attach(&CaptureConfig {
        pin_dir: options.pin_dir.clone(),
        cgroup: None,
        excluded_ports: state.excluded_ports.clone(),
        ebpf_log_level: options.ebpf_log_level,
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

    let current_state: Arc<RwLock<Arc<MeshState>>> = Arc::new(RwLock::new(state.clone()));
    let labels_lookup = {
        let current_state = current_state.clone();
        Arc::new(move |w: &LocalWorkload| -> BTreeMap<String, String> {
            let Ok(state) = current_state.read() else {
                return BTreeMap::new();
            };
            state
                .workload_by_name(&w.namespace, &w.name)
                .map(|e| e.labels.clone())
                .unwrap_or_default()
        })
    };
    let authorizer = Arc::new(PolicyAuthorizer::new(
        (**state.policies()).clone(),
        labels_lookup,
    ));
    let shared = Arc::new(Shared {
        capture: Mutex::new(capture),
        certs,
        authorizer,
        state: current_state,
        tunnel: options.tunnel.clone(),
        metrics: tunnel_metrics.clone(),
        drain: drain_rx.clone(),
    });
    let view = Arc::new(view::View {
        shared: shared.clone(),
        options: options.clone(),
        agent_metrics: crate::observability::AgentMetrics::new(&mut registry),
        policy_metrics: crate::policy::metrics::Metrics::new(&mut registry),
        cert_metrics: crate::identity::metrics::Metrics::new(&mut registry),
        started: std::sync::atomic::AtomicBool::new(false),
    });
    let admin = Arc::new(Admin::new(
        view.clone(),
        registry,
        options.log.clone(),
        drain_tx.clone(),
    ));
    listeners.spawn(admin);
    info!(%admin_addr, %metrics_addr, %readiness_addr, "observability endpoints listening");

    let mut pods: HashMap<PodKey, pod::PodRuntime> = HashMap::new();
    reconcile(&shared, &mut pods, &state).await;
    // Entries left in the pinned map by an earlier run for pods that are gone now.
    forget_stale_enrollments(&shared, &pods);
    view.started
        .store(true, std::sync::atomic::Ordering::Release);
    info!(enrolled = pods.len(), "ready");

    let (tx, mut rx) = watch::channel(state);
    tokio::spawn(watcher.run(text, tx));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let state = rx.borrow_and_update().clone();
                if let Ok(mut s) = shared.state.write() {
                    *s = state.clone();
                }
                shared.authorizer.replace((**state.policies()).clone());
                reconcile(&shared, &mut pods, &state).await;
                if state.revoke_on_policy_change {
                    let revoked: usize = pods.values().map(pod::PodRuntime::revoke_denied).sum();
                    if revoked > 0 {
                        info!(revoked, "live connections closed after a policy change");
                    }
                }
                info!(enrolled = pods.len(), "configuration applied");
            }
            _ = drain_rx.wait_for(|d| *d) => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    drain(&shared, &pods, &drain_tx, options.drain_deadline).await;
    // Pins stay: enrolled pods fail closed until an agent is back.
    info!("shutting down; capture stays pinned (fail closed)");
    Ok(())
}

/// Graceful stop: no new connections, GOAWAY on HBONE connections, then wait for open
/// connections up to `deadline`; whatever is left is closed when the process exits.
async fn drain(
    shared: &Shared,
    pods: &HashMap<PodKey, pod::PodRuntime>,
    drain_tx: &watch::Sender<bool>,
    deadline: Duration,
) {
    for pod in pods.values() {
        pod.close_listeners();
    }
    drain_tx.send_replace(true);
    let open = shared.metrics.active_connections();
    info!(
        open_connections = open,
        deadline_ms = deadline.as_millis() as u64,
        "draining"
    );
    let until = tokio::time::Instant::now() + deadline;
    while shared.metrics.active_connections() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = shared.metrics.active_connections();
    if left > 0 {
        warn!(
            open_connections = left,
            "drain deadline reached; closing the rest"
        );
    } else {
        info!("drained");
    }
}

/// Makes the running pods match the state: stops pods that left (unenrolling them) and
/// starts new ones. A pod whose description changed is restarted.
async fn reconcile(
    shared: &Arc<Shared>,
    pods: &mut HashMap<PodKey, pod::PodRuntime>,
    state: &MeshState,
) {
    let desired: HashMap<PodKey, _> = state
        .local_pods()
        .map(|w| (PodKey::of(w), w.clone()))
        .collect();
    let gone: Vec<PodKey> = pods
        .keys()
        .filter(|k| !desired.contains_key(k))
        .cloned()
        .collect();
    for key in gone {
        if let Some(runtime) = pods.remove(&key) {
            runtime.stop(shared);
        }
    }
    for (key, workload) in desired {
        if pods.contains_key(&key) {
            continue;
        }
        match pod::PodRuntime::start(shared.clone(), workload.clone()).await {
            Ok(runtime) => {
                pods.insert(key, runtime);
            }
            Err(e) => {
                error!(pod = %format!("{}/{}", workload.namespace, workload.name), error = %format!("{e:#}"), "could not enroll pod")
            }
        }
    }
}

fn forget_stale_enrollments(shared: &Shared, pods: &HashMap<PodKey, pod::PodRuntime>) {
    let live: Vec<u64> = pods.values().map(|p| p.netns_cookie()).collect();
    let Ok(mut capture) = shared.capture.lock() else {
        return;
    };
    let mut stale: Vec<u64> = capture.enrolled();
    stale.extend(capture.inbound_pods());
    stale.sort_unstable();
    stale.dedup();
    for cookie in stale.into_iter().filter(|c| !live.contains(c)) {
        // A pod that left the config while the agent was down would otherwise stay
        // captured, with no agent listening for it: closed for good.
        warn!(
            netns_cookie = cookie,
            "releasing a pod no longer in the config"
        );
        let _ = capture.unenroll(cookie);
        let _ = capture.detach_inbound(cookie);
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
