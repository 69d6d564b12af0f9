//! The CA's view of Kubernetes through kube-rs: TokenReviews, the Pod watch that fills the
//! [`PodStore`], the Secrets holding the CA key and the ConfigMap publishing the root.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use super::CaError;
use super::authz::{PodFacts, PodStore, Refusal, RefusalReason, ReviewedCaller, review_outcome};
use super::publish::{ConfigMapData, ConfigMapStore, StoredConfigMap, Write};
use super::secret::{Created, SecretData, SecretStore};
use super::server::TokenReviewer;

/// Longest a TokenReview may take before the request is answered Unavailable.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Validates tokens with `authentication.k8s.io/v1` TokenReview for one audience.
pub struct KubeTokenReviewer {
    api: Api<TokenReview>,
    audience: String,
}

impl KubeTokenReviewer {
    pub fn new(client: Client, audience: impl Into<String>) -> Self {
        Self {
            api: Api::all(client),
            audience: audience.into(),
        }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<ReviewedCaller, Refusal>> {
        async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    audiences: Some(vec![self.audience.clone()]),
                    token: Some(token.to_owned()),
                },
                ..TokenReview::default()
            };
            let created = tokio::time::timeout(
                REVIEW_TIMEOUT,
                self.api.create(&PostParams::default(), &review),
            )
            .await;
            match created {
                Ok(Ok(answer)) => review_outcome(answer.status.as_ref(), &self.audience),
                // kube's error names the request, never its body, so the token stays out.
                Ok(Err(e)) => Err(Refusal::new(
                    RefusalReason::TokenReviewFailed,
                    format!("TokenReview failed: {e}"),
                )),
                Err(_) => Err(Refusal::new(
                    RefusalReason::TokenReviewFailed,
                    "TokenReview timed out",
                )),
            }
        }
        .boxed()
    }
}

/// What the CA keeps of a Pod (nothing else of it is held in memory).
pub fn pod_facts(pod: &Pod) -> Option<PodFacts> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    // Finished pods need no certificates; counting them would keep an identity "on the
    // node" after its last running pod is gone.
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    Some(PodFacts {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        uid: meta.uid.clone()?,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        node: spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
    })
}

/// Keeps `store` in step with every Pod in the cluster until the runtime stops. The watch
/// restarts with back-off on errors; after a restart the relist replaces the store whole.
pub fn spawn_pod_watch(client: Client, store: Arc<PodStore>) {
    let api: Api<Pod> = Api::all(client);
    tokio::spawn(async move {
        let mut events = pod_events(api).default_backoff().boxed();
        let mut relist: Vec<PodFacts> = Vec::new();
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Init) => relist.clear(),
                Ok(Event::InitApply(pod)) => relist.extend(pod_facts(&pod)),
                Ok(Event::InitDone) => {
                    store.replace_all(std::mem::take(&mut relist));
                    tracing::info!(pods = store.len(), "pod index synced");
                }
                Ok(Event::Apply(pod)) => match pod_facts(&pod) {
                    Some(facts) => store.apply(facts),
                    None => delete(&store, &pod),
                },
                Ok(Event::Delete(pod)) => delete(&store, &pod),
                Err(e) => tracing::warn!(error = %e, "pod watch error; retrying"),
            }
        }
    });
}

fn pod_events(api: Api<Pod>) -> impl futures::Stream<Item = Result<Event<Pod>, watcher::Error>> {
    watcher::watcher(api, watcher::Config::default())
}

fn delete(store: &PodStore, pod: &Pod) {
    if let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) {
        store.delete(ns, name);
    }
}

/// The Secrets of one namespace.
pub struct KubeSecrets {
    api: Api<Secret>,
}

impl KubeSecrets {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
        }
    }
}

impl SecretStore for KubeSecrets {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<SecretData>, CaError>> {
        async move {
            let secret = self
                .api
                .get_opt(name)
                .await
                .map_err(|e| CaError::Secret(format!("reading Secret {name}: {e}")))?;
            Ok(secret.map(|s| {
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect()
            }))
        }
        .boxed()
    }

    fn create<'a>(
        &'a self,
        name: &'a str,
        data: SecretData,
    ) -> BoxFuture<'a, Result<Created, CaError>> {
        async move {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
                type_: Some("Opaque".to_owned()),
                ..Secret::default()
            };
            match self.api.create(&PostParams::default(), &secret).await {
                Ok(_) => Ok(Created::Created),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Created::AlreadyExists),
                Err(e) => Err(CaError::Secret(format!("creating Secret {name}: {e}"))),
            }
        }
        .boxed()
    }
}

/// The ConfigMaps of one namespace.
pub struct KubeConfigMaps {
    api: Api<ConfigMap>,
}

impl KubeConfigMaps {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
        }
    }
}

fn config_map(name: &str, data: ConfigMapData, resource_version: Option<&str>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            resource_version: resource_version.map(str::to_owned),
            labels: Some([("app.kubernetes.io/name".to_owned(), "ambit-ca".to_owned())].into()),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}

impl ConfigMapStore for KubeConfigMaps {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<StoredConfigMap>, CaError>> {
        async move {
            let found = self
                .api
                .get_opt(name)
                .await
                .map_err(|e| CaError::Publish(format!("reading ConfigMap {name}: {e}")))?;
            Ok(found.map(|map| StoredConfigMap {
                resource_version: map.metadata.resource_version.unwrap_or_default(),
                data: map.data.unwrap_or_default(),
            }))
        }
        .boxed()
    }

    fn create<'a>(
        &'a self,
        name: &'a str,
        data: ConfigMapData,
    ) -> BoxFuture<'a, Result<Write, CaError>> {
        async move {
            match self
                .api
                .create(&PostParams::default(), &config_map(name, data, None))
                .await
            {
                Ok(_) => Ok(Write::Done),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Write::Conflict),
                Err(e) => Err(CaError::Publish(format!("creating ConfigMap {name}: {e}"))),
            }
        }
        .boxed()
    }

    fn replace<'a>(
        &'a self,
        name: &'a str,
        data: ConfigMapData,
        resource_version: &'a str,
    ) -> BoxFuture<'a, Result<Write, CaError>> {
        async move {
            let map = config_map(name, data, Some(resource_version));
            match self.api.replace(name, &PostParams::default(), &map).await {
                Ok(_) => Ok(Write::Done),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Write::Conflict),
                Err(e) => Err(CaError::Publish(format!("updating ConfigMap {name}: {e}"))),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use serde_json::{Value, json};

    use super::*;
    use crate::ca::secret::{CA_CERT_KEY, CA_KEY_KEY, CaSource, load_or_bootstrap};
    use crate::identity::{CertificateAuthority, LocalCa};

    /// One request as the fake API server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        path: String,
        body: Value,
    }

    type Responder = dyn Fn(&Seen) -> (u16, Value) + Send + Sync;

    /// A kube Client whose "API server" is `respond`, recording every request.
    fn client(respond: Arc<Responder>) -> (Client, Arc<Mutex<Vec<Seen>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let respond = respond.clone();
            let log = log.clone();
            async move {
                let method = request.method().to_string();
                let path = request.uri().path().to_owned();
                let bytes = request.into_body().collect().await.unwrap().to_bytes();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let seen = Seen { method, path, body };
                let (status, answer) = respond(&seen);
                log.lock().unwrap().push(seen);
                let response = http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(answer.to_string())))
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        });
        (Client::new(service, "default"), seen)
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{reason} (fake)"), "reason": reason, "code": code})
    }

    #[tokio::test]
    async fn token_review_asks_for_the_audience_and_reads_the_pod() {
        let (client, seen) = client(Arc::new(|seen: &Seen| {
            let token = seen.body["spec"]["token"].as_str().unwrap_or("");
            if token != "good-token" {
                return (500, status(500, "InternalError"));
            }
            (
                201,
                json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {},
                    "status": {
                        "authenticated": true,
                        "audiences": ["ambit-ca"],
                        "user": {
                            "username": "system:serviceaccount:ambit-system:ambit",
                            "extra": {
                                "authentication.kubernetes.io/pod-name": ["ambit-a"],
                                "authentication.kubernetes.io/pod-uid": ["uid-a"]
                            }
                        }
                    }
                }),
            )
        }));
        let reviewer = KubeTokenReviewer::new(client, "ambit-ca");
        let caller = reviewer.review("good-token").await.unwrap();
        assert_eq!(caller.service_account.to_string(), "ambit-system/ambit");
        assert_eq!(caller.pod_name.as_deref(), Some("ambit-a"));
        assert_eq!(caller.pod_uid.as_deref(), Some("uid-a"));
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen[0].method, "POST");
            assert_eq!(seen[0].path, "/apis/authentication.k8s.io/v1/tokenreviews");
            assert_eq!(seen[0].body["spec"]["audiences"], json!(["ambit-ca"]));
        }

        // The API server failing is not the caller's fault, and the token stays out of
        // the error.
        let refusal = reviewer.review("secret-token-value").await.unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::TokenReviewFailed);
        assert!(
            !refusal.detail.contains("secret-token-value"),
            "{}",
            refusal.detail
        );
    }

    /// The race as the API server plays it: both replicas saw no Secret, the other one's
    /// create landed first, ours gets 409 and must use the stored root.
    #[tokio::test]
    async fn losing_the_create_race_reads_the_winners_secret() {
        let (winner, cert_pem, key_pem) = LocalCa::generate_root_pem().unwrap();
        let created = Arc::new(Mutex::new(false));
        let stored = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "ambit-ca", "namespace": "ambit-system"},
            "data": {
                CA_CERT_KEY: base64(cert_pem.as_bytes()),
                CA_KEY_KEY: base64(key_pem.as_bytes()),
            }
        });
        let respond = {
            let created = created.clone();
            move |seen: &Seen| match (seen.method.as_str(), seen.path.as_str()) {
                ("GET", "/api/v1/namespaces/ambit-system/secrets/ambit-ca")
                    if *created.lock().unwrap() =>
                {
                    (200, stored.clone())
                }
                ("GET", _) => (404, status(404, "NotFound")),
                ("POST", "/api/v1/namespaces/ambit-system/secrets") => {
                    // The winner's create lands between our read and our create.
                    *created.lock().unwrap() = true;
                    (409, status(409, "AlreadyExists"))
                }
                _ => (400, status(400, "BadRequest")),
            }
        };
        let (client, seen) = client(Arc::new(respond));
        let secrets = KubeSecrets::new(client, "ambit-system");
        let (ca, source) = load_or_bootstrap(&secrets, "cacerts", "ambit-ca")
            .await
            .unwrap();
        assert_eq!(source, CaSource::Existing);
        assert_eq!(ca.trust_bundle(), winner.trust_bundle());
        let seen = seen.lock().unwrap();
        let calls: Vec<(&str, &str)> = seen
            .iter()
            .map(|s| (s.method.as_str(), s.path.as_str()))
            .collect();
        assert_eq!(
            calls,
            [
                ("GET", "/api/v1/namespaces/ambit-system/secrets/cacerts"),
                ("GET", "/api/v1/namespaces/ambit-system/secrets/ambit-ca"),
                ("POST", "/api/v1/namespaces/ambit-system/secrets"),
                ("GET", "/api/v1/namespaces/ambit-system/secrets/ambit-ca"),
            ]
        );
        // What we tried to store: our own root and key, under the agreed keys.
        let body = &seen[2].body;
        assert_eq!(body["metadata"]["name"], "ambit-ca");
        assert!(body["data"][CA_CERT_KEY].is_string() && body["data"][CA_KEY_KEY].is_string());
    }

    fn base64(bytes: &[u8]) -> String {
        serde_json::to_value(ByteString(bytes.to_vec()))
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn pod(phase: &str, sa: Option<&str>, node: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some("web-1".into()),
                uid: Some("uid-1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                service_account_name: sa.map(Into::into),
                node_name: node.map(Into::into),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn pod_facts_keep_what_the_ca_needs() {
        let facts = pod_facts(&pod("Running", Some("web"), Some("node-a"))).unwrap();
        assert_eq!(
            facts,
            PodFacts {
                namespace: "shop".into(),
                name: "web-1".into(),
                uid: "uid-1".into(),
                service_account: "web".into(),
                node: Some("node-a".into()),
            }
        );
        // No service account named: Kubernetes uses "default".
        let facts = pod_facts(&pod("Pending", None, None)).unwrap();
        assert_eq!(facts.service_account, "default");
        assert_eq!(facts.node, None);
        assert_eq!(
            pod_facts(&pod("Succeeded", Some("web"), Some("node-a"))),
            None
        );
        assert_eq!(pod_facts(&pod("Failed", Some("web"), Some("node-a"))), None);
    }
}
