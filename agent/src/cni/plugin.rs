//! The CNI command logic of `ambit-cni`, a chained plugin (CNI spec 1.0): it runs after the
//! node's network plugin, tells the agent about the pod, and passes the previous result on
//! unchanged. It never configures the network itself.
//!
//! Written as a function of its inputs (environment, stdin, agent client) so every decision
//! is testable without a container runtime; `src/bin/ambit-cni.rs` is the thin wrapper.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::{
    CniCommand, CniProtoError, CniRequest, CniResponse, CniResult, DEFAULT_NAMESPACES_FILE,
    DEFAULT_SOCKET, read_namespaces_file,
};

/// The spec versions whose configuration and result formats this plugin understands.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long the plugin waits for the agent unless `timeoutSeconds` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_TIMEOUT_SECONDS: u64 = 300;
/// The version in error results when the config could not be read.
const OWN_VERSION: &str = "1.0.0";

/// Error codes of the CNI spec ("Error" section), plus ours from 100 up.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The agent answered, and refused or failed to enrol the pod.
    pub const ENROLMENT_FAILED: u32 = 100;
}

/// The CNI_* variables the runtime sets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    /// `K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;...`
    pub args: Option<String>,
    /// Plugin search path; read for completeness, unused: this plugin delegates nothing.
    pub path: Option<String>,
}

impl CniEnv {
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            command: lookup("CNI_COMMAND"),
            container_id: lookup("CNI_CONTAINERID"),
            netns: lookup("CNI_NETNS"),
            ifname: lookup("CNI_IFNAME"),
            args: lookup("CNI_ARGS"),
            path: lookup("CNI_PATH"),
        }
    }
}

/// A CNI error result: printed on stdout as JSON, with a non-zero exit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
    pub cni_version: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
            cni_version: OWN_VERSION.to_string(),
        }
    }

    fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({
            "cniVersion": self.cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

/// How the plugin reaches the agent; a fake in tests.
pub trait AgentClient {
    fn request(
        &self,
        socket: &Path,
        req: &CniRequest,
        timeout: Duration,
    ) -> Result<CniResponse, CniProtoError>;
}

/// The real client: the agent's unix socket.
pub struct SocketAgentClient;

impl AgentClient for SocketAgentClient {
    fn request(
        &self,
        socket: &Path,
        req: &CniRequest,
        timeout: Duration,
    ) -> Result<CniResponse, CniProtoError> {
        super::request(socket, req, timeout)
    }
}

/// The network configuration on stdin, as far as this plugin reads it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginConf {
    cni_version: String,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default)]
    namespaces_file: Option<PathBuf>,
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

struct Settings {
    socket: PathBuf,
    namespaces_file: PathBuf,
    timeout: Duration,
    prev_result: Option<Value>,
}

/// Runs one CNI command; warnings go to stderr. Returns what to print on stdout.
pub fn run(env: &CniEnv, stdin: &[u8], agent: &dyn AgentClient) -> Result<String, CniError> {
    run_with_log(env, stdin, agent, &mut io::stderr())
}

/// [`run`] with the warnings written to `log`.
pub fn run_with_log(
    env: &CniEnv,
    stdin: &[u8],
    agent: &dyn AgentClient,
    log: &mut dyn Write,
) -> Result<String, CniError> {
    let command = match env.command.as_deref() {
        None | Some("") => {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_COMMAND is not set",
            ));
        }
        Some("VERSION") => return Ok(version_json()),
        Some("ADD") => CniCommand::Add,
        Some("DEL") => CniCommand::Del,
        Some("CHECK") => CniCommand::Check,
        Some(other) => {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_COMMAND {other:?} is not supported (ADD, DEL, CHECK, VERSION)"),
            ));
        }
    };
    let (version, settings) = parse_conf(stdin)?;
    execute(command, env, settings, agent, log).map_err(|mut e| {
        e.cni_version = version;
        e
    })
}

pub fn version_json() -> String {
    serde_json::json!({
        "cniVersion": OWN_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

fn parse_conf(stdin: &[u8]) -> Result<(String, Settings), CniError> {
    let raw: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            "cannot decode the network configuration on stdin",
        )
        .details(e.to_string())
    })?;
    let conf: PluginConf = serde_json::from_value(raw).map_err(|e| {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "invalid network configuration",
        )
        .details(e.to_string())
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI version {:?}; ambit-cni supports {SUPPORTED_VERSIONS:?}",
                conf.cni_version
            ),
        ));
    }
    let timeout = match conf.timeout_seconds {
        None => DEFAULT_TIMEOUT,
        Some(seconds @ 1..=MAX_TIMEOUT_SECONDS) => Duration::from_secs(seconds),
        Some(other) => {
            return Err(CniError::new(
                code::INVALID_NETWORK_CONFIG,
                format!("timeoutSeconds {other} is outside 1..={MAX_TIMEOUT_SECONDS}"),
            ));
        }
    };
    Ok((
        conf.cni_version,
        Settings {
            socket: conf
                .agent_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            namespaces_file: conf
                .namespaces_file
                .unwrap_or_else(|| PathBuf::from(DEFAULT_NAMESPACES_FILE)),
            timeout,
            prev_result: conf.prev_result,
        },
    ))
}

fn required<'a>(value: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
    value
        .as_deref()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, format!("{name} is not set")))
}

fn execute(
    command: CniCommand,
    env: &CniEnv,
    settings: Settings,
    agent: &dyn AgentClient,
    log: &mut dyn Write,
) -> Result<String, CniError> {
    let container_id = required(&env.container_id, "CNI_CONTAINERID")?;
    let ifname = required(&env.ifname, "CNI_IFNAME")?;
    let netns = match command {
        // The namespace may already be gone when a sandbox is deleted.
        CniCommand::Del => env.netns.as_deref().unwrap_or_default(),
        CniCommand::Add | CniCommand::Check => required(&env.netns, "CNI_NETNS")?,
    };
    let prev_result = match (command, &settings.prev_result) {
        (CniCommand::Del, prev) => prev.as_ref(),
        (_, Some(prev)) => Some(prev),
        (_, None) => {
            return Err(CniError::new(
                code::INVALID_NETWORK_CONFIG,
                "prevResult is missing: ambit-cni is a chained plugin and must come after the \
                 network plugin in a .conflist",
            ));
        }
    };
    // ADD prints the previous result unchanged; DEL and CHECK print nothing.
    let output = match (command, prev_result) {
        (CniCommand::Add, Some(prev)) => prev.to_string(),
        _ => String::new(),
    };
    let Some((namespace, name)) = kubernetes_pod(env.args.as_deref())? else {
        let _ = writeln!(
            log,
            "ambit-cni: CNI_ARGS names no Kubernetes pod; container {container_id} is left alone"
        );
        return Ok(output);
    };
    let ips = match prev_result {
        Some(prev) => ips_of(prev)?,
        None => Vec::new(),
    };
    let request = CniRequest {
        command,
        pod_namespace: namespace.clone(),
        pod_name: name.clone(),
        container_id: container_id.to_string(),
        netns: netns.to_string(),
        ips,
        ifname: ifname.to_string(),
    };
    let pod = format!("{namespace}/{name}");
    match agent.request(&settings.socket, &request, settings.timeout) {
        Ok(answer) => match (command, answer.result) {
            (CniCommand::Del, CniResult::Error) => {
                // A failed DEL would keep the sandbox from ever being removed; the agent
                // unenrolls the pod when it sees it deleted anyway.
                let _ = writeln!(
                    log,
                    "ambit-cni: the agent failed to remove pod {pod}: {}",
                    answer.message
                );
                Ok(output)
            }
            (CniCommand::Del, _) => Ok(output),
            (_, CniResult::Enrolled | CniResult::NotInMesh) => Ok(output),
            (_, CniResult::Error) => Err(CniError::new(
                code::ENROLMENT_FAILED,
                format!("ambit agent could not enrol pod {pod}: {}", answer.message),
            )),
            (_, CniResult::Removed) => Err(CniError::new(
                code::ENROLMENT_FAILED,
                format!("ambit agent answered \"removed\" to {command:?} for pod {pod}"),
            )),
        },
        Err(unreachable) if command == CniCommand::Del => {
            let _ = writeln!(
                log,
                "ambit-cni: {unreachable}; pod {pod} removed without telling the agent"
            );
            Ok(output)
        }
        Err(unreachable) => {
            decide_without_agent(&settings, &namespace, &pod, &unreachable, log)?;
            Ok(output)
        }
    }
}

/// The agent did not answer: only the namespaces file can tell whether the pod must be in
/// the mesh. A listed namespace fails closed; any other pod goes on unenrolled, as it
/// would without the plugin.
fn decide_without_agent(
    settings: &Settings,
    namespace: &str,
    pod: &str,
    unreachable: &CniProtoError,
    log: &mut dyn Write,
) -> Result<(), CniError> {
    let file = settings.namespaces_file.display();
    match read_namespaces_file(&settings.namespaces_file) {
        Ok(listed) if listed.contains(namespace) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "ambit agent not reachable at {}; pod {pod} is in the mesh and cannot start unenrolled",
                settings.socket.display()
            ),
        )
        .details(unreachable.to_string())),
        Ok(_) => {
            let _ = writeln!(
                log,
                "ambit-cni: {unreachable}; namespace {namespace} is not in the mesh, pod {pod} goes on"
            );
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let _ = writeln!(
                log,
                "ambit-cni: warning: {unreachable}, and {file} does not exist; pod {pod} goes on unenrolled"
            );
            Ok(())
        }
        Err(e) => {
            // Unreadable is treated like absent: failing here would stop every pod on the
            // node, in the mesh or not; the agent enrolls running pods once it is back.
            let _ = writeln!(
                log,
                "ambit-cni: warning: {unreachable}, and {file} cannot be read ({e}); pod {pod} goes on unenrolled"
            );
            Ok(())
        }
    }
}

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from CNI_ARGS; `None` when neither is there (a
/// container that is not a Kubernetes pod).
fn kubernetes_pod(args: Option<&str>) -> Result<Option<(String, String)>, CniError> {
    let mut pairs = HashMap::new();
    for pair in args
        .unwrap_or_default()
        .split(';')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            )
        })?;
        pairs.insert(key, value);
    }
    let namespace = pairs.get("K8S_POD_NAMESPACE").filter(|v| !v.is_empty());
    let name = pairs.get("K8S_POD_NAME").filter(|v| !v.is_empty());
    match (namespace, name) {
        (None, None) => Ok(None),
        (Some(namespace), Some(name)) => Ok(Some((namespace.to_string(), name.to_string()))),
        (None, Some(_)) => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_ARGS has K8S_POD_NAME but no K8S_POD_NAMESPACE",
        )),
        (Some(_), None) => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_ARGS has K8S_POD_NAMESPACE but no K8S_POD_NAME",
        )),
    }
}

/// The pod's addresses from a 0.3.0+ result: `ips[].address` in CIDR form.
fn ips_of(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let Some(entries) = prev.get("ips") else {
        return Ok(Vec::new());
    };
    let invalid = |what: String| CniError::new(code::INVALID_NETWORK_CONFIG, what);
    let entries = entries
        .as_array()
        .ok_or_else(|| invalid("prevResult.ips is not a list".into()))?;
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let address = entry
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("prevResult.ips[{i}] has no address")))?;
            address
                .split_once('/')
                .and_then(|(ip, _prefix)| ip.parse().ok())
                .ok_or_else(|| {
                    invalid(format!(
                        "prevResult.ips[{i}].address {address:?} is not an address in CIDR form"
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::testing::TempDir;
    use super::*;
    use std::cell::RefCell;

    /// Answers with a fixed outcome and records what it was sent.
    struct FakeAgent {
        answer: Box<dyn Fn() -> Result<CniResponse, CniProtoError>>,
        calls: RefCell<Vec<(PathBuf, CniRequest, Duration)>>,
    }

    impl FakeAgent {
        fn answering(response: CniResponse) -> Self {
            Self::with(move || Ok(response.clone()))
        }

        fn unreachable() -> Self {
            Self::with(|| {
                Err(CniProtoError::Connect {
                    path: PathBuf::from("/run/test/cni.sock"),
                    source: io::Error::from(io::ErrorKind::ConnectionRefused),
                })
            })
        }

        fn with(answer: impl Fn() -> Result<CniResponse, CniProtoError> + 'static) -> Self {
            Self {
                answer: Box::new(answer),
                calls: RefCell::new(Vec::new()),
            }
        }

        fn requests(&self) -> Vec<CniRequest> {
            self.calls
                .borrow()
                .iter()
                .map(|(_, r, _)| r.clone())
                .collect()
        }
    }

    impl AgentClient for FakeAgent {
        fn request(
            &self,
            socket: &Path,
            req: &CniRequest,
            timeout: Duration,
        ) -> Result<CniResponse, CniProtoError> {
            self.calls
                .borrow_mut()
                .push((socket.to_path_buf(), req.clone(), timeout));
            (self.answer)()
        }
    }

    /// Deliberately not in alphabetical key order: the output must keep it.
    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"0a:58:0a:f4:01:07","sandbox":"/var/run/netns/cni-1"}],"ips":[{"interface":0,"address":"10.244.1.7/24","gateway":"10.244.1.1"},{"interface":0,"address":"fd00:10:244:1::7/64"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

    fn env(command: &str) -> CniEnv {
        CniEnv {
            command: Some(command.into()),
            container_id: Some("c0ffee".into()),
            netns: Some("/var/run/netns/cni-1".into()),
            ifname: Some("eth0".into()),
            args: Some(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1d2c3b4a-5e6f-4789-a0b1-c2d3e4f5a6b7".into(),
            ),
            path: Some("/opt/cni/bin".into()),
        }
    }

    fn config(dir: &TempDir, extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"ambit-cni","agentSocket":"/run/test/cni.sock","namespacesFile":"{}"{extra}}}"#,
            dir.path().join("mesh-namespaces").display()
        )
    }

    fn with_prev(dir: &TempDir) -> String {
        config(dir, &format!(r#","prevResult":{PREV}"#))
    }

    fn run_logged(
        env: &CniEnv,
        stdin: &str,
        agent: &FakeAgent,
    ) -> (Result<String, CniError>, String) {
        let mut log = Vec::new();
        let result = run_with_log(env, stdin.as_bytes(), agent, &mut log);
        (result, String::from_utf8(log).expect("utf8 log"))
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let agent = FakeAgent::unreachable();
        let out = run(&env("VERSION"), br#"{"cniVersion":"1.0.0"}"#, &agent).expect("version");
        assert_eq!(
            out,
            r#"{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}"#
        );
        assert!(agent.requests().is_empty());
    }

    #[test]
    fn add_tells_the_agent_and_passes_prev_result_through_unchanged() {
        let dir = TempDir::new("plugin-add");
        let agent = FakeAgent::answering(CniResponse::enrolled());
        let stdin = config(&dir, &format!(r#","timeoutSeconds":3,"prevResult":{PREV}"#));
        let (out, log) = run_logged(&env("ADD"), &stdin, &agent);
        assert_eq!(out.expect("add"), PREV);
        assert_eq!(log, "");
        let calls = agent.calls.borrow();
        assert_eq!(calls.len(), 1);
        let (socket, request, timeout) = &calls[0];
        assert_eq!(socket, Path::new("/run/test/cni.sock"));
        assert_eq!(*timeout, Duration::from_secs(3));
        assert_eq!(
            *request,
            CniRequest {
                command: CniCommand::Add,
                pod_namespace: "shop".into(),
                pod_name: "cart-0".into(),
                container_id: "c0ffee".into(),
                netns: "/var/run/netns/cni-1".into(),
                ips: vec![
                    "10.244.1.7".parse().expect("ip"),
                    "fd00:10:244:1::7".parse().expect("ip")
                ],
                ifname: "eth0".into(),
            }
        );
    }

    #[test]
    fn add_for_a_pod_outside_the_mesh_succeeds() {
        let dir = TempDir::new("plugin-add-out");
        let agent = FakeAgent::answering(CniResponse::not_in_mesh());
        let (out, _) = run_logged(&env("ADD"), &with_prev(&dir), &agent);
        assert_eq!(out.expect("add"), PREV);
    }

    #[test]
    fn add_defaults_apply_without_plugin_keys() {
        let agent = FakeAgent::answering(CniResponse::enrolled());
        let stdin = format!(
            r#"{{"cniVersion":"0.4.0","name":"n","type":"ambit-cni","prevResult":{PREV}}}"#
        );
        run(&env("ADD"), stdin.as_bytes(), &agent).expect("add");
        let calls = agent.calls.borrow();
        assert_eq!(calls[0].0, Path::new(DEFAULT_SOCKET));
        assert_eq!(calls[0].2, DEFAULT_TIMEOUT);
    }

    #[test]
    fn add_fails_with_the_agents_error() {
        let dir = TempDir::new("plugin-add-err");
        let agent = FakeAgent::answering(CniResponse::error("no certificate for sa/cart"));
        let (out, _) = run_logged(&env("ADD"), &with_prev(&dir), &agent);
        let err = out.expect_err("refused");
        assert_eq!(err.code, code::ENROLMENT_FAILED);
        assert_eq!(
            err.msg,
            "ambit agent could not enrol pod shop/cart-0: no certificate for sa/cart"
        );
        assert_eq!(err.cni_version, "1.0.0");
    }

    #[test]
    fn add_fails_on_an_answer_meant_for_del() {
        let dir = TempDir::new("plugin-add-removed");
        let agent = FakeAgent::answering(CniResponse::removed());
        let err = run_logged(&env("ADD"), &with_prev(&dir), &agent)
            .0
            .expect_err("wrong answer");
        assert_eq!(err.code, code::ENROLMENT_FAILED);
    }

    #[test]
    fn add_with_agent_unreachable_fails_closed_for_a_mesh_namespace() {
        let dir = TempDir::new("plugin-closed");
        super::super::write_namespaces_file(&dir.path().join("mesh-namespaces"), ["shop"])
            .expect("write");
        let agent = FakeAgent::unreachable();
        let (out, _) = run_logged(&env("ADD"), &with_prev(&dir), &agent);
        let err = out.expect_err("fail closed");
        assert_eq!(err.code, code::TRY_AGAIN_LATER);
        assert_eq!(
            err.msg,
            "ambit agent not reachable at /run/test/cni.sock; pod shop/cart-0 is in the mesh and cannot start unenrolled"
        );
        let json: Value = serde_json::from_str(&err.to_json()).expect("json");
        assert_eq!(json["cniVersion"], "1.0.0");
        assert_eq!(json["code"], 11);
        assert_eq!(json["msg"], err.msg.as_str());
        assert!(
            json["details"]
                .as_str()
                .expect("details")
                .starts_with("cannot connect to the ambit agent at /run/test/cni.sock"),
            "{json}"
        );
        assert_eq!(agent.requests().len(), 1);
    }

    #[test]
    fn check_with_agent_unreachable_fails_closed_too() {
        let dir = TempDir::new("plugin-check-closed");
        super::super::write_namespaces_file(&dir.path().join("mesh-namespaces"), ["shop"])
            .expect("write");
        let err = run_logged(&env("CHECK"), &with_prev(&dir), &FakeAgent::unreachable())
            .0
            .expect_err("fail closed");
        assert_eq!(err.code, code::TRY_AGAIN_LATER);
    }

    #[test]
    fn add_with_agent_unreachable_goes_on_for_other_namespaces() {
        let dir = TempDir::new("plugin-open");
        super::super::write_namespaces_file(&dir.path().join("mesh-namespaces"), ["bank"])
            .expect("write");
        let (out, log) = run_logged(&env("ADD"), &with_prev(&dir), &FakeAgent::unreachable());
        assert_eq!(out.expect("add"), PREV);
        assert!(
            log.contains("namespace shop is not in the mesh, pod shop/cart-0 goes on"),
            "{log}"
        );
    }

    #[test]
    fn add_with_agent_unreachable_and_no_namespaces_file_warns_and_goes_on() {
        let dir = TempDir::new("plugin-nofile");
        let (out, log) = run_logged(&env("ADD"), &with_prev(&dir), &FakeAgent::unreachable());
        assert_eq!(out.expect("add"), PREV);
        assert!(log.starts_with("ambit-cni: warning: "), "{log}");
        assert!(log.contains("mesh-namespaces does not exist"), "{log}");
    }

    #[test]
    fn add_without_prev_result_is_an_invalid_config() {
        let dir = TempDir::new("plugin-noprev");
        let agent = FakeAgent::answering(CniResponse::enrolled());
        let err = run_logged(&env("ADD"), &config(&dir, ""), &agent)
            .0
            .expect_err("no prevResult");
        assert_eq!(err.code, code::INVALID_NETWORK_CONFIG);
        assert!(err.msg.starts_with("prevResult is missing"), "{}", err.msg);
        assert!(agent.requests().is_empty());
    }

    #[test]
    fn del_tells_the_agent_and_prints_nothing() {
        let dir = TempDir::new("plugin-del");
        let agent = FakeAgent::answering(CniResponse::removed());
        let mut del = env("DEL");
        del.netns = None;
        let (out, log) = run_logged(&del, &config(&dir, ""), &agent);
        assert_eq!(out.expect("del"), "");
        assert_eq!(log, "");
        let requests = agent.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].command, CniCommand::Del);
        assert_eq!(requests[0].netns, "");
        assert!(requests[0].ips.is_empty());
    }

    #[test]
    fn del_succeeds_when_the_agent_is_unreachable_or_fails() {
        let dir = TempDir::new("plugin-del-down");
        super::super::write_namespaces_file(&dir.path().join("mesh-namespaces"), ["shop"])
            .expect("write");
        let (out, log) = run_logged(&env("DEL"), &with_prev(&dir), &FakeAgent::unreachable());
        assert_eq!(out.expect("del"), "");
        assert!(
            log.contains("pod shop/cart-0 removed without telling the agent"),
            "{log}"
        );
        let agent = FakeAgent::answering(CniResponse::error("map busy"));
        let (out, log) = run_logged(&env("DEL"), &config(&dir, ""), &agent);
        assert_eq!(out.expect("del"), "");
        assert!(
            log.contains("failed to remove pod shop/cart-0: map busy"),
            "{log}"
        );
    }

    #[test]
    fn check_asks_the_agent_and_prints_nothing() {
        let dir = TempDir::new("plugin-check");
        let agent = FakeAgent::answering(CniResponse::enrolled());
        let out = run_logged(&env("CHECK"), &with_prev(&dir), &agent).0;
        assert_eq!(out.expect("check"), "");
        assert_eq!(agent.requests()[0].command, CniCommand::Check);
        let agent = FakeAgent::answering(CniResponse::error("not enrolled"));
        let err = run_logged(&env("CHECK"), &with_prev(&dir), &agent)
            .0
            .expect_err("check fails");
        assert_eq!(err.code, code::ENROLMENT_FAILED);
    }

    #[test]
    fn containers_outside_kubernetes_are_left_alone() {
        let dir = TempDir::new("plugin-nok8s");
        let agent = FakeAgent::answering(CniResponse::error("must not be asked"));
        let mut plain = env("ADD");
        plain.args = None;
        let (out, log) = run_logged(&plain, &with_prev(&dir), &agent);
        assert_eq!(out.expect("add"), PREV);
        assert!(log.contains("names no Kubernetes pod"), "{log}");
        assert!(agent.requests().is_empty());
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let dir = TempDir::new("plugin-env");
        let agent = FakeAgent::answering(CniResponse::enrolled());
        type BreakEnv = fn(&mut CniEnv);
        let cases: [(BreakEnv, &str); 6] = [
            (|e| e.command = None, "CNI_COMMAND is not set"),
            (
                |e| e.command = Some("GC".into()),
                "CNI_COMMAND \"GC\" is not supported (ADD, DEL, CHECK, VERSION)",
            ),
            (|e| e.container_id = None, "CNI_CONTAINERID is not set"),
            (|e| e.ifname = Some(String::new()), "CNI_IFNAME is not set"),
            (|e| e.netns = None, "CNI_NETNS is not set"),
            (
                |e| e.args = Some("K8S_POD_NAMESPACE=shop;oops".into()),
                "CNI_ARGS: \"oops\" is not KEY=VALUE",
            ),
        ];
        for (break_env, message) in cases {
            let mut broken = env("ADD");
            break_env(&mut broken);
            let err = run_logged(&broken, &with_prev(&dir), &agent)
                .0
                .expect_err(message);
            assert_eq!(
                (err.code, err.msg.as_str()),
                (code::INVALID_ENVIRONMENT, message)
            );
        }
        let mut half = env("ADD");
        half.args = Some("K8S_POD_NAMESPACE=shop".into());
        let err = run_logged(&half, &with_prev(&dir), &agent)
            .0
            .expect_err("half");
        assert_eq!(
            err.msg,
            "CNI_ARGS has K8S_POD_NAMESPACE but no K8S_POD_NAME"
        );
        assert!(agent.requests().is_empty());
    }

    #[test]
    fn config_errors_use_the_spec_codes() {
        let agent = FakeAgent::answering(CniResponse::enrolled());
        let err = run(&env("ADD"), b"{not json", &agent).expect_err("decode");
        assert_eq!(err.code, code::DECODING_FAILURE);
        assert_eq!(err.cni_version, "1.0.0");
        let err = run(&env("ADD"), br#"{"name":"x"}"#, &agent).expect_err("no version");
        assert_eq!(err.code, code::INVALID_NETWORK_CONFIG);
        assert!(err.details.contains("cniVersion"), "{}", err.details);
        let err = run(&env("ADD"), br#"{"cniVersion":"0.2.0"}"#, &agent).expect_err("old");
        assert_eq!(err.code, code::INCOMPATIBLE_VERSION);
        let stdin = format!(r#"{{"cniVersion":"0.3.1","timeoutSeconds":0,"prevResult":{PREV}}}"#);
        let err = run(&env("ADD"), stdin.as_bytes(), &agent).expect_err("timeout 0");
        assert_eq!(err.code, code::INVALID_NETWORK_CONFIG);
        assert_eq!(err.msg, "timeoutSeconds 0 is outside 1..=300");
        let stdin = r#"{"cniVersion":"0.3.1","prevResult":{"ips":[{"address":"10.0.0.1"}]}}"#;
        let err = run(&env("ADD"), stdin.as_bytes(), &agent).expect_err("bad ip");
        assert_eq!(err.code, code::INVALID_NETWORK_CONFIG);
        // The error result carries the config's version once it is known.
        assert_eq!(err.cni_version, "0.3.1");
        assert!(agent.requests().is_empty());
    }
}
