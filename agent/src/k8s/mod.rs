//! Kubernetes as the source of truth (`ambit run --kubernetes`): kube-rs watchers on
//! Namespaces, Pods, Services, EndpointSlices and Istio's PeerAuthentication and
//! AuthorizationPolicy feed a cache of compact records; every real change becomes a new
//! [`MeshState`], published the same way the local-mode file's are.
//!
//! What the API server does never changes what is enforced by itself: watch errors,
//! restarts and `410 Gone` leave the cache as it is (kube-rs relists and the cache is
//! replaced only when the relist is complete), and a snapshot is published only when a
//! record really changed.

mod convert;
mod status;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

pub use convert::CniHint;
use convert::{NamespaceRecord, PodRecord, PolicyRecord, Records, ServiceRecord, SliceRecord};
pub use status::{STATUS_ANNOTATION, StatusWriter};

use crate::config::{MeshSettings, MeshState};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (in-cluster or KUBECONFIG): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `--kubeconfig`, or the in-cluster configuration / `KUBECONFIG`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, KubeError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    // kube-rs would retry 503s inside one call for minutes; the watchers have their own
    // back-off and log each failure streak, and the status writer retries on the next
    // change, so a call fails fast instead.
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

/// How long a burst of watch events may take to land before a state is built from it.
const BURST_WAIT: Duration = Duration::from_millis(20);
/// The least time between two builds while the cluster keeps changing.
const MIN_BUILD_INTERVAL: Duration = Duration::from_millis(100);

/// The kinds watched, as named in readiness messages.
pub const KINDS: [&str; 6] = [
    "namespaces",
    "pods",
    "services",
    "endpointslices",
    "peerauthentications",
    "authorizationpolicies",
];

/// The records of one kind, replaced whole when a relist completes.
struct KindCache<T> {
    objects: HashMap<String, T>,
    /// Objects of a relist in progress.
    relist: Option<HashMap<String, T>>,
    listed: bool,
}

impl<T> Default for KindCache<T> {
    fn default() -> Self {
        Self {
            objects: HashMap::new(),
            relist: None,
            listed: false,
        }
    }
}

impl<T: PartialEq> KindCache<T> {
    /// Applies one watch event; true when the cached records changed.
    fn apply<K>(&mut self, event: Event<K>, convert: impl Fn(&K) -> Option<(String, T)>) -> bool
    where
        K: kube::Resource,
    {
        match event {
            Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            Event::InitApply(object) => {
                if let (Some(relist), Some((key, record))) =
                    (self.relist.as_mut(), convert(&object))
                {
                    relist.insert(key, record);
                }
                false
            }
            Event::InitDone => {
                let first = !self.listed;
                self.listed = true;
                match self.relist.take() {
                    Some(fresh) if fresh != self.objects => {
                        self.objects = fresh;
                        true
                    }
                    _ => first,
                }
            }
            Event::Apply(object) => match convert(&object) {
                Some((key, record)) => {
                    if self.objects.get(&key) == Some(&record) {
                        false
                    } else {
                        self.objects.insert(key, record);
                        true
                    }
                }
                // An object that no longer qualifies (a pod that finished) leaves.
                None => self.objects.remove(&object_key(&object)).is_some(),
            },
            Event::Delete(object) => self.objects.remove(&object_key(&object)).is_some(),
        }
    }

    /// Marks the kind listed with nothing in it (a CRD the cluster does not serve).
    fn set_absent(&mut self) -> bool {
        let changed = !self.objects.is_empty() || !self.listed;
        self.objects.clear();
        self.relist = None;
        self.listed = true;
        changed
    }
}

fn object_key<K: kube::Resource>(object: &K) -> String {
    let meta = object.meta();
    convert::key(
        meta.namespace.as_deref(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

#[derive(Default)]
struct Cache {
    namespaces: KindCache<NamespaceRecord>,
    pods: KindCache<PodRecord>,
    services: KindCache<ServiceRecord>,
    slices: KindCache<SliceRecord>,
    peer_authentications: KindCache<PolicyRecord>,
    authorization_policies: KindCache<PolicyRecord>,
    hints: HashMap<String, CniHint>,
}

impl Cache {
    fn pending(&self) -> Vec<&'static str> {
        let listed = [
            self.namespaces.listed,
            self.pods.listed,
            self.services.listed,
            self.slices.listed,
            self.peer_authentications.listed,
            self.authorization_policies.listed,
        ];
        KINDS
            .iter()
            .zip(listed)
            .filter(|(_, listed)| !listed)
            .map(|(kind, _)| *kind)
            .collect()
    }

    fn records(&self) -> Records<'_> {
        Records {
            namespaces: self.namespaces.objects.values().collect(),
            pods: self.pods.objects.values().collect(),
            services: self.services.objects.values().collect(),
            slices: self.slices.objects.values().collect(),
            policies: self
                .peer_authentications
                .objects
                .values()
                .chain(self.authorization_policies.objects.values())
                .collect(),
        }
    }
}

/// What readiness and the config dump need to know about the source.
#[derive(Debug, Default)]
pub struct SourceHealth {
    /// Kinds whose first list has not completed.
    pub pending: Vec<&'static str>,
    /// Why the last change could not be applied, when it could not.
    pub error: Option<String>,
}

/// The shared half of the source: the cache and the hooks the agent uses.
pub struct KubeSource {
    client: kube::Client,
    node: String,
    settings: MeshSettings,
    cache: Mutex<Cache>,
    changed: Notify,
    health: Mutex<SourceHealth>,
}

impl KubeSource {
    pub fn new(client: kube::Client, node: String, settings: MeshSettings) -> Arc<Self> {
        Arc::new(Self {
            client,
            node,
            settings,
            cache: Mutex::new(Cache::default()),
            changed: Notify::new(),
            health: Mutex::new(SourceHealth {
                pending: KINDS.to_vec(),
                error: None,
            }),
        })
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Kinds still missing their first list, and the last build error.
    pub fn health(&self) -> (Vec<&'static str>, Option<String>) {
        let h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        (h.pending.clone(), h.error.clone())
    }

    /// Records what the CNI plugin said of a pod (its IPs before the API server has them).
    pub fn set_hint(&self, namespace: &str, name: &str, hint: Option<CniHint>) {
        let key = convert::key(Some(namespace), name);
        let mut cache = self.cache();
        let changed = match hint {
            Some(hint) => cache.hints.insert(key, hint.clone()) != Some(hint),
            None => cache.hints.remove(&key).is_some(),
        };
        drop(cache);
        if changed {
            self.changed.notify_one();
        }
    }

    /// The cached pod `namespace/name`: (uid, node), if the API server has shown it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<(String, String)> {
        self.cache()
            .pods
            .objects
            .get(&convert::key(Some(namespace), name))
            .map(|p| (p.uid.clone(), p.node.clone()))
    }

    /// Names of the namespaces that opted into the mesh.
    pub fn mesh_namespaces(&self) -> BTreeSet<String> {
        self.cache()
            .namespaces
            .objects
            .values()
            .filter(|ns| {
                ns.labels.get(crate::config::MESH_LABEL).map(String::as_str)
                    == Some(crate::config::MESH_ENABLED)
            })
            .map(|ns| ns.name.clone())
            .collect()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches every kind and publishes each real change to `tx`, until `tx` has no
    /// receiver left. The first snapshot is published once every kind has been listed.
    pub async fn run(self: Arc<Self>, tx: watch::Sender<Arc<MeshState>>) {
        let client = self.client.clone();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.clone().watch_kind(
            Api::<Namespace>::all(client.clone()),
            "namespaces",
            |c| &mut c.namespaces,
            convert::namespace,
        ));
        tasks.spawn(self.clone().watch_kind(
            Api::<Pod>::all(client.clone()),
            "pods",
            |c| &mut c.pods,
            convert::pod,
        ));
        tasks.spawn(self.clone().watch_kind(
            Api::<Service>::all(client.clone()),
            "services",
            |c| &mut c.services,
            convert::service,
        ));
        tasks.spawn(self.clone().watch_kind(
            Api::<EndpointSlice>::all(client.clone()),
            "endpointslices",
            |c| &mut c.slices,
            convert::slice,
        ));
        tasks.spawn(self.clone().watch_policies(
            "PeerAuthentication",
            "peerauthentications",
            |c| &mut c.peer_authentications,
        ));
        tasks.spawn(self.clone().watch_policies(
            "AuthorizationPolicy",
            "authorizationpolicies",
            |c| &mut c.authorization_policies,
        ));
        let mut last_build = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tx.closed() => break,
            }
            // Let a burst of events (a relist, a namespace label touching 100 pods) land
            // before building: one snapshot for the burst. Under steady churn, at most
            // one build per MIN_BUILD_INTERVAL (a build walks every cached pod).
            let wait = MIN_BUILD_INTERVAL
                .saturating_sub(last_build.elapsed())
                .max(BURST_WAIT);
            tokio::time::sleep(wait).await;
            last_build = tokio::time::Instant::now();
            if let Some(state) = self.build() {
                let _ = tx.send(Arc::new(state));
            }
        }
        tasks.abort_all();
    }

    /// A new state from the cache, or `None` while kinds are missing or the policies do
    /// not compile (the state in force stays).
    fn build(&self) -> Option<MeshState> {
        let cache = self.cache();
        let pending = cache.pending();
        let built = if pending.is_empty() {
            Some(
                convert::mesh_spec(&cache.records(), &cache.hints, &self.settings)
                    .map_err(|e| format!("policies refused: {e}"))
                    .and_then(|spec| MeshState::build(spec, &self.node).map_err(|e| e.to_string())),
            )
        } else {
            None
        };
        drop(cache);
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        health.pending = pending;
        match built {
            None => None,
            Some(Ok(state)) => {
                health.error = None;
                Some(state)
            }
            Some(Err(e)) => {
                if health.error.as_ref() != Some(&e) {
                    error!(error = %e, "cluster state refused; keeping the state in force");
                }
                health.error = Some(e);
                None
            }
        }
    }

    async fn watch_kind<K, T>(
        self: Arc<Self>,
        api: Api<K>,
        kind: &'static str,
        select: fn(&mut Cache) -> &mut KindCache<T>,
        convert: fn(&K) -> Option<(String, T)>,
    ) where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + Debug + Send + 'static,
        T: PartialEq + Send + 'static,
    {
        let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
        self.consume(stream, kind, select, convert).await;
    }

    async fn consume<K, T>(
        &self,
        stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
        kind: &'static str,
        select: fn(&mut Cache) -> &mut KindCache<T>,
        convert: impl Fn(&K) -> Option<(String, T)>,
    ) where
        K: kube::Resource,
        T: PartialEq,
    {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    if failing {
                        info!(kind, "watch recovered");
                        failing = false;
                    }
                    let first_list = matches!(event, Event::InitDone);
                    let changed = select(&mut self.cache()).apply(event, &convert);
                    if changed || first_list {
                        self.changed.notify_one();
                    }
                }
                Err(e) => {
                    // Once per streak: the back-off retries quietly until it works again.
                    if !failing {
                        warn!(kind, error = %e, "watch failed; keeping the last state and retrying with back-off");
                        failing = true;
                    }
                }
            }
        }
    }

    /// Istio's policy CRDs, in the newest version the cluster serves; a cluster without
    /// them has no policies (said once) and is asked again now and then.
    async fn watch_policies(
        self: Arc<Self>,
        kind: &'static str,
        plural: &'static str,
        select: fn(&mut Cache) -> &mut KindCache<PolicyRecord>,
    ) {
        let mut said_absent = false;
        let mut failing = false;
        loop {
            match self.served_version(kind, plural).await {
                Ok(Some(resource)) => {
                    info!(kind, version = %resource.version, "watching Istio policies");
                    let api = Api::<DynamicObject>::all_with(self.client.clone(), &resource);
                    let stream =
                        watcher::watcher(api, watcher::Config::default()).default_backoff();
                    self.consume(stream, plural, select, |o| convert::policy(o, kind))
                        .await;
                    return;
                }
                Ok(None) => {
                    if !said_absent {
                        info!(
                            kind,
                            "Istio CRD not served by this cluster: no such policies apply"
                        );
                        said_absent = true;
                    }
                    if select(&mut self.cache()).set_absent() {
                        self.changed.notify_one();
                    }
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        warn!(kind, error = %e, "cannot ask the API server for Istio CRDs; retrying");
                        failing = true;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }

    /// `security.istio.io/v1`, else `v1beta1`, else `None` when neither is served.
    async fn served_version(
        &self,
        kind: &str,
        plural: &str,
    ) -> Result<Option<ApiResource>, kube::Error> {
        for version in ["v1", "v1beta1"] {
            let gvk = GroupVersionKind::gvk("security.istio.io", version, kind);
            let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
            let api = Api::<DynamicObject>::all_with(self.client.clone(), &resource);
            match api.list_metadata(&ListParams::default().limit(1)).await {
                Ok(_) => return Ok(Some(resource)),
                Err(kube::Error::Api(status)) if status.code == 404 => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ns(name: &str, enabled: bool) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: enabled
                    .then(|| [("ambit.dev/mesh".to_owned(), "enabled".to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_relist_with_the_same_objects_is_no_change() {
        let mut cache = KindCache::default();
        assert!(!cache.apply(Event::Init, convert::namespace));
        assert!(!cache.apply(Event::InitApply(ns("shop", true)), convert::namespace));
        assert!(
            cache.apply(Event::InitDone, convert::namespace),
            "first list"
        );
        // The watch restarts (410 Gone, API server restart): the same objects again.
        assert!(!cache.apply(Event::Init, convert::namespace));
        assert!(!cache.apply(Event::InitApply(ns("shop", true)), convert::namespace));
        assert_eq!(cache.objects.len(), 1, "kept while the relist runs");
        assert!(!cache.apply(Event::InitDone, convert::namespace));
        assert_eq!(cache.objects.len(), 1);
    }

    #[test]
    fn a_relist_replaces_the_set_whole_when_it_differs() {
        let mut cache = KindCache::default();
        cache.apply(Event::Init, convert::namespace);
        cache.apply(Event::InitApply(ns("a", true)), convert::namespace);
        cache.apply(Event::InitApply(ns("b", true)), convert::namespace);
        cache.apply(Event::InitDone, convert::namespace);
        cache.apply(Event::Init, convert::namespace);
        cache.apply(Event::InitApply(ns("a", false)), convert::namespace);
        assert_eq!(cache.objects.len(), 2, "nothing changes mid-relist");
        assert!(cache.apply(Event::InitDone, convert::namespace));
        assert_eq!(
            cache.objects.len(),
            1,
            "b was deleted while the watch was down"
        );
        assert!(cache.objects["a"].labels.is_empty());
    }

    #[test]
    fn apply_and_delete_report_real_changes_only() {
        let mut cache = KindCache::default();
        assert!(cache.apply(Event::Apply(ns("a", true)), convert::namespace));
        assert!(!cache.apply(Event::Apply(ns("a", true)), convert::namespace));
        assert!(cache.apply(Event::Apply(ns("a", false)), convert::namespace));
        assert!(cache.apply(Event::Delete(ns("a", false)), convert::namespace));
        assert!(!cache.apply(Event::Delete(ns("a", false)), convert::namespace));
    }

    #[test]
    fn pending_kinds_are_named_until_listed() {
        let mut cache = Cache::default();
        assert_eq!(cache.pending(), KINDS.to_vec());
        cache
            .namespaces
            .apply(Event::<Namespace>::InitDone, convert::namespace);
        cache.peer_authentications.set_absent();
        assert_eq!(
            cache.pending(),
            vec![
                "pods",
                "services",
                "endpointslices",
                "authorizationpolicies"
            ]
        );
    }
}
