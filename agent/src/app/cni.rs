//! The agent's side of the `ambit-cni` plugin: an ADD for a pod of an opted-in namespace
//! is answered only once the pod's listeners, inbound steering and outbound capture are
//! in place (so the pod's first connection is already in the mesh); a DEL unenrolls.
//! Requests are served on a task of their own and handed to the agent's loop, which owns
//! the enrolled pods.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use super::enroll::Agent;
use crate::cni::{CniCommand, CniHandler, CniRequest, CniResponse};
use crate::config::WorkloadEntry;
use crate::k8s::CniHint;

/// How long an ADD waits for the pod to be enrolled before failing (the kubelet retries).
const ADD_DEADLINE: Duration = Duration::from_secs(20);

pub(super) type Request = (CniRequest, oneshot::Sender<CniResponse>);

struct Forward(mpsc::Sender<Request>);

impl CniHandler for Forward {
    fn handle(&self, request: CniRequest) -> BoxFuture<'_, CniResponse> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            if self.0.send((request, reply)).await.is_err() {
                return CniResponse::error("the agent is shutting down");
            }
            match tokio::time::timeout(ADD_DEADLINE, answer).await {
                Ok(Ok(response)) => response,
                Ok(Err(_)) => CniResponse::error("the agent dropped the request"),
                Err(_) => CniResponse::error(format!(
                    "pod not enrolled within {}s",
                    ADD_DEADLINE.as_secs()
                )),
            }
        })
    }
}

/// An ADD waiting for its pod to be enrolled.
pub(super) struct Waiter {
    key: String,
    reply: oneshot::Sender<CniResponse>,
}

impl Agent {
    /// Serves the CNI socket at `path`; requests come back through the returned channel.
    pub(super) async fn serve_cni(&self, path: &Path) -> anyhow::Result<mpsc::Receiver<Request>> {
        let listener = crate::cni::bind(path)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(crate::cni::serve(listener, Arc::new(Forward(tx))));
        info!(socket = %path.display(), "serving the CNI plugin");
        Ok(rx)
    }

    pub(super) async fn cni_request(&mut self, (request, reply): Request) {
        let Some(kube) = &self.kube else {
            let _ = reply.send(CniResponse::error("agent is not in Kubernetes mode"));
            return;
        };
        let key = format!("{}/{}", request.pod_namespace, request.pod_name);
        match request.command {
            CniCommand::Add => {
                if !kube
                    .source
                    .mesh_namespaces()
                    .contains(&request.pod_namespace)
                {
                    let _ = reply.send(CniResponse::not_in_mesh());
                    return;
                }
                info!(pod = %key, netns = %request.netns, "CNI ADD: enrolling");
                kube.source.set_hint(
                    &request.pod_namespace,
                    &request.pod_name,
                    Some(CniHint {
                        ips: request.ips.clone(),
                    }),
                );
                self.cni_netns
                    .insert(key.clone(), PathBuf::from(&request.netns));
                self.waiters.push(Waiter { key, reply });
                // The hint may change nothing in the state (the API server already shows
                // the IPs): enroll with the state in force now.
                let state = self.shared.state();
                self.reconcile(&state).await;
            }
            CniCommand::Del => {
                kube.source
                    .set_hint(&request.pod_namespace, &request.pod_name, None);
                if let Some(netns) = self.cni_netns.remove(&key) {
                    self.stop_netns(&netns).await;
                }
                let _ = reply.send(CniResponse::removed());
            }
            CniCommand::Check => {
                let response = if self.is_enrolled(&key)
                    || !kube
                        .source
                        .mesh_namespaces()
                        .contains(&request.pod_namespace)
                {
                    CniResponse::enrolled()
                } else {
                    CniResponse::error(format!("pod {key} is in the mesh but not enrolled"))
                };
                let _ = reply.send(response);
            }
        }
    }

    /// Answers the ADDs whose pods are now enrolled, left the mesh, or failed.
    pub(super) fn answer_waiters(&mut self) {
        let waiters = std::mem::take(&mut self.waiters);
        let state = self.shared.state();
        for waiter in waiters {
            if waiter.reply.is_closed() {
                continue;
            }
            let (namespace, name) = waiter.key.split_once('/').unwrap_or_default();
            let workload = state.workload_by_name(namespace, name);
            let response = add_answer(workload.map(|w| &**w), &state.node, || {
                if self.is_enrolled(&waiter.key) {
                    Ok(())
                } else {
                    self.problem(&waiter.key)
                        .map_or(Err(None), |p| Err(Some(p)))
                }
            });
            match response {
                Some(response) => {
                    let _ = waiter.reply.send(response);
                }
                None => self.waiters.push(waiter),
            }
        }
    }
}

/// The answer to an ADD for `workload` as the state in force on `node` shows it, or `None`
/// to keep the ADD waiting. `enrollment` is asked only for a pod of the mesh on this node:
/// `Ok` once enrolled, `Err(Some(problem))` if enrolling it failed, `Err(None)` while it is
/// still being enrolled.
fn add_answer(
    workload: Option<&WorkloadEntry>,
    node: &str,
    enrollment: impl FnOnce() -> Result<(), Option<String>>,
) -> Option<CniResponse> {
    match workload {
        // Not shown by the API server yet: keep waiting.
        None => None,
        // Shown, but from a state built before this ADD's addresses arrived (a pod without
        // an IP is never in the mesh): answering now would let an opted-in pod start
        // unenrolled. The state with the addresses follows.
        Some(w) if w.ips.is_empty() => None,
        Some(w) if !w.in_mesh || w.node != node => Some(CniResponse::not_in_mesh()),
        Some(_) => match enrollment() {
            Ok(()) => Some(CniResponse::enrolled()),
            Err(Some(problem)) => Some(CniResponse::error(problem)),
            Err(None) => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::CniResult;

    fn workload(ips: &[&str], in_mesh: bool, node: &str) -> WorkloadEntry {
        WorkloadEntry {
            name: "app".into(),
            namespace: "mesh".into(),
            service_account: "app".into(),
            identity: crate::identity::SpiffeId::new("cluster.local", "mesh", "app")
                .expect("identity"),
            labels: Default::default(),
            ips: ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
            node: node.to_owned(),
            uid: None,
            netns: None,
            interface: "eth0".into(),
            in_mesh,
        }
    }

    fn result(answer: Option<CniResponse>) -> Option<CniResult> {
        answer.map(|a| a.result)
    }

    #[test]
    fn an_add_is_answered_only_from_a_state_that_shows_the_pod_with_its_addresses() {
        let enrolled = || Ok(());
        let pending = || Err(None);
        let failed = || Err(Some("no netns".to_owned()));
        let here = "node-a";
        let meshed = workload(&["10.0.0.5"], true, here);
        // Unknown, or known without addresses yet (the fail-open race): wait, whatever
        // enrollment says.
        assert_eq!(result(add_answer(None, here, enrolled)), None);
        let no_ip = workload(&[], true, here);
        assert_eq!(result(add_answer(Some(&no_ip), here, enrolled)), None);
        let no_ip_out = workload(&[], false, here);
        assert_eq!(result(add_answer(Some(&no_ip_out), here, enrolled)), None);
        // Out of the mesh, or on another node: not ours to enroll.
        let out = workload(&["10.0.0.5"], false, here);
        assert_eq!(
            result(add_answer(Some(&out), here, enrolled)),
            Some(CniResult::NotInMesh)
        );
        let elsewhere = workload(&["10.0.0.5"], true, "node-b");
        assert_eq!(
            result(add_answer(Some(&elsewhere), here, enrolled)),
            Some(CniResult::NotInMesh)
        );
        // In the mesh here: enrolled, failed (named), or still going.
        assert_eq!(
            result(add_answer(Some(&meshed), here, enrolled)),
            Some(CniResult::Enrolled)
        );
        let answer = add_answer(Some(&meshed), here, failed).expect("an answer");
        assert_eq!(answer.result, CniResult::Error);
        assert!(answer.message.contains("no netns"), "{}", answer.message);
        assert_eq!(result(add_answer(Some(&meshed), here, pending)), None);
    }
}
