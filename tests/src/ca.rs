//! `ambit ca` as a process for end-to-end tests and benchmarks: started against the
//! fake API server, with node agents registered there (pods and projected tokens).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::apiserver::{self, TokenIdentity};
use crate::testbed::{Testbed, agent_binary};
use crate::unique_name;

const WAIT: Duration = Duration::from_secs(20);

/// A running `ambit ca`, killed on drop.
pub struct CaProcess {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl CaProcess {
    /// Starts the CA on any free ports of 127.0.0.1 (it binds port 0 and logs what it got):
    /// no port is picked first and left for another process to take meanwhile.
    pub fn start_anywhere(kubeconfig: &std::path::Path) -> anyhow::Result<Self> {
        Self::start(kubeconfig, 0, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }

    /// Starts the CA on 127.0.0.1:`port` (0: any free port), its metrics on `metrics`;
    /// a restart passes the addresses the first start got.
    pub fn start(
        kubeconfig: &std::path::Path,
        port: u16,
        metrics: SocketAddr,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(agent_binary()?)
            .args(["ca", "--listen-addr"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args([
                "--dns-names",
                "localhost",
                "--trust-domain",
                "cluster.local",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("AMBIT_LOG", "info")
            // The bound addresses are read back from the text format's `key=value`s.
            .env("AMBIT_LOG_FORMAT", "text")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ambit ca")?;
        let logs = crate::testbed::collect_output(&mut child, "ca");
        let mut ca = Self {
            child,
            logs,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            metrics,
        };
        let serving = ca.wait_for_log("CA serving")?;
        ca.addr = logged_addr(&serving, "addr")?;
        ca.metrics = logged_addr(&serving, "metrics")?;
        Ok(ca)
    }

    /// Where the CA serves.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where its metrics are.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn wait_for_log(&self, part: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| l.contains(part)) {
                return Ok(line);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "CA never logged {part:?}:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id (for RSS).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(ambit_agent::observability::client::get(
            self.metrics,
            "/metrics",
        )?)
    }
}

/// The address logged as `field=...` in a log line.
fn logged_addr(line: &str, field: &str) -> anyhow::Result<SocketAddr> {
    let key = format!(" {field}=");
    let start = line
        .find(&key)
        .with_context(|| format!("no {field}= in {line:?}"))?
        + key.len();
    let value = line[start..].split_whitespace().next().unwrap_or_default();
    value
        .parse()
        .with_context(|| format!("{field}={value:?} in {line:?}"))
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Registers one node agent pod per node (service account `ambit-system/ambit`) and its
/// projected token; returns the directory of token files.
pub fn register_node_agents(bed: &Testbed) -> anyhow::Result<PathBuf> {
    let api = &bed.kube.as_ref().context("kubernetes mode")?.api;
    api.create(&apiserver::namespace("ambit-system", &[]))?;
    let dir = bed.dir.join("tokens");
    std::fs::create_dir_all(&dir)?;
    for node in &bed.nodes {
        let pod = format!("ambit-{}", node.name);
        let uid = crate::kubebed::new_uid();
        api.create(
            &apiserver::pod("ambit-system", &pod)
                .uid(&uid)
                .node(&node.name)
                .ip(&node.wire_ip.to_string())
                .host_network(true)
                .service_account("ambit")
                .build(),
        )?;
        let token = unique_name("token-");
        api.register_token(
            &token,
            TokenIdentity::service_account("ambit-system", "ambit", &pod, &uid, &["ambit-ca"]),
        );
        std::fs::write(dir.join(format!("{}.token", node.name)), token)?;
    }
    Ok(dir)
}

/// The CA's root, from the Secret it created at first start.
pub fn ca_root(bed: &Testbed) -> anyhow::Result<Vec<u8>> {
    let api = &bed.kube.as_ref().context("kubernetes mode")?.api;
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(secret) =
            api.get::<k8s_openapi::api::core::v1::Secret>("ambit-system", "ambit-ca")?
            && let Some(root) = secret.data.and_then(|d| d.get("ca.crt").cloned())
        {
            return Ok(root.0);
        }
        anyhow::ensure!(Instant::now() < deadline, "the CA created no Secret");
        std::thread::sleep(Duration::from_millis(50));
    }
}
