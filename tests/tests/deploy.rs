//! The shipped Kubernetes manifests: least privilege, the probes and ports the agent really
//! serves, and a ConfigMap mesh that the agent's own parser accepts.

use std::path::Path;

use serde_yaml::Value;

fn documents(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
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

#[test]
fn daemonset_runs_with_only_the_capabilities_it_needs() {
    let docs = documents("agent/daemonset.yaml");
    let ds = &docs[0];
    assert_eq!(ds["kind"], "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        assert!(pod[host].as_bool() != Some(true), "{host} must stay off");
    }
    let agent = &pod["containers"][0];
    let security = &agent["securityContext"];
    assert_eq!(security["privileged"].as_bool(), Some(false));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let mut added = strings(&security["capabilities"]["add"]);
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "SYS_ADMIN"]);

    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    assert_eq!(
        agent["readinessProbe"]["httpGet"]["port"].as_u64(),
        Some(15021)
    );
    let ports: Vec<u64> = agent["ports"]
        .as_sequence()
        .map(|p| {
            p.iter()
                .filter_map(|x| x["containerPort"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ports, [15008, 15020, 15021]);
    let node_env = agent["env"]
        .as_sequence()
        .and_then(|e| e.iter().find(|x| x["name"] == "AMBIT_NODE"))
        .expect("AMBIT_NODE env");
    assert_eq!(
        node_env["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let args = strings(&agent["args"]);
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert!(args.iter().any(|a| a == "--config=/etc/ambit/mesh.yaml"));
}

#[test]
fn configmap_mesh_is_accepted_by_the_agent() {
    let docs = documents("agent/configmap.yaml");
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
