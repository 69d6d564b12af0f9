//! The enrollment outcome on the pod itself: annotation `ambit.dev/status` (`enrolled` or
//! `error: <reason>`), so `kubectl get pod -o yaml` shows it. Written through the
//! `pods/status` subresource (RBAC: `patch` on `pods/status` only), from a task of its
//! own so that a slow API server never holds up enrollment.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::mpsc;
use tracing::{debug, warn};

pub const STATUS_ANNOTATION: &str = "ambit.dev/status";

/// One pod's desired annotation value (`None` removes it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Update {
    namespace: String,
    name: String,
    uid: String,
    value: Option<String>,
}

/// Queues annotation updates; only changes reach the API server.
#[derive(Clone)]
pub struct StatusWriter {
    tx: mpsc::UnboundedSender<Update>,
}

impl StatusWriter {
    pub fn spawn(client: kube::Client) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(client, rx));
        Self { tx }
    }

    /// Sets the pod's status annotation; `None` removes it (the pod left the mesh).
    pub fn set(&self, namespace: &str, name: &str, uid: &str, value: Option<String>) {
        let _ = self.tx.send(Update {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
            value,
        });
    }
}

async fn write_loop(client: kube::Client, mut rx: mpsc::UnboundedReceiver<Update>) {
    // What each pod (by UID) shows now, so repeated reconciles write nothing.
    let mut written: HashMap<String, Option<String>> = HashMap::new();
    let mut failing = false;
    while let Some(update) = rx.recv().await {
        if written.get(&update.uid) == Some(&update.value)
            || (update.value.is_none() && !written.contains_key(&update.uid))
        {
            continue;
        }
        let api: Api<Pod> = Api::namespaced(client.clone(), &update.namespace);
        let patch = serde_json::json!({
            "metadata": {
                // The UID guards against annotating a new pod that took the old one's name.
                "uid": update.uid,
                "annotations": { STATUS_ANNOTATION: update.value },
            }
        });
        match api
            .patch_status(&update.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                debug!(pod = %format_args!("{}/{}", update.namespace, update.name), value = ?update.value, "status annotation written");
                failing = false;
                if update.value.is_none() {
                    written.remove(&update.uid);
                } else {
                    written.insert(update.uid, update.value);
                }
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
                // The pod is gone or was replaced: nothing to annotate.
                written.remove(&update.uid);
            }
            Err(e) => {
                if !failing {
                    warn!(pod = %format_args!("{}/{}", update.namespace, update.name), error = %e, "cannot write the status annotation; will retry on the next change");
                    failing = true;
                }
            }
        }
    }
}
