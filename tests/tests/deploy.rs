//! The shipped Kubernetes manifests (deploy/): valid against the API schemas of the pinned
//! Kubernetes version, wired together by kustomize as documented, least privilege, RBAC
//! exactly as documented, flags the binaries really accept, and a local-mode ConfigMap that
//! the agent's own parser accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

/// The Kubernetes version the manifests are validated against: the one k8s-openapi is built
/// for (`v1_35` in the workspace Cargo.toml), and the version of `kubernetes-validate`
/// `cargo xtask setup` installs.
const KUBERNETES_VERSION: &str = "1.35.0";

/// Kinds with no schema in `kubernetes-validate` and why they are not schema-checked:
/// kustomize's own files are not API objects; the Prometheus Operator's CRs are checked by
/// the end-to-end test `prometheus_rule_uses_only_exported_metrics` against a live scrape.
const NO_SCHEMA: &[(&str, &str)] = &[
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
    ("kustomize.config.k8s.io/v1alpha1", "Component"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy_dir() -> PathBuf {
    workspace().join("deploy")
}

fn documents_at(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn documents(file: &str) -> Vec<Value> {
    documents_at(&deploy_dir().join(file))
}

/// Every YAML file under deploy/, relative to it, sorted.
fn yaml_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read deploy/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir(), &mut out);
    out.sort();
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod[list]
        .as_sequence()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

/// A container's mounts by path inside it → (volume, readOnly, propagation).
fn volume_mounts(container: &Value) -> BTreeMap<String, (String, bool, Option<String>)> {
    container["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().expect("mountPath").to_owned(),
                (
                    m["name"].as_str().expect("name").to_owned(),
                    m["readOnly"].as_bool().unwrap_or(false),
                    m["mountPropagation"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
}

fn env_field(container: &Value, name: &str) -> String {
    env_value_from(container, name)["fieldRef"]["fieldPath"]
        .as_str()
        .unwrap_or_else(|| panic!("env {name} from a fieldRef"))
        .to_owned()
}

/// The `valueFrom` of the container's env variable `name`.
fn env_value_from<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_sequence()
        .and_then(|e| e.iter().find(|x| x["name"] == name))
        .map(|x| &x["valueFrom"])
        .unwrap_or_else(|| panic!("env {name} from a valueFrom"))
}

/// `--flag=value` arguments as a map (flags without a value map to "").
fn flags(args: &[String]) -> BTreeMap<String, String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| match a.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (a.to_owned(), String::new()),
        })
        .collect()
}

#[test]
fn every_manifest_validates_against_the_pinned_kubernetes_schemas() {
    let tools = workspace().join(".tools/python");
    assert!(
        tools.join("kubernetes_validate").is_dir(),
        "kubernetes-validate is not installed in {}: run `cargo xtask setup`",
        tools.display()
    );
    let mut checked = Vec::new();
    let mut skipped = Vec::new();
    for file in yaml_files() {
        let docs = documents_at(&file);
        let no_schema = |d: &Value| {
            NO_SCHEMA
                .iter()
                .any(|(api, kind)| d["apiVersion"] == *api && d["kind"] == *kind)
        };
        if docs.iter().all(no_schema) {
            skipped.push(file);
            continue;
        }
        assert!(
            !docs.iter().any(no_schema),
            "{}: mixes objects with and without a schema; keep them in separate files",
            file.display()
        );
        checked.push(file);
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
        ])
        .args(&checked)
        .env("PYTHONPATH", &tools)
        .output()
        .expect("running python3 -m kubernetes_validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schema validation failed:\n{report}");
    // Nothing may pass silently for want of a schema (a typo in apiVersion would).
    assert!(
        !report.contains("WARN") && !report.contains("ERROR"),
        "validator warnings:\n{report}"
    );
    let passed = report.matches(" passed for resource ").count();
    let objects: usize = checked.iter().map(|f| documents_at(f).len()).sum();
    assert_eq!(passed, objects, "every object validated once:\n{report}");
    // The skipped files are exactly the kustomize files and the monitoring CRs.
    let skipped: BTreeSet<String> = skipped
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        skipped,
        BTreeSet::from(
            [
                "kustomization.yaml",
                "podmonitor.yaml",
                "prometheusrule.yaml"
            ]
            .map(String::from)
        )
    );
}

/// The files a kustomization directory renders, following `resources` and `components`.
fn kustomize_files(dir: &Path, out: &mut BTreeSet<PathBuf>) {
    let k = &documents_at(&dir.join("kustomization.yaml"))[0];
    let refs = strings(&k["resources"])
        .into_iter()
        .chain(strings(&k["components"]));
    for r in refs {
        let path = dir.join(&r);
        let path = path
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {r}: {e}", dir.display()));
        if path.is_dir() {
            kustomize_files(&path, out);
        } else {
            out.insert(path);
        }
    }
}

fn rendered(dir: &str) -> (BTreeSet<PathBuf>, Vec<Value>) {
    let mut files = BTreeSet::new();
    kustomize_files(&deploy_dir().join(dir), &mut files);
    let docs = files.iter().flat_map(|f| documents_at(f)).collect();
    (files, docs)
}

#[test]
fn kustomizations_ship_every_manifest_and_crds_only_in_the_optional_overlay() {
    let (base, base_docs) = rendered(".");
    let (without_istio, _) = rendered("overlays/without-istio");
    let (monitoring, _) = rendered("monitoring");
    let (uninstall, _) = rendered("uninstall");
    let crds = deploy_dir()
        .join("components/istio-crds/crds.yaml")
        .canonicalize()
        .unwrap();
    assert!(!base.contains(&crds), "the base must not ship Istio's CRDs");
    assert_eq!(
        without_istio,
        base.iter().cloned().chain([crds]).collect(),
        "without-istio = base + CRDs"
    );
    // Every manifest is reachable from one of the entry points, except the local-mode example.
    let reachable: BTreeSet<_> = base
        .iter()
        .chain(&without_istio)
        .chain(&monitoring)
        .chain(&uninstall)
        .cloned()
        .collect();
    for file in yaml_files() {
        let file = file.canonicalize().unwrap();
        let name = file.file_name().unwrap().to_string_lossy();
        if name == "kustomization.yaml"
            || file.starts_with(deploy_dir().join("local-mode").canonicalize().unwrap())
        {
            continue;
        }
        assert!(
            reachable.contains(&file),
            "{} is in no kustomization",
            file.display()
        );
    }
    // The base: one namespace, the agent and the CA; nothing cluster-wide beyond RBAC.
    let kinds: BTreeSet<String> = base_docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(
            [
                "ClusterRole",
                "ClusterRoleBinding",
                "DaemonSet",
                "Deployment",
                "Namespace",
                "PodDisruptionBudget",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount"
            ]
            .map(String::from)
        )
    );
    for d in &base_docs {
        if d["kind"] != "Namespace" && !d["kind"].as_str().unwrap().starts_with("Cluster") {
            assert_eq!(
                d["metadata"]["namespace"], "ambit-system",
                "{:?}",
                d["metadata"]
            );
        }
    }
}

#[test]
fn istio_crds_match_istios_group_kinds_and_versions() {
    let docs = documents("components/istio-crds/crds.yaml");
    let mut seen = BTreeSet::new();
    for crd in &docs {
        assert_eq!(crd["spec"]["group"], "security.istio.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let plural = crd["spec"]["names"]["plural"].as_str().unwrap();
        assert_eq!(
            crd["metadata"]["name"].as_str().unwrap(),
            format!("{plural}.security.istio.io")
        );
        let versions: Vec<(String, bool, bool)> = crd["spec"]["versions"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_owned(),
                    v["served"].as_bool().unwrap(),
                    v["storage"].as_bool().unwrap(),
                )
            })
            .collect();
        // The agent reads v1, else v1beta1 (docs/KUBERNETES.md).
        assert_eq!(
            versions,
            [("v1".into(), true, true), ("v1beta1".into(), true, false)]
        );
        seen.insert(crd["spec"]["names"]["kind"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        seen,
        BTreeSet::from([
            "AuthorizationPolicy".to_owned(),
            "PeerAuthentication".to_owned()
        ])
    );
}

/// The capability justification block at the top of a manifest: `#   CAP  why`.
fn justified_capabilities(file: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| {
            let word = l.strip_prefix("#   ")?.split_whitespace().next()?;
            (word.len() > 2 && word.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
                .then(|| word.to_owned())
        })
        .collect()
}

/// Every container of every workload: not privileged, no escalation, all capabilities
/// dropped, none added beyond `allowed`; no host namespaces on the pod.
fn assert_least_privilege(pod: &Value, what: &str) -> BTreeSet<String> {
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(
            pod[host].as_bool() != Some(true),
            "{what}: {host} must stay off"
        );
    }
    let mut added = BTreeSet::new();
    for list in ["initContainers", "containers"] {
        for c in pod[list].as_sequence().into_iter().flatten() {
            let name = format!("{what}/{}", c["name"].as_str().unwrap());
            let s = &c["securityContext"];
            assert!(
                !s["privileged"].as_bool().unwrap_or(false),
                "{name}: privileged"
            );
            assert_eq!(
                s["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{name}"
            );
            assert_eq!(s["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
            assert_eq!(strings(&s["capabilities"]["drop"]), ["ALL"], "{name}");
            added.extend(strings(&s["capabilities"]["add"]));
        }
    }
    added
}

#[test]
fn agent_daemonset_is_least_privilege_with_each_capability_justified() {
    let ds = &documents("agent/daemonset.yaml")[0];
    let pod = &ds["spec"]["template"]["spec"];
    let added = assert_least_privilege(pod, "agent DaemonSet");
    let expected: BTreeSet<String> = ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]
        .map(String::from)
        .into();
    assert_eq!(added, expected);
    assert_eq!(justified_capabilities("agent/daemonset.yaml"), expected);
    // The installer needs none: it writes as the owner (root) of the node's CNI directories.
    let init = container(pod, "initContainers", "install-cni");
    assert!(strings(&init["securityContext"]["capabilities"]["add"]).is_empty());

    let ds = &documents("uninstall/daemonset.yaml")[0];
    let pod = &ds["spec"]["template"]["spec"];
    let added = assert_least_privilege(pod, "uninstall DaemonSet");
    assert_eq!(added, justified_capabilities("uninstall/daemonset.yaml"));
}

#[test]
fn agent_daemonset_runs_kubernetes_mode_with_the_documented_mounts() {
    let ds = &documents("agent/daemonset.yaml")[0];
    let pod = &ds["spec"]["template"]["spec"];
    let agent = container(pod, "containers", "agent");
    let args = strings(&agent["args"]);
    assert_eq!(args.first().map(String::as_str), Some("run"));
    let f = flags(&args);
    assert_eq!(f["kubernetes"], "");
    assert_eq!(env_field(agent, "NODE_NAME"), "spec.nodeName");
    // Its CPU limit reaches it through the downward API, in millicores (it cannot read its
    // own cgroup quota under the host's cgroup mount).
    let cpu_limit = &env_value_from(agent, "AMBIT_CPU_LIMIT_MILLIS")["resourceFieldRef"];
    assert_eq!(cpu_limit["containerName"], "agent");
    assert_eq!(cpu_limit["resource"], "limits.cpu");
    assert_eq!(cpu_limit["divisor"], "1m");

    let mounts = volume_mounts(agent);
    let host_paths: BTreeMap<String, String> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_owned(),
                v["hostPath"]["path"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let host_path_at = |path: &str| {
        let (volume, ro, prop) = mounts
            .get(path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"));
        (host_paths.get(volume).cloned(), *ro, prop.clone())
    };
    // Host /proc read-only, scanned through --proc-root.
    assert_eq!(
        host_path_at(&f["proc-root"]),
        (Some("/proc".into()), true, None)
    );
    // Pods' netns bind mounts, including those made after the agent started.
    assert_eq!(
        host_path_at("/var/run/netns"),
        (
            Some("/var/run/netns".into()),
            true,
            Some("HostToContainer".into())
        )
    );
    // bpffs (pins outlive the container) and the cgroup v2 root.
    assert_eq!(
        host_path_at("/sys/fs/bpf"),
        (Some("/sys/fs/bpf".into()), false, None)
    );
    assert!(Path::new(&f["pin-dir"]).starts_with("/sys/fs/bpf"));
    assert_eq!(
        host_path_at("/sys/fs/cgroup"),
        (Some("/sys/fs/cgroup".into()), true, None)
    );
    // The CNI socket and namespaces file: the plugin runs on the node, so the paths the
    // agent uses must be the node's own paths, and the installer must tell the plugin so.
    for flag in ["cni-socket", "namespaces-file"] {
        let path = Path::new(&f[flag]);
        let dir = path.parent().unwrap().to_str().unwrap();
        assert_eq!(host_path_at(dir).0.as_deref(), Some(dir), "{flag}");
    }
    let init = container(pod, "initContainers", "install-cni");
    let install = strings(&init["command"]);
    assert_eq!(install[..2], ["/usr/local/bin/ambit-cni", "install"]);
    let install = flags(&install);
    assert_eq!(install["socket"], f["cni-socket"]);
    assert_eq!(install["namespaces-file"], f["namespaces-file"]);
    // The chain watch sees the same node directories as the installer: the config dir
    // writable (it re-chains), the bin dir read-only (it only checks the binary is there).
    let init_mounts = volume_mounts(init);
    for (flag, read_only) in [("conf-dir", false), ("bin-dir", true)] {
        let agent_flag = format!("cni-{flag}");
        assert_eq!(f[&agent_flag], install[flag], "{agent_flag}");
        let (host, ro, _) = host_path_at(&f[&agent_flag]);
        assert_eq!(ro, read_only, "{agent_flag} read-only");
        assert_eq!(
            host,
            host_paths.get(&init_mounts[&install[flag]].0).cloned(),
            "{agent_flag}: the same node directory as the installer's"
        );
    }
    assert_eq!(
        host_path_at(&f["cni-conf-dir"]).0.as_deref(),
        Some("/etc/cni/net.d")
    );

    // The CA: the projected token's audience is the CA's, the trust file comes from the
    // ambit-root ConfigMap, the address names the CA's Service.
    let ca_docs = documents("ca/deployment.yaml");
    let ca_args = flags(&strings(
        &container(&ca_docs[0]["spec"]["template"]["spec"], "containers", "ca")["args"],
    ));
    let token_volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "ca-token")
        .unwrap();
    let token = &token_volume["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(
        token["audience"].as_str(),
        Some(ca_args["token-audience"].as_str())
    );
    let token_dir = Path::new(&f["ca-token-file"]).parent().unwrap();
    assert_eq!(mounts[token_dir.to_str().unwrap()].0, "ca-token");
    assert_eq!(
        Path::new(&f["ca-token-file"]).file_name().unwrap(),
        token["path"].as_str().unwrap()
    );
    let trust_dir = Path::new(&f["ca-trust-file"]).parent().unwrap();
    let root_volume = &mounts[trust_dir.to_str().unwrap()].0;
    let root = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == root_volume.as_str())
        .unwrap();
    // Published by the CA (its --root-configmap), key root.pem; not optional, so the agent
    // never starts without trust (the kubelet retries until the CA has published it).
    assert_eq!(root["configMap"]["name"], "ambit-root");
    assert_eq!(ca_args["root-configmap"], "ambit-root");
    assert!(root["configMap"]["optional"].as_bool() != Some(true));
    assert_eq!(root["configMap"]["items"][0]["key"], "root.pem");
    assert_eq!(
        Path::new(&f["ca-trust-file"]).file_name().unwrap(),
        root["configMap"]["items"][0]["path"].as_str().unwrap()
    );
    let ca_host = f["ca-address"]
        .strip_prefix("https://")
        .and_then(|a| a.rsplit_once(':'))
        .unwrap();
    assert_eq!(ca_host, ("ambit-ca.ambit-system.svc", "15012"));
    assert!(ca_args["dns-names"].split(',').any(|n| n == ca_host.0));

    // Probes and ports the agent really serves (its defaults: metrics :15020, ready :15021).
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    assert_eq!(
        agent["readinessProbe"]["httpGet"]["port"].as_u64(),
        Some(15021)
    );
    let ports: Vec<u64> = agent["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|x| x["containerPort"].as_u64())
        .collect();
    assert_eq!(ports, [15020, 15021]);

    // Drain on SIGTERM finishes before the kubelet's SIGKILL.
    let drain_ms: u64 = f["drain-deadline-ms"].parse().unwrap();
    let grace_s = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        drain_ms + 5_000 <= grace_s * 1000,
        "drain {drain_ms} ms, grace {grace_s} s"
    );

    // Rolling update: one node at a time, never two agents on one node.
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(rolling["maxUnavailable"].as_u64(), Some(1));
    assert_eq!(rolling["maxSurge"].as_u64(), Some(0));
}

#[test]
fn ca_runs_two_non_root_replicas_behind_its_service_and_budget() {
    let dep = &documents("ca/deployment.yaml")[0];
    assert_eq!(dep["spec"]["replicas"].as_u64(), Some(2));
    let pod = &dep["spec"]["template"]["spec"];
    let added = assert_least_privilege(pod, "CA Deployment");
    assert!(added.is_empty(), "the CA needs no capability: {added:?}");
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert!(pod["securityContext"]["runAsUser"].as_u64().unwrap() > 0);
    assert_eq!(pod["serviceAccountName"], "ambit-ca");
    let ca = container(pod, "containers", "ca");
    assert_eq!(strings(&ca["args"])[0], "ca");
    assert_eq!(env_field(ca, "AMBIT_CA_NAMESPACE"), "metadata.namespace");
    assert_eq!(
        ca["readinessProbe"]["httpGet"]["port"].as_u64(),
        Some(15014)
    );
    let selector = &dep["spec"]["selector"]["matchLabels"];

    let svc = &documents("ca/service.yaml")[0];
    assert_eq!(svc["metadata"]["name"], "ambit-ca");
    assert_eq!(&svc["spec"]["selector"], selector);
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(15012));
    let pdb = &documents("ca/pdb.yaml")[0];
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));
}

/// RBAC rules as comparable sets: (apiGroup, resource, verb).
fn rule_set(rules: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules.as_sequence().expect("rules") {
        assert!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null());
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    assert_ne!(verb, "*");
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

/// Namespaced rules with the objects they are limited to: (apiGroup, resource, verb,
/// resourceNames joined by commas, "" for all).
fn named_rule_set(rules: &Value) -> BTreeSet<(String, String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules.as_sequence().expect("rules") {
        let names = strings(&rule["resourceNames"]).join(",");
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    assert_ne!(verb, "*");
                    out.insert((group.clone(), resource.clone(), verb, names.clone()));
                }
            }
        }
    }
    out
}

fn triples(items: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    items
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect()
}

#[test]
fn rbac_is_exactly_what_the_docs_say() {
    // The agent: the block under "### RBAC" in docs/KUBERNETES.md, verbatim.
    let doc = std::fs::read_to_string(workspace().join("docs/KUBERNETES.md")).unwrap();
    let section = doc
        .split("### RBAC")
        .nth(1)
        .expect("### RBAC in docs/KUBERNETES.md");
    let block = section
        .split("```yaml")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a yaml block under ### RBAC");
    let documented: Value = serde_yaml::from_str(block).unwrap();
    let docs = documents("agent/rbac.yaml");
    let role = find(&docs, "ClusterRole", "ambit-agent");
    assert_eq!(rule_set(&role["rules"]), rule_set(&documented["rules"]));
    assert_eq!(
        rule_set(&role["rules"]),
        triples(&[
            ("", "namespaces", "list"),
            ("", "namespaces", "watch"),
            ("", "pods", "list"),
            ("", "pods", "watch"),
            ("", "services", "list"),
            ("", "services", "watch"),
            ("", "pods/status", "patch"),
            ("discovery.k8s.io", "endpointslices", "list"),
            ("discovery.k8s.io", "endpointslices", "watch"),
            ("security.istio.io", "peerauthentications", "list"),
            ("security.istio.io", "peerauthentications", "watch"),
            ("security.istio.io", "authorizationpolicies", "list"),
            ("security.istio.io", "authorizationpolicies", "watch"),
        ])
    );
    let binding = find(&docs, "ClusterRoleBinding", "ambit-agent");
    assert_eq!(binding["roleRef"]["name"], "ambit-agent");
    assert_eq!(binding["subjects"][0]["name"], "ambit");
    assert_eq!(binding["subjects"][0]["namespace"], "ambit-system");

    // The CA: docs/CERTIFICATES.md "RBAC the CA needs".
    let certs = std::fs::read_to_string(workspace().join("docs/CERTIFICATES.md")).unwrap();
    assert!(certs.contains(
        "`create` on `tokenreviews` (authentication.k8s.io), `list`/`watch` on\n`pods` cluster-wide; in its namespace `get` on the Secrets `ambit-ca` and `cacerts`,\n`create` on `secrets`, `get`/`update` on the ConfigMap `ambit-root` and `create` on\n`configmaps`."
    ));
    let docs = documents("ca/rbac.yaml");
    assert_eq!(
        rule_set(&find(&docs, "ClusterRole", "ambit-ca")["rules"]),
        triples(&[
            ("authentication.k8s.io", "tokenreviews", "create"),
            ("", "pods", "list"),
            ("", "pods", "watch"),
        ])
    );
    let role = find(&docs, "Role", "ambit-ca");
    assert_eq!(role["metadata"]["namespace"], "ambit-system");
    // Limited to the objects it uses wherever RBAC can limit (not create: a create request
    // names no object in its URL).
    let named = |g: &str, r: &str, v: &str, n: &str| {
        (g.to_owned(), r.to_owned(), v.to_owned(), n.to_owned())
    };
    assert_eq!(
        named_rule_set(&role["rules"]),
        BTreeSet::from([
            named("", "secrets", "get", "ambit-ca,cacerts"),
            named("", "secrets", "create", ""),
            named("", "configmaps", "get", "ambit-root"),
            named("", "configmaps", "update", "ambit-root"),
            named("", "configmaps", "create", ""),
        ])
    );
    // ... and the names are the ones the CA is started with.
    let ca_args = flags(&strings(
        &container(
            &documents("ca/deployment.yaml")[0]["spec"]["template"]["spec"],
            "containers",
            "ca",
        )["args"],
    ));
    assert_eq!(
        [
            &ca_args["secret-name"],
            &ca_args["cacerts-secret"],
            &ca_args["root-configmap"]
        ],
        ["ambit-ca", "cacerts", "ambit-root"]
    );
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let b = find(&docs, kind, "ambit-ca");
        assert_eq!(b["subjects"][0]["name"], "ambit-ca");
        assert_eq!(b["subjects"][0]["namespace"], "ambit-system");
    }
    // No other roles anywhere in deploy/.
    let roles: usize = yaml_files()
        .iter()
        .flat_map(|f| documents_at(f))
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .count();
    assert_eq!(roles, 3);
}

/// `--flag` names a binary's `--help` lists.
fn help_flags(binary: &Path, args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(binary)
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    assert!(out.status.success(), "{} {args:?} --help", binary.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-')
                .to_owned()
        })
        .collect()
}

#[test]
fn every_flag_in_the_manifests_is_one_the_binaries_accept() {
    let ambit = ambit_e2e::testbed::agent_binary().expect("ambit binary");
    let cni = ambit_e2e::testbed::cni_binary().expect("ambit-cni binary");
    let check = |binary: &Path, sub: &[&str], args: &[String], what: &str| {
        let known = help_flags(binary, sub);
        for flag in flags(args).keys() {
            assert!(
                known.contains(flag),
                "{what}: --{flag} is not a flag of {sub:?}"
            );
        }
    };
    let ds = &documents("agent/daemonset.yaml")[0]["spec"]["template"]["spec"];
    let agent = strings(&container(ds, "containers", "agent")["args"]);
    check(&ambit, &["run"], &agent, "agent");
    let install = strings(&container(ds, "initContainers", "install-cni")["command"]);
    check(&cni, &["install"], &install, "install-cni");
    let ca = &documents("ca/deployment.yaml")[0]["spec"]["template"]["spec"];
    check(
        &ambit,
        &["ca"],
        &strings(&container(ca, "containers", "ca")["args"]),
        "ca",
    );
    let un = &documents("uninstall/daemonset.yaml")[0]["spec"]["template"]["spec"];
    let cni_un = strings(&container(un, "initContainers", "uninstall-cni")["command"]);
    assert_eq!(cni_un[1], "uninstall");
    check(&cni, &["uninstall"], &cni_un, "uninstall-cni");
    let ebpf_un = strings(&container(un, "initContainers", "uninstall-ebpf")["args"]);
    assert_eq!(ebpf_un[0], "uninstall");
    check(&ambit, &["uninstall"], &ebpf_un, "uninstall-ebpf");
}

#[test]
fn local_mode_configmap_is_accepted_by_the_agent() {
    let docs = documents("local-mode/configmap.yaml");
    let mesh = docs[0]["data"]["mesh.yaml"]
        .as_str()
        .expect("mesh.yaml in the ConfigMap");
    let (state, warnings) =
        ambit_agent::config::parse(mesh, "worker-1").expect("valid local-mode config");
    assert!(warnings.is_empty(), "{warnings:?}");
    let pods: Vec<_> = state.local_pods().map(|w| w.name.clone()).collect();
    assert_eq!(pods, ["frontend"]);
}

#[test]
fn the_agents_own_namespace_is_never_captured() {
    let docs = documents("agent/namespace.yaml");
    assert_eq!(docs[0]["metadata"]["labels"]["ambit.dev/mesh"], "disabled");
}
