//! A small Kubernetes API server for end-to-end tests: real list/watch semantics over plain
//! HTTP/1.1 (resourceVersion, bookmarks, selectors, pagination, 410 Gone after compaction,
//! streaming lists), so the real agent binary and kube-rs's watcher run against it unchanged.
//! Written by hand because no registry reachable from these machines ships kube-apiserver
//! (see shared/notes/kubernetes-facts.md) and kube-rs's own test aids mock the client, not
//! the watch protocol.
//!
//! The test side is synchronous: [`ApiServer::start`] runs the server on its own tokio
//! runtime thread, and every method here only takes a mutex, so it works from sync and
//! async tests alike.

mod http;
mod objects;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use objects::{
    PodBuilder, authorization_policy, endpoint_slice, namespace, node, peer_authentication, pod,
    service,
};
pub use store::{Error, Filter};

/// The bearer token every request must carry (the kubeconfig's user has it).
pub const ADMIN_TOKEN: &str = "ambit-e2e-admin-token";
/// The API server's own audience: a TokenReview without audiences is checked against it.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// The kinds this server stores and serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    PeerAuthentication,
    AuthorizationPolicy,
    Secret,
    ConfigMap,
}

/// Where a kind lives in the API.
#[derive(Debug)]
pub struct ResourceInfo {
    pub group: &'static str,
    /// Versions served; the CRD kinds' installed versions are configured at runtime.
    pub versions: &'static [&'static str],
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

impl ResourceInfo {
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }
}

pub const ISTIO_SECURITY_GROUP: &str = "security.istio.io";

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::Secret,
        Kind::ConfigMap,
    ];

    pub fn info(self) -> &'static ResourceInfo {
        const fn core(plural: &'static str, kind: &'static str, namespaced: bool) -> ResourceInfo {
            ResourceInfo {
                group: "",
                versions: &["v1"],
                plural,
                kind,
                namespaced,
            }
        }
        static NAMESPACE: ResourceInfo = core("namespaces", "Namespace", false);
        static NODE: ResourceInfo = core("nodes", "Node", false);
        static POD: ResourceInfo = core("pods", "Pod", true);
        static SERVICE: ResourceInfo = core("services", "Service", true);
        static SECRET: ResourceInfo = core("secrets", "Secret", true);
        static CONFIG_MAP: ResourceInfo = core("configmaps", "ConfigMap", true);
        static ENDPOINT_SLICE: ResourceInfo = ResourceInfo {
            group: "discovery.k8s.io",
            versions: &["v1"],
            plural: "endpointslices",
            kind: "EndpointSlice",
            namespaced: true,
        };
        static PEER_AUTHENTICATION: ResourceInfo = ResourceInfo {
            group: ISTIO_SECURITY_GROUP,
            versions: &["v1", "v1beta1"],
            plural: "peerauthentications",
            kind: "PeerAuthentication",
            namespaced: true,
        };
        static AUTHORIZATION_POLICY: ResourceInfo = ResourceInfo {
            group: ISTIO_SECURITY_GROUP,
            versions: &["v1", "v1beta1"],
            plural: "authorizationpolicies",
            kind: "AuthorizationPolicy",
            namespaced: true,
        };
        match self {
            Kind::Namespace => &NAMESPACE,
            Kind::Node => &NODE,
            Kind::Pod => &POD,
            Kind::Service => &SERVICE,
            Kind::EndpointSlice => &ENDPOINT_SLICE,
            Kind::PeerAuthentication => &PEER_AUTHENTICATION,
            Kind::AuthorizationPolicy => &AUTHORIZATION_POLICY,
            Kind::Secret => &SECRET,
            Kind::ConfigMap => &CONFIG_MAP,
        }
    }

    /// The kind of a k8s-openapi type, if this server stores it.
    pub fn of<K: k8s_openapi::Resource>() -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.info().group == K::GROUP && k.info().kind == K::KIND)
    }

    fn by_path(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.info().group == group && k.info().plural == plural)
    }
}

/// The request verbs counted per resource, as Kubernetes audit logs name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    List,
    Watch,
    Get,
    Create,
    Update,
    Patch,
    Delete,
}

/// What a registered token authenticates as in a TokenReview.
#[derive(Clone, Debug, Default)]
pub struct TokenIdentity {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    /// The audiences the token was issued for.
    pub audiences: Vec<String>,
    /// An expired token fails review like a real one.
    pub expired: bool,
}

impl TokenIdentity {
    /// A bound projected service-account token of a pod, with the identity a real API server
    /// reports for one: username `system:serviceaccount:<ns>:<sa>`, the service-account
    /// groups, and `authentication.kubernetes.io/pod-name` / `pod-uid` in extra.
    pub fn service_account(
        namespace: &str,
        service_account: &str,
        pod_name: &str,
        pod_uid: &str,
        audiences: &[&str],
    ) -> Self {
        let extra = [
            ("authentication.kubernetes.io/pod-name", pod_name),
            ("authentication.kubernetes.io/pod-uid", pod_uid),
            (
                "authentication.kubernetes.io/credential-id",
                "JTI=00000000-0000-4000-8000-000000000000",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
        .collect();
        TokenIdentity {
            username: format!("system:serviceaccount:{namespace}:{service_account}"),
            uid: format!("sa-uid-{namespace}-{service_account}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            extra,
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expired: false,
        }
    }
}

/// One request as the server received it (before authentication and availability).
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The decoded query parameters (labelSelector, fieldSelector, resourceVersion, ...).
    pub query: BTreeMap<String, String>,
    /// The plural resource ("pods"), "tokenreviews", "discovery", "version" or "unknown".
    pub resource: String,
    /// None for a method the path does not support.
    pub verb: Option<Verb>,
}

/// One PATCH request as the server received it.
#[derive(Clone, Debug)]
pub struct PatchRecord {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
    /// `Some("status")` for pods/status.
    pub subresource: Option<String>,
    pub content_type: String,
    pub field_manager: Option<String>,
    /// The patch body (YAML apply patches converted to JSON); Null if it did not parse.
    pub body: Value,
    /// The HTTP status the server answered with.
    pub status: u16,
}

/// State shared by the test side and the server thread; survives stop/restart.
struct Shared {
    store: Mutex<store::Store>,
    /// Carries the current resourceVersion; watches wake on every change.
    changed: tokio::sync::watch::Sender<u64>,
    /// Bumped by `end_watches`: every open watch stream ends.
    end_epoch: tokio::sync::watch::Sender<u64>,
    unavailable: AtomicBool,
    /// Watch streams being served right now.
    open_watches: AtomicUsize,
    istio_versions: Mutex<Vec<String>>,
    tokens: Mutex<HashMap<String, TokenIdentity>>,
    requests: Mutex<HashMap<(String, Verb), u64>>,
    request_log: Mutex<Vec<RequestRecord>>,
    patches: Mutex<Vec<PatchRecord>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the server's state from the others.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn notify(&self) {
        let rv = lock(&self.store).resource_version();
        self.changed.send_replace(rv);
    }

    fn served_versions(&self, kind: Kind) -> Vec<String> {
        if kind.info().group == ISTIO_SECURITY_GROUP {
            lock(&self.istio_versions).clone()
        } else {
            kind.info().versions.iter().map(|v| v.to_string()).collect()
        }
    }

    fn count(&self, record: RequestRecord) {
        if let Some(verb) = record.verb {
            *lock(&self.requests)
                .entry((record.resource.clone(), verb))
                .or_default() += 1;
        }
        lock(&self.request_log).push(record);
    }
}

struct Running {
    shutdown: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// The fake API server. Dropping it stops serving.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Option<Running>,
}

impl ApiServer {
    /// Starts on an ephemeral port of 127.0.0.1. Panics if it cannot bind (a test aid).
    pub fn start() -> ApiServer {
        match Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))) {
            Ok(server) => server,
            Err(e) => panic!("starting the fake API server: {e}"),
        }
    }

    /// Starts on the given address (port 0 picks one). The Istio CRDs start installed in
    /// v1 and v1beta1.
    pub fn start_on(addr: SocketAddr) -> Result<ApiServer, Error> {
        let shared = Arc::new(Shared {
            store: Mutex::new(store::Store::default()),
            changed: tokio::sync::watch::Sender::new(0),
            end_epoch: tokio::sync::watch::Sender::new(0),
            unavailable: AtomicBool::new(false),
            open_watches: AtomicUsize::new(0),
            istio_versions: Mutex::new(vec!["v1".into(), "v1beta1".into()]),
            tokens: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            request_log: Mutex::new(Vec::new()),
            patches: Mutex::new(Vec::new()),
        });
        let mut server = ApiServer {
            shared,
            addr,
            running: None,
        };
        server.serve()?;
        Ok(server)
    }

    fn serve(&mut self) -> Result<(), Error> {
        let (listener, addr) = http::bind(self.addr)?;
        self.addr = addr;
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fake-apiserver-{}", addr.port()))
            .spawn(move || http::run(listener, shared, shutdown_rx))
            .map_err(|source| Error::Bind { addr, source })?;
        self.running = Some(Running { shutdown, thread });
        Ok(())
    }

    /// Stops serving: the listener closes and every open connection (watch streams
    /// included) is cut. The objects, history and counters are kept for [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            // The thread may already have ended; there is nothing left to stop then.
            let _ = running.shutdown.send(());
            let _ = running.thread.join();
        }
    }

    /// Serves again on the same address with the state kept.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop();
        self.serve()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig with one cluster (this server), one user (bearer [`ADMIN_TOKEN`]) and a
    /// current context joining them, for KUBECONFIG or `Kubeconfig::read_from`.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             users:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: admin\n    namespace: default\n\
             current-context: fake\n",
            url = self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), Error> {
        std::fs::write(path, self.kubeconfig_yaml()).map_err(|source| Error::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })
    }

    // ---- objects (test side) ----

    /// Creates an object of `kind` given as JSON; uid, resourceVersion, apiVersion and kind
    /// are filled in. Returns the stored object.
    pub fn create_json(&self, kind: Kind, obj: Value) -> Result<Value, Error> {
        let stored = lock(&self.shared.store).create(kind, obj)?;
        self.shared.notify();
        Ok(stored)
    }

    /// Replaces an object. A non-empty metadata.resourceVersion must equal the stored one
    /// (409 Conflict otherwise); a replacement that changes nothing bumps nothing.
    pub fn update_json(&self, kind: Kind, obj: Value) -> Result<Value, Error> {
        let stored = lock(&self.shared.store).update(kind, obj)?;
        self.shared.notify();
        Ok(stored)
    }

    /// Deletes an object; `namespace` is "" for cluster-scoped kinds.
    pub fn delete_json(&self, kind: Kind, namespace: &str, name: &str) -> Result<Value, Error> {
        let deleted = lock(&self.shared.store).delete(kind, namespace, name)?;
        self.shared.notify();
        Ok(deleted)
    }

    pub fn get_json(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.shared.store).get(kind, namespace, name).cloned()
    }

    /// The stored objects of a kind, by namespace and name.
    pub fn list_json(&self, kind: Kind) -> Vec<Value> {
        lock(&self.shared.store).list(kind, &Filter::default())
    }

    /// Sets (`Some`) or removes (`None`) labels of an object, as one modification.
    pub fn patch_labels(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        labels: &[(&str, Option<&str>)],
    ) -> Result<Value, Error> {
        let mut store = lock(&self.shared.store);
        let mut obj = store
            .get(kind, namespace, name)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind: kind.info().plural,
                name: name.to_string(),
            })?;
        let patch: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.map_or(Value::Null, |v| json!(v))))
            .collect();
        store::merge_patch(&mut obj, &json!({"metadata": {"labels": patch}}));
        let stored = store.update(kind, obj)?;
        drop(store);
        self.shared.notify();
        Ok(stored)
    }

    /// Typed [`Self::create_json`] for k8s-openapi types.
    pub fn create<K>(&self, obj: &K) -> Result<K, Error>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let stored = self.create_json(typed_kind::<K>()?, serde_json::to_value(obj)?)?;
        Ok(serde_json::from_value(stored)?)
    }

    /// Typed [`Self::update_json`].
    pub fn update<K>(&self, obj: &K) -> Result<K, Error>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let stored = self.update_json(typed_kind::<K>()?, serde_json::to_value(obj)?)?;
        Ok(serde_json::from_value(stored)?)
    }

    /// Typed [`Self::delete_json`].
    pub fn delete<K>(&self, namespace: &str, name: &str) -> Result<K, Error>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let deleted = self.delete_json(typed_kind::<K>()?, namespace, name)?;
        Ok(serde_json::from_value(deleted)?)
    }

    /// Typed [`Self::get_json`].
    pub fn get<K>(&self, namespace: &str, name: &str) -> Result<Option<K>, Error>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        self.get_json(typed_kind::<K>()?, namespace, name)
            .map(serde_json::from_value)
            .transpose()
            .map_err(Error::from)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).resource_version()
    }

    // ---- faults ----

    /// Forgets the change history: a watch from any older resourceVersion (including watches
    /// still open behind it) gets an ERROR event with a 410 Expired Status, and pending
    /// `continue` tokens answer 410.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
        // Wake open watches so the ones behind see the 410 now.
        self.shared.notify();
    }

    /// Ends every open watch stream cleanly now (as an API server restart or a load
    /// balancer would); clients resume from their last resourceVersion.
    pub fn end_watches(&self) {
        self.shared.end_epoch.send_modify(|e| *e += 1);
    }

    /// While set, every request is answered 503 with a ServiceUnavailable Status. Open watch
    /// streams are not touched (combine with [`Self::end_watches`]).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Which versions of the security.istio.io CRDs are installed; empty = not installed,
    /// so their paths answer 404 like a real API server without the CRDs.
    pub fn set_istio_crds(&self, versions: &[&str]) {
        *lock(&self.shared.istio_versions) = versions.iter().map(|v| v.to_string()).collect();
    }

    // ---- tokens ----

    /// Registers a token for TokenReview.
    pub fn register_token(&self, token: &str, identity: TokenIdentity) {
        lock(&self.shared.tokens).insert(token.to_string(), identity);
    }

    // ---- observations ----

    /// How many requests of `verb` on `resource` (the plural: "pods", "tokenreviews") were
    /// received, including ones answered with an error (503, 404, 410).
    pub fn request_count(&self, resource: &str, verb: Verb) -> u64 {
        lock(&self.shared.requests)
            .get(&(resource.to_string(), verb))
            .copied()
            .unwrap_or(0)
    }

    /// How many watch streams the server is serving now (all kinds). Lets a test wait
    /// until [`Self::end_watches`] has taken effect, or until a client is watching.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Every request received, in order: lets a test check what a client asked for
    /// (e.g. that the agent's pod watch carries `fieldSelector=spec.nodeName=<node>`).
    pub fn request_log(&self) -> Vec<RequestRecord> {
        lock(&self.shared.request_log).clone()
    }

    /// Every PATCH received, in order.
    pub fn patches(&self) -> Vec<PatchRecord> {
        lock(&self.shared.patches).clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn typed_kind<K: k8s_openapi::Resource>() -> Result<Kind, Error> {
    Kind::of::<K>().ok_or_else(|| {
        Error::Invalid(format!(
            "the fake API server does not store {} {}",
            K::API_VERSION,
            K::KIND
        ))
    })
}
