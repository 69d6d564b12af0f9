//! The running agent: reads the mesh state, enrolls this node's pods, opens their in-pod
//! listeners and connects capture, tunnel and policy. `ambit run` calls [`run`].

mod pod;
mod sockets;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::capture::{Capture, CaptureConfig};
use crate::config::{ConfigWatcher, MeshState};
use crate::identity::{CertManager, LocalCa};
use crate::policy::PolicyAuthorizer;
use crate::tunnel::{LocalWorkload, LocalWorkloads, TunnelConfig};

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
}

/// What every pod runtime shares.
pub(crate) struct Shared {
    pub capture: Mutex<Capture>,
    pub certs: CertManager,
    pub authorizer: Arc<PolicyAuthorizer>,
    pub state: RwLock<Arc<MeshState>>,
    pub tunnel: TunnelConfig,
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
    let capture = Capture::attach(&CaptureConfig {
        pin_dir: options.pin_dir.clone(),
        cgroup: None,
        excluded_ports: state.excluded_ports.clone(),
    })
    .context("attaching the capture programs")?;

    let labels_state: Arc<RwLock<Arc<MeshState>>> = Arc::new(RwLock::new(state.clone()));
    let labels_lookup = {
        let labels_state = labels_state.clone();
        Arc::new(move |w: &LocalWorkload| -> BTreeMap<String, String> {
            let Ok(state) = labels_state.read() else {
                return BTreeMap::new();
            };
            state
                .workloads()
                .iter()
                .find(|e| e.namespace == w.namespace && e.name == w.name)
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
        state: RwLock::new(state.clone()),
        tunnel: options.tunnel.clone(),
    });

    let mut pods: HashMap<PodKey, pod::PodRuntime> = HashMap::new();
    reconcile(&shared, &mut pods, &state).await;
    // Entries left in the pinned map by an earlier run for pods that are gone now.
    forget_stale_enrollments(&shared, &pods);
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
                if let Ok(mut s) = labels_state.write() {
                    *s = state.clone();
                }
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
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    // Pins stay: enrolled pods fail closed until an agent is back.
    info!("shutting down; capture stays pinned (fail closed)");
    Ok(())
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
