//! The testbed as a Kubernetes cluster: the fake API server holds the namespaces, pods,
//! services, EndpointSlices and Istio policies of the testbed, and every pod gets a
//! "sandbox" process in its network namespace, placed in a cgroup v2 directory laid out
//! like the kubelet's systemd driver
//! (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`),
//! so the agent's /proc scan finds it exactly as on a node. Processes and cgroups go away
//! on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;
use serde_json::Value;

use crate::apiserver::{self, ApiServer, Kind};
use crate::testbed::{APP_PORT, MESH_NS, PLAIN_NS, Pod, Testbed};
use crate::unique_name;

/// A pod's sandbox: one process in the pod's netns and its kubelet-like cgroup.
pub struct Sandbox {
    child: Child,
    /// The pod's cgroup (`…-pod<uid>.slice`) under the test's root.
    slice: PathBuf,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Bottom-up: the scope, then the pod slice (the QoS slices go with the root).
        if let Ok(entries) = std::fs::read_dir(&self.slice) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.slice);
    }
}

pub struct KubeBed {
    pub api: ApiServer,
    pub kubeconfig: PathBuf,
    /// Pod name → its sandbox.
    sandboxes: Vec<(String, Sandbox)>,
    /// `<cgroup2>/ambit-e2e-<unique>`: everything this testbed created in the cgroup tree.
    cgroup_root: PathBuf,
}

impl Drop for KubeBed {
    fn drop(&mut self) {
        self.sandboxes.clear();
        for qos in ["kubepods-besteffort.slice", ""] {
            let _ = std::fs::remove_dir(self.cgroup_root.join("kubepods.slice").join(qos));
        }
        let _ = std::fs::remove_dir(&self.cgroup_root);
    }
}

/// A pod UID in Kubernetes' form, unique per call.
pub fn new_uid() -> String {
    let hex: String = unique_name("")
        .bytes()
        .map(|b| format!("{:02x}", b))
        .collect::<String>()
        .chars()
        .rev()
        .take(32)
        .collect();
    let hex = format!("{hex:0>32}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl KubeBed {
    /// Starts the API server with the testbed's namespaces (MESH_NS labelled while
    /// `mesh_enabled`), pods (with sandboxes) but those named in `except`, services and
    /// policies.
    pub fn new(bed: &Testbed, except: &[&str]) -> anyhow::Result<Self> {
        let cgroup2 = ambit_agent::capture::cgroup2_root().context("no cgroup v2 mount")?;
        let cgroup_root = cgroup2.join(unique_name("ambit-e2e-"));
        std::fs::create_dir_all(cgroup_root.join("kubepods.slice/kubepods-besteffort.slice"))
            .with_context(|| format!("creating {}", cgroup_root.display()))?;
        let api = ApiServer::start();
        let kubeconfig = bed.dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let mut kube = Self {
            api,
            kubeconfig,
            sandboxes: Vec::new(),
            cgroup_root,
        };
        let mut namespaces: Vec<&str> = bed.pods.iter().map(|p| p.spec.namespace).collect();
        namespaces.extend([MESH_NS, PLAIN_NS]);
        namespaces.sort_unstable();
        namespaces.dedup();
        for ns in namespaces {
            let labels: &[(&str, &str)] = if ns != PLAIN_NS && bed.mesh_enabled {
                &[("ambit.dev/mesh", "enabled")]
            } else {
                &[]
            };
            kube.api.create(&apiserver::namespace(ns, labels))?;
        }
        for pod in bed.pods.iter().filter(|p| !except.contains(&p.spec.name)) {
            kube.add_pod(bed, pod)?;
        }
        for s in &bed.services {
            kube.api.create(&apiserver::service(
                MESH_NS,
                s.name,
                &[("app", s.selector_app)],
                &s.vip.to_string(),
                &[("http", i32::from(s.port), i32::from(APP_PORT))],
            ))?;
            let endpoints: Vec<(String, &str)> = bed
                .pods
                .iter()
                .filter(|p| p.spec.namespace == MESH_NS && p.spec.name == s.selector_app)
                .map(|p| (p.ip.to_string(), p.spec.name))
                .collect();
            let endpoints: Vec<(&str, bool, Option<&str>)> = endpoints
                .iter()
                .map(|(ip, name)| (ip.as_str(), true, Some(*name)))
                .collect();
            kube.api.create(&apiserver::endpoint_slice(
                MESH_NS,
                &format!("{}-1", s.name),
                s.name,
                &endpoints,
                &[("http", i32::from(APP_PORT))],
            ))?;
        }
        kube.set_policies(&bed.policies)?;
        Ok(kube)
    }

    /// Registers `pod` with the API server and gives it a sandbox process in its cgroup.
    pub fn add_pod(&mut self, bed: &Testbed, pod: &Pod) -> anyhow::Result<String> {
        let uid = new_uid();
        let mut builder = apiserver::pod(pod.spec.namespace, pod.spec.name)
            .uid(&uid)
            .node(&bed.nodes[pod.spec.node].name)
            .ip(&pod.ip.to_string())
            .service_account(pod.spec.service_account);
        for (k, v) in &pod.spec.labels {
            builder = builder.label(k, v);
        }
        self.api.create(&builder.build())?;
        self.start_sandbox(pod, &uid)?;
        Ok(uid)
    }

    /// Starts a process inside `pod`'s netns in the cgroup the kubelet's systemd driver
    /// would give a best-effort pod with `uid`.
    pub fn start_sandbox(&mut self, pod: &Pod, uid: &str) -> anyhow::Result<()> {
        let slice = self.cgroup_root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        let scope = slice.join(format!("cri-containerd-{}.scope", unique_name("c")));
        std::fs::create_dir_all(&scope)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", pod.ns.path().display()))
            .args(["sleep", "3600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a sandbox process")?;
        let sandbox = Sandbox { child, slice };
        std::fs::write(scope.join("cgroup.procs"), sandbox.child.id().to_string())
            .with_context(|| format!("moving the sandbox into {}", scope.display()))?;
        self.sandboxes.push((pod.spec.name.to_owned(), sandbox));
        Ok(())
    }

    /// Replaces every Istio policy in the API server with the YAML documents in `yaml`.
    pub fn set_policies(&self, yaml: &str) -> anyhow::Result<()> {
        for kind in [Kind::PeerAuthentication, Kind::AuthorizationPolicy] {
            for existing in self.api.list_json(kind) {
                let ns = existing["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default();
                let name = existing["metadata"]["name"].as_str().unwrap_or_default();
                self.api.delete_json(kind, ns, name)?;
            }
        }
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(document)?;
            if value.is_null() {
                continue;
            }
            let kind = match value["kind"].as_str() {
                Some("PeerAuthentication") => Kind::PeerAuthentication,
                Some("AuthorizationPolicy") => Kind::AuthorizationPolicy,
                other => anyhow::bail!("not an Istio policy: {other:?}"),
            };
            let mut value = value;
            if value["metadata"]["namespace"].is_null() {
                value["metadata"]["namespace"] = Value::from("default");
            }
            self.api.create_json(kind, value)?;
        }
        Ok(())
    }

    /// Sets or removes the mesh label of a namespace.
    pub fn label_namespace(&self, namespace: &str, enabled: Option<&str>) -> anyhow::Result<()> {
        self.api.patch_labels(
            Kind::Namespace,
            "",
            namespace,
            &[("ambit.dev/mesh", enabled)],
        )?;
        Ok(())
    }

    /// The `ambit run` arguments that point an agent at this cluster.
    pub fn agent_args(&self, dir: &Path, node: &str) -> Vec<String> {
        vec![
            "--kubernetes".into(),
            "--kubeconfig".into(),
            self.kubeconfig.display().to_string(),
            "--proc-root".into(),
            "/proc".into(),
            "--cni-socket".into(),
            dir.join(format!("{node}-cni.sock")).display().to_string(),
            "--namespaces-file".into(),
            dir.join(format!("{node}-mesh-namespaces"))
                .display()
                .to_string(),
        ]
    }
}
