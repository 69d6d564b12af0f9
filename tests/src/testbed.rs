//! A mesh in network namespaces: N nodes joined by a bridge (the "wire"), pods wired to
//! their node like a point-to-point CNI, one `ambit run` process per node in local mode.
//! Everything it creates — namespaces, pins, files, agent processes — goes away on drop.

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::{Netns, PinDir, ip, unique_name};

/// Namespace that the testbed's config opts into the mesh.
pub const MESH_NS: &str = "mesh";
/// Namespace left out of the mesh.
pub const PLAIN_NS: &str = "plain";
/// The port every pod's test server listens on.
pub const APP_PORT: u16 = 8080;

#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: &'static str,
    pub namespace: &'static str,
    pub node: usize,
    pub labels: Vec<(&'static str, &'static str)>,
    /// The pod's name unless set.
    pub service_account: &'static str,
}

impl PodSpec {
    pub fn new(name: &'static str, namespace: &'static str, node: usize) -> Self {
        Self {
            name,
            namespace,
            node,
            labels: vec![("app", name)],
            service_account: name,
        }
    }

    /// Runs as `service_account` (so with its identity) instead of its own name.
    pub fn with_service_account(mut self, service_account: &'static str) -> Self {
        self.service_account = service_account;
        self
    }
}

pub struct Pod {
    pub spec: PodSpec,
    pub ip: Ipv4Addr,
    pub ns: Netns,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    pub fn identity(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.spec.namespace, self.spec.service_account
        )
    }

    /// Opens a TCP connection from inside this pod.
    pub fn connect(&self, to: SocketAddr) -> anyhow::Result<TcpStream> {
        let stream = self.ns.open()?.run(move || {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(s)
        })?;
        Ok(stream)
    }

    /// Connects, sends `payload`, half-closes, and returns everything the server sent.
    pub fn request(&self, to: SocketAddr, payload: &[u8]) -> anyhow::Result<String> {
        let mut s = self.connect(to)?;
        s.write_all(payload)?;
        s.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    }

    /// Starts the pod's test server on APP_PORT: it first writes
    /// `<pod> peer=<peer> local=<local>\n`, then echoes what it receives.
    fn start_app(&self) -> anyhow::Result<()> {
        let ip = self.ip;
        let name = self.spec.name;
        let listener = self
            .ns
            .open()?
            .run(move || TcpListener::bind((ip, APP_PORT)))?;
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                // Linux accept() also reports errors of one pending connection (and
                // EMFILE is passing): log and keep serving, never stop listening.
                let mut stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("testbed app {name}: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                std::thread::spawn(move || {
                    let peer = stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    let local = stream
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    let _ = writeln!(stream, "{name} peer={peer} local={local}");
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        Ok(())
    }
}

pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub wire_ip: Ipv4Addr,
    pub pins: PinDir,
}

/// A running `ambit run`, killed on drop; its log lines are kept for assertions.
pub struct Agent {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// Where its admin, metrics and readiness servers listen (bound on port 0, read back
    /// from its log: several agents share the host's network namespace).
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
}

impl Agent {
    /// GET on the admin API; the body of a 2xx answer.
    pub fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        Ok(ambit_agent::observability::client::get(
            self.admin_addr,
            path,
        )?)
    }

    /// POST on the admin API; the body of a 2xx answer.
    pub fn admin_post(&self, path: &str) -> anyhow::Result<String> {
        Ok(ambit_agent::observability::client::request(
            self.admin_addr,
            "POST",
            path,
        )?)
    }

    /// A scrape of the metrics port.
    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(ambit_agent::observability::client::get(
            self.metrics_addr,
            "/metrics",
        )?)
    }

    /// Waits for the process to exit on its own; `None` if it is still running at `timeout`.
    pub fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until a log line contains every one of `parts`.
    pub fn wait_for_log(&self, parts: &[&str], timeout: Duration) -> anyhow::Result<String> {
        self.wait_for_logs(parts, 1, timeout)
    }

    /// Waits until `count` log lines contain every one of `parts`; returns the last.
    pub fn wait_for_logs(
        &self,
        parts: &[&str],
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let matching: Vec<String> = self
                .logs()
                .into_iter()
                .filter(|l| parts.iter().all(|p| l.contains(p)))
                .collect();
            if matching.len() >= count
                && let Some(line) = matching.last()
            {
                return Ok(line.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "no log line with {parts:?} within {timeout:?}; last lines:\n{}",
                    self.logs()
                        .iter()
                        .rev()
                        .take(15)
                        .rev()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's process id (for /proc/<pid>/status and /proc/<pid>/stat).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where agents find a CA service: its address, the roots its serving certificate chains
/// to, and a directory holding one token file per node (`<node>.token`).
#[derive(Clone, Debug)]
pub struct RemoteCa {
    pub address: String,
    pub trust_file: PathBuf,
    pub token_dir: PathBuf,
}

pub struct Service {
    pub name: &'static str,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub selector_app: &'static str,
}

pub struct Testbed {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
    pub agents: Vec<Option<Agent>>,
    /// Extra YAML documents (Istio policies) appended to the config.
    pub policies: String,
    /// Whether MESH_NS carries the opt-in label.
    pub mesh_enabled: bool,
    /// Extra `ambit run` arguments for agents started from now on (e.g. `--no-pool`).
    pub agent_args: Vec<String>,
    /// The agent binary for agents started from now on; `None`: [`agent_binary`].
    pub agent_binary: Option<PathBuf>,
    /// Agents started from now on see /proc/sys read-only, as in a Kubernetes container
    /// that is not privileged (their own mount namespace, /proc/sys bind-remounted ro).
    pub agent_read_only_proc_sys: bool,
    /// Kubernetes mode: the fake API server and the pods' sandboxes; agents started from
    /// now on run with `--kubernetes` against it.
    pub kube: Option<crate::kubebed::KubeBed>,
    /// Agents started from now on ask this CA service (`ambit ca`) for certificates
    /// instead of signing with the testbed's CA key.
    pub remote_ca: Option<RemoteCa>,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    // Declared last so it is dropped after the nodes and pods it connects.
    _fabric: Netns,
}

impl Testbed {
    /// Builds `nodes` nodes and the given pods (not yet with agents).
    pub fn build(nodes: usize, pods: &[PodSpec], services: Vec<Service>) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("ambit-testbed-"));
        std::fs::create_dir_all(&dir)?;
        let fabric = Netns::create("afab")?;
        let bridge = "br0";
        fabric.ip(&["link", "add", bridge, "type", "bridge"])?;
        fabric.ip(&["link", "set", bridge, "up"])?;
        let mut node_list = Vec::new();
        for i in 0..nodes {
            let ns = Netns::create("anode")?;
            let wire_ip = Ipv4Addr::new(172, 30, 0, i as u8 + 1);
            let port = format!("n{i}");
            ip(&[
                "link",
                "add",
                &port,
                "netns",
                fabric.name(),
                "type",
                "veth",
                "peer",
                "name",
                "wire",
                "netns",
                ns.name(),
            ])?;
            fabric.ip(&["link", "set", &port, "master", bridge, "up"])?;
            ns.ip(&["addr", "add", &format!("{wire_ip}/24"), "dev", "wire"])?;
            ns.ip(&["link", "set", "wire", "up"])?;
            sysctl(&ns, "net/ipv4/ip_forward", "1")?;
            node_list.push(Node {
                name: format!("node{}", i + 1),
                ns,
                wire_ip,
                pins: PinDir::unique(),
            });
        }
        // Each node routes the other nodes' pod ranges over the wire.
        for (i, node) in node_list.iter().enumerate() {
            for (k, other) in node_list.iter().enumerate() {
                if i != k {
                    node.ns.ip(&[
                        "route",
                        "add",
                        &format!("10.11.{}.0/24", k + 1),
                        "via",
                        &other.wire_ip.to_string(),
                    ])?;
                }
            }
        }
        let mut pod_list = Vec::new();
        for (j, spec) in pods.iter().enumerate() {
            let node = node_list
                .get(spec.node)
                .context("pod on a node that does not exist")?;
            let ns = Netns::create("apod")?;
            let ip_addr = Ipv4Addr::new(10, 11, spec.node as u8 + 1, j as u8 + 2);
            let gateway = Ipv4Addr::new(10, 11, spec.node as u8 + 1, 1);
            let host_if = format!("p{j}");
            ip(&[
                "link",
                "add",
                &host_if,
                "netns",
                node.ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])?;
            node.ns
                .ip(&["addr", "add", &format!("{gateway}/32"), "dev", &host_if])?;
            node.ns.ip(&["link", "set", &host_if, "up"])?;
            node.ns
                .ip(&["route", "add", &format!("{ip_addr}/32"), "dev", &host_if])?;
            ns.ip(&["addr", "add", &format!("{ip_addr}/32"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["route", "add", &format!("{gateway}/32"), "dev", "eth0"])?;
            ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
            let pod = Pod {
                spec: spec.clone(),
                ip: ip_addr,
                ns,
            };
            pod.start_app()?;
            pod_list.push(pod);
        }
        // One CA for the whole mesh, as a cluster would have.
        let ca_dir = dir.join("ca");
        ambit_agent::identity::LocalCa::load_or_create(&ca_dir)?;
        let agents = node_list.iter().map(|_| None).collect();
        let bed = Self {
            config: dir.join("mesh.yaml"),
            ca_cert: ca_dir.join("ca-cert.pem"),
            ca_key: ca_dir.join("ca-key.pem"),
            dir,
            pods: pod_list,
            nodes: node_list,
            services,
            agents,
            policies: String::new(),
            mesh_enabled: true,
            agent_args: Vec::new(),
            agent_binary: None,
            agent_read_only_proc_sys: false,
            kube: None,
            remote_ca: None,
            _fabric: fabric,
        };
        bed.write_config()?;
        Ok(bed)
    }

    /// Puts the testbed's mesh into a fake Kubernetes API server (with kubelet-like pod
    /// sandboxes); agents started afterwards learn it from there instead of the file.
    pub fn enable_kubernetes(&mut self) -> anyhow::Result<()> {
        self.enable_kubernetes_except(&[])
    }

    /// The same, leaving the pods named in `except` out of the API server (pods about to
    /// be created).
    pub fn enable_kubernetes_except(&mut self, except: &[&str]) -> anyhow::Result<()> {
        self.kube = Some(crate::kubebed::KubeBed::new(self, except)?);
        Ok(())
    }

    /// The mesh CA's certificate (PEM).
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the testbed"))
    }

    /// Writes the local-mode file from the testbed's description (atomically: the agents
    /// watch it).
    pub fn write_config(&self) -> anyhow::Result<()> {
        let mut y = String::new();
        writeln!(
            y,
            "apiVersion: ambit.dev/v1alpha1\nkind: AmbitLocalConfig\nnamespaces:"
        )?;
        // Every namespace but PLAIN_NS opts in (while `mesh_enabled`).
        let label = if self.mesh_enabled { "enabled" } else { "off" };
        let mut namespaces: Vec<&str> = self.pods.iter().map(|p| p.spec.namespace).collect();
        namespaces.extend([MESH_NS, PLAIN_NS]);
        namespaces.sort_unstable();
        namespaces.dedup();
        for ns in namespaces {
            if ns == PLAIN_NS {
                writeln!(y, "  - name: {ns}")?;
            } else {
                writeln!(y, "  - name: {ns}\n    labels: {{ambit.dev/mesh: {label}}}")?;
            }
        }
        writeln!(y, "workloads:")?;
        for pod in &self.pods {
            let labels: Vec<String> = pod
                .spec
                .labels
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            writeln!(
                y,
                "  - name: {}\n    namespace: {}\n    serviceAccount: {}\n    labels: {{{}}}\n    ips: [{}]\n    node: {}\n    netns: {}",
                pod.spec.name,
                pod.spec.namespace,
                pod.spec.service_account,
                labels.join(", "),
                pod.ip,
                self.nodes[pod.spec.node].name,
                pod.ns.path().display()
            )?;
        }
        writeln!(y, "services:")?;
        if self.services.is_empty() {
            y.truncate(y.len() - "services:\n".len());
        }
        for s in &self.services {
            writeln!(
                y,
                "  - name: {}\n    namespace: {MESH_NS}\n    vip: {}\n    ports: [{{port: {}, targetPort: {APP_PORT}}}]\n    selector: {{app: {}}}",
                s.name, s.vip, s.port, s.selector_app
            )?;
        }
        y.push_str(&self.policies);
        let tmp = self.dir.join("mesh.yaml.tmp");
        std::fs::write(&tmp, y)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// Starts (or restarts) the agent of node `i` and waits until it is ready.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let state_dir = self.dir.join(&node.name);
        let source: Vec<String> = match &self.kube {
            Some(kube) => kube.agent_args(&self.dir, &node.name),
            None => vec!["--config".into(), self.config.display().to_string()],
        };
        let binary = match &self.agent_binary {
            Some(binary) => binary.clone(),
            None => agent_binary()?,
        };
        let mut command = if self.agent_read_only_proc_sys {
            // `unshare` and `sh` exec into the agent: the child's pid is the agent's.
            // Slave propagation: netns files bind-mounted later still show up inside.
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "slave", "sh", "-c"])
                .arg(concat!(
                    "mount --bind /proc/sys /proc/sys && ",
                    "mount -o remount,bind,ro /proc/sys && exec \"$0\" \"$@\""
                ))
                .arg(&binary);
            c
        } else {
            Command::new(&binary)
        };
        let mut child = command
            .args(["run", "--node", &node.name])
            .args(&source)
            .arg("--pin-dir")
            .arg(node.pins.path())
            .arg("--state-dir")
            .arg(&state_dir)
            .args(match &self.remote_ca {
                Some(ca) => vec![
                    "--ca-address".into(),
                    ca.address.clone(),
                    "--ca-trust-file".into(),
                    ca.trust_file.display().to_string(),
                    "--ca-token-file".into(),
                    ca.token_dir
                        .join(format!("{}.token", node.name))
                        .display()
                        .to_string(),
                ],
                None => vec![
                    "--ca-cert".into(),
                    self.ca_cert.display().to_string(),
                    "--ca-key".into(),
                    self.ca_key.display().to_string(),
                ],
            })
            .args(["--reload-interval-ms", "100"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--readiness-addr", "127.0.0.1:0"])
            .args(&self.agent_args)
            .env("AMBIT_LOG", "info")
            // Settings come from the flags above and `agent_args`, not the caller's shell.
            .env_remove("AMBIT_WORKER_THREADS")
            .env_remove("AMBIT_CPU_LIMIT_MILLIS")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?;
        let logs = collect_output(&mut child, &node.name);
        let unbound = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let mut agent = Agent {
            child,
            logs,
            admin_addr: unbound,
            metrics_addr: unbound,
            readiness_addr: unbound,
        };
        let line = agent.wait_for_log(&["endpoints listening"], Duration::from_secs(20))?;
        let addr = |key: &str| -> anyhow::Result<SocketAddr> {
            // Text (`key=addr`) and JSON (`"key":"addr"`) log lines both work.
            let rest = line
                .split_once(key)
                .map(|(_, r)| r.trim_start_matches(['=', '"', ':']))
                .with_context(|| format!("no {key} in {line}"))?;
            let value: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            value.parse().with_context(|| format!("{key} in {line}"))
        };
        agent.admin_addr = addr("admin_addr")?;
        agent.metrics_addr = addr("metrics_addr")?;
        agent.readiness_addr = addr("readiness_addr")?;
        let ready = if self.agent_args.iter().any(|a| a == "json") {
            "\"message\":\"ready\""
        } else {
            ": ready enrolled="
        };
        agent.wait_for_log(&[ready], Duration::from_secs(20))?;
        self.agents[i] = Some(agent);
        Ok(())
    }

    pub fn start_agents(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.start_agent(i)?;
        }
        Ok(())
    }

    pub fn agent(&self, i: usize) -> &Agent {
        self.agents[i].as_ref().expect("agent running")
    }

    /// Kills node `i`'s agent with SIGKILL.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(agent) = self.agents[i].take() {
            agent.kill();
        }
    }

    /// Captures on node `i`'s wire while `f` runs; returns `f`'s result and what the
    /// capture saw. A check that something is absent from the wire must also check that
    /// the capture saw the traffic it should have ([`WireCapture::hbone_bytes`]).
    pub fn capture_wire<T>(
        &self,
        i: usize,
        f: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, WireCapture)> {
        let file = self.dir.join(unique_name("wire-") + ".pcap");
        let netns_arg = format!("--net={}", self.nodes[i].ns.path().display());
        let mut dump = Command::new("nsenter")
            .arg(&netns_arg)
            .args([
                "tcpdump",
                "--immediate-mode",
                "-Z",
                "root",
                "-i",
                "wire",
                "-U",
                "-n",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump (cargo xtask setup installs it)")?;
        // tcpdump announces "listening on" once the capture runs.
        let mut stderr = BufReader::new(dump.stderr.take().context("tcpdump stderr")?);
        let mut line = String::new();
        stderr.read_line(&mut line)?;
        let result = f();
        // With -U every packet is written as it is captured: stop once the file has not
        // grown for a while (the last ACKs and FINs trail the reply), at most after 3 s.
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut size = file_size(&file);
        let mut unchanged_since = Instant::now();
        while Instant::now() < deadline && unchanged_since.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(50));
            let now = file_size(&file);
            if now != size {
                size = now;
                unchanged_since = Instant::now();
            }
        }
        // SIGINT (not SIGKILL) lets tcpdump flush the file.
        let _ = Command::new("kill")
            .args(["-INT", &dump.id().to_string()])
            .status();
        let _ = dump.wait();
        let raw = std::fs::read(&file).unwrap_or_default();
        let summary = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&file)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let (hbone_packets, hbone_bytes) = payload_on_port(&summary, ambit_common::HBONE_PORT);
        Ok((
            result?,
            WireCapture {
                raw,
                summary,
                hbone_packets,
                hbone_bytes,
            },
        ))
    }
}

/// What a capture on the wire saw.
#[derive(Debug)]
pub struct WireCapture {
    /// The pcap file's bytes (payloads included).
    pub raw: Vec<u8>,
    /// tcpdump's one-line-per-packet summary.
    pub summary: String,
    /// TCP segments to or from port 15008 that carried payload, and the payload's bytes:
    /// proof that the capture saw the tunnel's traffic.
    pub hbone_packets: usize,
    pub hbone_bytes: u64,
}

impl WireCapture {
    /// Whether `needle` appears anywhere in the captured bytes.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.raw.windows(needle.len()).any(|w| w == needle)
    }
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Segments with payload to or from `port` and their payload bytes, read from tcpdump's
/// summary lines (`IP a.b.c.d.p > e.f.g.h.q: Flags [P.], ..., length 517`).
fn payload_on_port(summary: &str, port: u16) -> (usize, u64) {
    let src = format!(".{port} >");
    let dst = format!(".{port}:");
    summary
        .lines()
        .filter(|l| l.contains(&src) || l.contains(&dst))
        .filter_map(|l| {
            let rest = l.rsplit_once(", length ")?.1;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .filter(|&len| len > 0)
        .fold((0, 0), |(packets, bytes), len| (packets + 1, bytes + len))
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.take();
        }
        self.kube.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Collects a child's stdout and stderr lines (echoed with `[label]` when
/// AMBIT_TESTBED_ECHO is set), for log assertions.
pub fn collect_output(child: &mut Child, label: &str) -> Arc<Mutex<Vec<String>>> {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let pipes = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ];
    for pipe in pipes.into_iter().flatten() {
        let logs = logs.clone();
        let label = label.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if std::env::var_os("AMBIT_TESTBED_ECHO").is_some() {
                    eprintln!("[{label}] {line}");
                }
                if let Ok(mut l) = logs.lock() {
                    l.push(line);
                }
            }
        });
    }
    logs
}

/// Writes `/proc/sys/<key>` inside `ns` (e.g. `net/ipv4/tcp_tw_reuse`).
pub fn sysctl(ns: &Netns, key: &str, value: &str) -> anyhow::Result<()> {
    let path = Path::new("/proc/sys").join(key);
    let value = value.to_string();
    ns.open()?.run(move || std::fs::write(&path, value))?;
    Ok(())
}

/// The `ambit` binary: $AMBIT_BIN, or target/debug/ambit of this workspace
/// (`cargo xtask test` builds it before the end-to-end suite).
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("AMBIT_BIN", "ambit")
}

/// The `ambit-cni` plugin binary: $AMBIT_CNI_BIN, or target/debug/ambit-cni.
pub fn cni_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("AMBIT_CNI_BIN", "ambit-cni")
}

fn workspace_binary(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os(env) {
        return Ok(PathBuf::from(bin));
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name);
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build -p ambit-agent` (cargo xtask test does)",
            bin.display()
        );
    }
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::payload_on_port;

    #[test]
    fn payload_is_counted_per_port_from_tcpdump_lines() {
        let summary = "\
10:00:00.000001 IP 10.11.1.2.40000 > 10.11.2.3.15008: Flags [S], seq 1, win 64240, length 0
10:00:00.000002 IP 10.11.2.3.15008 > 10.11.1.2.40000: Flags [P.], seq 1:518, ack 1, win 502, length 517
10:00:00.000003 IP 10.11.1.2.40000 > 10.11.2.3.15008: Flags [P.], seq 1:81, ack 518, win 501, length 80
10:00:00.000004 IP 10.11.1.5.40001 > 10.11.2.6.8080: Flags [P.], seq 1:10, ack 1, win 501, length 9: HTTP
10:00:00.000005 IP 10.11.1.5.15008 > 10.11.2.6.8080: Flags [P.], seq 1:4, ack 1, win 501, length 3
";
        assert_eq!(payload_on_port(summary, 15008), (3, 600));
        assert_eq!(payload_on_port(summary, 8080), (2, 12));
        assert_eq!(payload_on_port("", 15008), (0, 0));
    }
}
