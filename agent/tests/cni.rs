//! The real `ambit-cni` binary, run the way a container runtime runs a chained plugin
//! (CNI_* environment, network config with prevResult on stdin), against the agent's side
//! of the protocol served by `cni::serve`.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_agent::cni::{self, CniCommand, CniHandler, CniRequest, CniResponse};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/cni-77"}],"ips":[{"interface":0,"address":"10.244.3.21/24","gateway":"10.244.3.1"}],"dns":{}}"#;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ambit-cni-it-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent's stand-in: records requests; "shop" is in the mesh, "broken" cannot be
/// enrolled, anything else is outside the mesh.
#[derive(Default)]
struct TestAgent(Mutex<Vec<CniRequest>>);

impl CniHandler for TestAgent {
    fn handle(&self, req: CniRequest) -> BoxFuture<'_, CniResponse> {
        Box::pin(async move {
            let answer = match (req.command, req.pod_namespace.as_str()) {
                (CniCommand::Del, _) => CniResponse::removed(),
                (_, "shop") => CniResponse::enrolled(),
                (_, "broken") => CniResponse::error("no certificate for broken/sa/default"),
                _ => CniResponse::not_in_mesh(),
            };
            self.0.lock().expect("lock").push(req);
            answer
        })
    }
}

fn config(socket: &Path, namespaces_file: &Path) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"kindnet","type":"ambit-cni","agentSocket":"{}","namespacesFile":"{}","timeoutSeconds":5,"prevResult":{PREV}}}"#,
        socket.display(),
        namespaces_file.display()
    )
}

async fn run_plugin(command: &str, namespace: &str, stdin: &str) -> Output {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ambit-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "5f1e0c")
        .env("CNI_NETNS", "/var/run/netns/cni-77")
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=5f1e0c"),
        )
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ambit-cni");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.as_bytes())
        .await
        .expect("write stdin");
    drop(input);
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("plugin finished")
        .expect("plugin output")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf8 stdout")
}

fn error_json(output: &Output) -> Value {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("CNI error JSON on stdout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_runs_the_plugin_against_a_live_agent() {
    let dir = TempDir::new("live");
    let socket = dir.0.join("run/ambit/cni.sock");
    let namespaces = dir.0.join("run/ambit/mesh-namespaces");
    cni::write_namespaces_file(&namespaces, ["shop", "broken"]).expect("namespaces file");
    let agent = Arc::new(TestAgent::default());
    let server = tokio::spawn(cni::serve(cni::bind(&socket).expect("bind"), agent.clone()));
    let conf = config(&socket, &namespaces);

    let add = run_plugin("ADD", "shop", &conf).await;
    assert!(add.status.success(), "{add:?}");
    assert_eq!(stdout(&add), PREV);
    let expected = CniRequest {
        command: CniCommand::Add,
        pod_namespace: "shop".into(),
        pod_name: "web-1".into(),
        container_id: "5f1e0c".into(),
        netns: "/var/run/netns/cni-77".into(),
        ips: vec!["10.244.3.21".parse().expect("ip")],
        ifname: "eth0".into(),
    };
    assert_eq!(*agent.0.lock().expect("lock"), vec![expected.clone()]);

    let outside = run_plugin("ADD", "tools", &conf).await;
    assert!(outside.status.success(), "{outside:?}");
    assert_eq!(stdout(&outside), PREV);

    let refused = run_plugin("ADD", "broken", &conf).await;
    let json = error_json(&refused);
    assert_eq!(json["code"], 100);
    assert_eq!(
        json["msg"],
        "ambit agent could not enrol pod broken/web-1: no certificate for broken/sa/default"
    );
    assert_eq!(json["cniVersion"], "1.0.0");

    let check = run_plugin("CHECK", "shop", &conf).await;
    assert!(check.status.success(), "{check:?}");
    assert_eq!(stdout(&check), "");

    let del = run_plugin("DEL", "shop", &conf).await;
    assert!(del.status.success(), "{del:?}");
    assert_eq!(stdout(&del), "");

    let seen: Vec<(CniCommand, String)> = agent
        .0
        .lock()
        .expect("lock")
        .iter()
        .map(|r| (r.command, r.pod_namespace.clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (CniCommand::Add, "shop".to_string()),
            (CniCommand::Add, "tools".to_string()),
            (CniCommand::Add, "broken".to_string()),
            (CniCommand::Check, "shop".to_string()),
            (CniCommand::Del, "shop".to_string()),
        ]
    );

    let version = run_plugin("VERSION", "shop", r#"{"cniVersion":"1.0.0"}"#).await;
    assert!(version.status.success(), "{version:?}");
    assert_eq!(
        stdout(&version),
        r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}"#
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_runs_the_plugin_while_the_agent_is_down() {
    let dir = TempDir::new("down");
    let socket = dir.0.join("run/ambit/cni.sock");
    let namespaces = dir.0.join("run/ambit/mesh-namespaces");
    // The agent ran once (its socket file and namespaces list remain), then stopped.
    drop(cni::bind(&socket).expect("bind"));
    cni::write_namespaces_file(&namespaces, ["shop"]).expect("namespaces file");
    let conf = config(&socket, &namespaces);

    let closed = run_plugin("ADD", "shop", &conf).await;
    let json = error_json(&closed);
    assert_eq!(json["code"], 11);
    assert_eq!(
        json["msg"],
        format!(
            "ambit agent not reachable at {}; pod shop/web-1 is in the mesh and cannot start unenrolled",
            socket.display()
        )
    );

    let open = run_plugin("ADD", "tools", &conf).await;
    assert!(open.status.success(), "{open:?}");
    assert_eq!(stdout(&open), PREV);

    let del = run_plugin("DEL", "shop", &conf).await;
    assert!(del.status.success(), "{del:?}");
    assert_eq!(stdout(&del), "");
    let stderr = String::from_utf8_lossy(&del.stderr);
    assert!(
        stderr.contains("pod shop/web-1 removed without telling the agent"),
        "{stderr}"
    );
}
