//! The one update ([`Agent::apply`]) and what follows from it: which of this node's pods
//! are enrolled, where their network namespaces are, retries for the ones that cannot be
//! enrolled yet, and (in Kubernetes mode) the status annotation and the namespaces file
//! the CNI plugin reads.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::pod::{PodKey, PodRuntime, StartError};
use super::{Shared, now_unix};
use crate::config::{MeshState, WorkloadEntry};
use crate::identity::SpiffeId;
use crate::k8s::{KubeSource, StatusWriter};

/// Pods that should be enrolled but are not, by `namespace/name`, with the reason.
pub(crate) type Problems = Arc<Mutex<BTreeMap<String, String>>>;

pub(super) struct KubeParts {
    pub source: Arc<KubeSource>,
    pub status: StatusWriter,
    pub proc_root: PathBuf,
    pub namespaces_file: Option<PathBuf>,
}

const FIRST_RETRY: Duration = Duration::from_millis(250);
const LAST_RETRY: Duration = Duration::from_secs(30);

pub(super) struct Agent {
    pub(super) shared: Arc<Shared>,
    pub(super) kube: Option<KubeParts>,
    pods: HashMap<PodKey, PodRuntime>,
    problems: Problems,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Network namespaces the CNI plugin named, by `namespace/name`.
    pub(super) cni_netns: HashMap<String, PathBuf>,
    /// Pods whose status annotation this agent set, by UID: (namespace, name).
    annotated: HashMap<String, (String, String)>,
    namespaces_written: Option<BTreeSet<String>>,
    /// CNI ADDs waiting for their pods.
    pub(super) waiters: Vec<super::cni::Waiter>,
    /// Pods whose enrollment failed part-way, kept closed by netns cookie.
    held_closed: HashMap<String, u64>,
    /// States applied so far.
    applied: u64,
}

pub(super) fn pod_name(w: &WorkloadEntry) -> String {
    format!("{}/{}", w.namespace, w.name)
}

impl Agent {
    pub fn new(shared: Arc<Shared>, kube: Option<KubeParts>) -> Self {
        Self {
            shared,
            kube,
            pods: HashMap::new(),
            problems: Arc::default(),
            retry_at: None,
            backoff: FIRST_RETRY,
            cni_netns: HashMap::new(),
            annotated: HashMap::new(),
            namespaces_written: None,
            waiters: Vec::new(),
            held_closed: HashMap::new(),
            applied: 0,
        }
    }

    pub fn problems(&self) -> Problems {
        self.problems.clone()
    }

    pub fn enrolled(&self) -> usize {
        self.pods.len()
    }

    /// True when `namespace/name` runs enrolled now.
    pub(super) fn is_enrolled(&self, key: &str) -> bool {
        self.pods.values().any(|p| p.name() == key)
    }

    pub(super) fn problem(&self, key: &str) -> Option<String> {
        self.problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// The one update: routing state, workloads and policies are swapped together (one
    /// `Arc`), then the enrolled pods are made to match and connections the new policies
    /// deny are closed.
    pub async fn apply(&mut self, state: Arc<MeshState>) {
        // Connections load the state without a lock; the old one is freed by whoever lets go
        // of it last, here or a connection still using it.
        self.shared.state.store(state.clone());
        self.shared
            .source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_change_unix = now_unix();
        self.reconcile(&state).await;
        if state.revoke_on_policy_change {
            let revoked: usize = self.pods.values().map(PodRuntime::revoke_denied).sum();
            if revoked > 0 {
                info!(revoked, "live connections closed after a policy change");
            }
        }
        self.write_namespaces_file();
        // The first state is announced as "ready" by the caller.
        if self.applied > 0 {
            info!(enrolled = self.pods.len(), "configuration applied");
        }
        self.applied += 1;
    }

    /// Tries again the pods that could not be enrolled.
    pub async fn retry(&mut self) {
        self.retry_at = None;
        let state = self.shared.state();
        self.reconcile(&state).await;
    }

    /// How long until the next retry, if one is due.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Makes the running pods match the state: stops pods that left (unenrolling them),
    /// starts new ones, and retries later (with back-off) the ones that could not start.
    pub(super) async fn reconcile(&mut self, state: &MeshState) {
        let mut desired: HashMap<PodKey, Arc<WorkloadEntry>> = HashMap::new();
        for w in state.local_pods() {
            desired.insert(PodKey::of(w, self.cni_netns.get(&pod_name(w))), w.clone());
        }
        let wanted_identities: HashSet<SpiffeId> =
            desired.values().map(|w| w.identity.clone()).collect();
        let gone: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| !desired.contains_key(k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(runtime) = self.pods.remove(&key) {
                self.stop_pod(runtime).await;
            }
        }
        // Pods held closed after a failed start that are no longer wanted are released.
        let wanted: BTreeSet<String> = desired.values().map(|w| pod_name(w)).collect();
        let released: Vec<(String, u64)> = self
            .held_closed
            .iter()
            .filter(|(name, _)| !wanted.contains(*name))
            .map(|(name, cookie)| (name.clone(), *cookie))
            .collect();
        for (name, cookie) in released {
            self.held_closed.remove(&name);
            self.release(cookie).await;
        }
        let mut problems = BTreeMap::new();
        let mut scan = None;
        let mut starts = Vec::new();
        for (key, workload) in desired {
            if self.pods.contains_key(&key) {
                continue;
            }
            let name = pod_name(&workload);
            match self.netns_of(&workload, &mut scan).await {
                Ok(netns) => {
                    let shared = self.shared.clone();
                    starts.push(async move {
                        let started = PodRuntime::start(shared, workload, netns).await;
                        (key, name, started)
                    });
                }
                Err(reason) => {
                    problems.insert(name, reason);
                }
            }
        }
        // Pods start side by side: most of a start is waiting (threads entering the
        // netns, certificate issuance), and a namespace label can bring in many at once.
        let results = futures::future::join_all(starts).await;
        for (key, name, started) in results {
            match started {
                Ok(runtime) => {
                    self.held_closed.remove(&name);
                    self.pods.insert(key, runtime);
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    warn!(pod = %name, error = %reason, "could not enroll pod; keeping it closed and retrying");
                    if let Some(failed) = e.downcast_ref::<StartError>() {
                        self.hold_closed(
                            name.clone(),
                            failed.netns_cookie,
                            failed.netns_path.clone(),
                        )
                        .await;
                    }
                    problems.insert(name, reason);
                }
            }
        }
        if problems.is_empty() {
            self.backoff = FIRST_RETRY;
            self.retry_at = None;
        } else {
            self.retry_at = Some(Instant::now() + self.backoff);
            self.backoff = (self.backoff * 2).min(LAST_RETRY);
        }
        *self.problems.lock().unwrap_or_else(PoisonError::into_inner) = problems;
        self.forget_unused_certificates(&wanted_identities);
        self.write_statuses(state);
        self.answer_waiters();
    }

    /// Keeps a pod whose enrollment failed part-way closed until a retry enrolls it: its
    /// outbound connections are captured to a listener that is not there, and its inbound
    /// ones are steered to listeners that are not registered; both are refused rather than
    /// passed on in plaintext.
    async fn hold_closed(&mut self, name: String, cookie: u64, netns_path: PathBuf) {
        let shared = self.shared.clone();
        let held = tokio::task::spawn_blocking(move || {
            let mut capture = shared
                .capture
                .lock()
                .map_err(|_| "capture lock poisoned".to_owned())?;
            let outbound = capture.enroll(cookie).map_err(|e| format!("outbound: {e}"));
            let inbound = crate::netns::NetNs::open(&netns_path)
                .map_err(|e| format!("opening {}: {e}", netns_path.display()))
                .and_then(|netns| match netns.cookie() {
                    // The path now names another netns: the pod is gone, nothing to hold.
                    Ok(now) if now != cookie => Err(format!(
                        "{} is no longer the pod's netns",
                        netns_path.display()
                    )),
                    Ok(_) => Ok(netns),
                    Err(e) => Err(format!("reading the netns cookie: {e}")),
                })
                .and_then(|netns| {
                    capture
                        .hold_inbound_closed(&netns, cookie)
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| format!("inbound: {e}"));
            match (outbound, inbound) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
                (Err(a), Err(b)) => Err(format!("{a}; {b}")),
            }
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = held {
            warn!(pod = %name, error = %e, "cannot hold the pod closed");
        }
        // Even a partial hold is undone by `release` when the pod leaves the mesh.
        self.held_closed.insert(name, cookie);
    }

    /// Releases the capture of a pod held closed that left the mesh.
    async fn release(&self, cookie: u64) {
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut capture) = shared.capture.lock() {
                super::pod::release_capture(&mut capture, cookie);
            }
        })
        .await;
    }

    /// Where a pod's network namespace is: the file's path (local mode), the one the CNI
    /// plugin named, or the one found by scanning /proc for the pod's UID.
    async fn netns_of(
        &self,
        w: &WorkloadEntry,
        scan: &mut Option<HashMap<String, PathBuf>>,
    ) -> Result<PathBuf, String> {
        if let Some(path) = &w.netns {
            return Ok(path.clone());
        }
        if let Some(path) = self.cni_netns.get(&pod_name(w)) {
            return Ok(path.clone());
        }
        let (Some(kube), Some(uid)) = (&self.kube, &w.uid) else {
            return Err("no network namespace known".to_owned());
        };
        if scan.is_none() {
            let proc_root = kube.proc_root.clone();
            let found = tokio::task::spawn_blocking(move || scan_pods(&proc_root))
                .await
                .map_err(|e| format!("scanning /proc: {e}"))?
                .map_err(|e| format!("scanning {}: {e}", kube.proc_root.display()))?;
            *scan = Some(found);
        }
        let path = scan
            .as_ref()
            .and_then(|found| found.get(uid))
            .cloned()
            .ok_or_else(|| "network namespace not found yet".to_owned())?;
        let ips = w.ips.clone();
        let checked = path.clone();
        let holds = tokio::task::spawn_blocking(move || netns_holds(&checked, &ips))
            .await
            .map_err(|e| format!("checking the netns: {e}"))?
            .map_err(|e| format!("checking {}: {e}", path.display()))?;
        if holds {
            Ok(path)
        } else {
            Err(format!(
                "network namespace {} does not hold the pod's IP",
                path.display()
            ))
        }
    }

    fn write_statuses(&mut self, state: &MeshState) {
        let Some(kube) = &self.kube else {
            return;
        };
        let problems = self.problems.lock().unwrap_or_else(PoisonError::into_inner);
        let mut now: HashMap<String, (String, String)> = HashMap::new();
        for w in state.local_pods() {
            let Some(uid) = &w.uid else { continue };
            let name = pod_name(w);
            let value = match problems.get(&name) {
                Some(reason) => format!("error: {reason}"),
                None => "enrolled".to_owned(),
            };
            kube.status.set(&w.namespace, &w.name, uid, Some(value));
            now.insert(uid.clone(), (w.namespace.clone(), w.name.clone()));
        }
        for (uid, (namespace, name)) in &self.annotated {
            if !now.contains_key(uid) {
                kube.status.set(namespace, name, uid, None);
            }
        }
        drop(problems);
        self.annotated = now;
    }

    fn write_namespaces_file(&mut self) {
        let Some(KubeParts {
            source,
            namespaces_file: Some(path),
            ..
        }) = &self.kube
        else {
            return;
        };
        let namespaces = source.mesh_namespaces();
        if self.namespaces_written.as_ref() == Some(&namespaces) {
            return;
        }
        match crate::cni::write_namespaces_file(path, namespaces.iter().map(String::as_str)) {
            Ok(()) => self.namespaces_written = Some(namespaces),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot write the mesh namespaces file")
            }
        }
    }

    /// Releases pods that are enrolled in the pinned maps but not running in this agent
    /// (they left while the agent was down): otherwise they stay captured with nobody
    /// listening, closed for good.
    pub fn forget_stale_enrollments(&self) {
        // Pods held closed after a failed start are not stale: releasing them would open
        // them in plaintext until the retry.
        let live: Vec<u64> = self
            .pods
            .values()
            .map(PodRuntime::netns_cookie)
            .chain(self.held_closed.values().copied())
            .collect();
        let Ok(mut capture) = self.shared.capture.lock() else {
            return;
        };
        let mut stale: Vec<u64> = capture.enrolled();
        stale.extend(capture.inbound_pods());
        stale.sort_unstable();
        stale.dedup();
        for cookie in stale.into_iter().filter(|c| !live.contains(c)) {
            warn!(
                netns_cookie = cookie,
                "releasing a pod no longer in the mesh"
            );
            super::pod::release_capture(&mut capture, cookie);
        }
    }

    /// Stops a running pod whose netns is `netns` (its sandbox is going away).
    pub(super) async fn stop_netns(&mut self, netns: &Path) {
        let keys: Vec<PodKey> = self
            .pods
            .iter()
            .filter(|(_, p)| p.netns_path() == netns)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some(runtime) = self.pods.remove(&key) {
                self.stop_pod(runtime).await;
            }
        }
    }

    /// Unenrolling waits on the capture lock and does netlink work in the pod's netns: off
    /// the control plane's one thread, which also answers probes, the admin API and CNI.
    /// Its certificate is left to [`Self::forget_unused_certificates`].
    async fn stop_pod(&self, runtime: PodRuntime) {
        let shared = self.shared.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || runtime.stop(&shared)).await {
            warn!(error = %e, "stopping a pod failed");
        }
    }

    /// Stops caching and renewing the certificates of identities no pod here runs as or is
    /// wanted as (`wanted`: this node's pods in the state in force). Pods of one service
    /// account share a certificate; a pod replacing another of its identity reuses it; a
    /// pod held closed keeps it for its retry. Forgetting any of those would make that
    /// pod's next connection wait on its data-path thread for a new one from the CA.
    fn forget_unused_certificates(&self, wanted: &HashSet<SpiffeId>) {
        // Built first: `retain` holds the lock a connection takes to find its certificate,
        // so under it only one lookup per cached identity.
        let mut keep: HashSet<&SpiffeId> = wanted.iter().collect();
        keep.extend(self.pods.values().map(PodRuntime::identity));
        let forgotten = self.shared.certs.retain(|id| keep.contains(id));
        if forgotten > 0 {
            debug!(
                forgotten,
                "certificates of identities that left this node forgotten"
            );
        }
    }

    /// Graceful stop: no new connections, GOAWAY on HBONE connections, then wait for open
    /// connections up to `deadline`; whatever is left is closed when the process exits.
    pub async fn drain(&self, drain_tx: &watch::Sender<bool>, deadline: Duration) {
        for pod in self.pods.values() {
            pod.close_listeners();
        }
        drain_tx.send_replace(true);
        let open = self.shared.metrics.active_connections();
        info!(
            open_connections = open,
            deadline_ms = deadline.as_millis() as u64,
            "draining"
        );
        let until = Instant::now() + deadline;
        while self.shared.metrics.active_connections() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.shared.metrics.active_connections();
        if left > 0 {
            warn!(
                open_connections = left,
                "drain deadline reached; closing the rest"
            );
        } else {
            info!("drained");
        }
    }
}

/// Pod UID → the netns path of its oldest process, from a scan of the host's /proc.
fn scan_pods(proc_root: &Path) -> std::io::Result<HashMap<String, PathBuf>> {
    let found = match crate::procscan::scan(proc_root) {
        // Some sandboxes hide pid 1's namespace; the agent runs in the host's network
        // namespace (hostNetwork), so its own stands for the host's.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let own = crate::procscan::NetnsId::of(Path::new("/proc/self/ns/net"))?;
            crate::procscan::scan_excluding(proc_root, own)?
        }
        other => other?,
    };
    Ok(found
        .into_iter()
        .map(|(uid, candidate)| (uid.to_string(), candidate.path))
        .collect())
}

fn netns_holds(path: &Path, ips: &[std::net::IpAddr]) -> std::io::Result<bool> {
    let netns = crate::netns::NetNs::open(path)?;
    crate::procscan::netns_holds_ip(&netns, ips)
}
