//! Keeping `ambit-cni` in the node's CNI chain while the agent runs.
//!
//! The init container chains the plugin once; a network plugin that rewrites its conflist
//! later (kindnet does on every start, others on upgrade) drops the entry, and pods created
//! after that start without being enrolled. Like Istio's CNI agent, the agent re-checks the
//! primary config every few seconds and chains the plugin again when it is gone, logging and
//! counting each time (`ambit_cni_rechains_total`).
//!
//! Uninstall must win: the watch stops when the agent drains (before it exits), never
//! chains a plugin whose binary is not in the bin directory (`ambit-cni uninstall` removes
//! the binary first), and takes its entry back out when the binary disappeared while it
//! was writing.

use std::path::PathBuf;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use super::install::{self, ChainOptions, PLUGIN_TYPE};

/// How often the agent looks at the chain by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// What the watch needs: where the configs and the binary are (as the agent sees them) and
/// what the entry says (paths on the node).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainWatch {
    pub chain: ChainOptions,
    #[serde(serialize_with = "crate::observability::readable::path")]
    pub bin_dir: PathBuf,
    #[serde(serialize_with = "crate::observability::readable::duration")]
    pub interval: Duration,
}

/// What one look at the chain found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainCheck {
    /// The primary config chains the plugin as configured.
    Chained,
    /// It did not (or not as configured); it does again now.
    Rechained { config: PathBuf },
    /// The plugin's binary is not installed: nothing chained (uninstalled, or not yet).
    BinaryMissing,
    /// The agent is stopping: nothing written.
    Stopped,
    /// The chain could not be checked or repaired; the message names the file.
    Failed(String),
}

/// `ambit_cni_rechains_total`.
#[derive(Clone, Debug, Default)]
pub struct ChainMetrics {
    pub rechains: Counter,
}

impl ChainMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "ambit_cni_rechains",
            "Times the agent chained ambit-cni again after the node's CNI config lost it",
            metrics.rechains.clone(),
        );
        metrics
    }
}

impl ChainWatch {
    /// Looks at the chain once and repairs it. Blocking file I/O: run it off the async
    /// runtime's thread. `may_write` is asked right before writing (false: the agent is stopping).
    pub fn check(&self, may_write: &dyn Fn() -> bool) -> ChainCheck {
        let binary = self.bin_dir.join(PLUGIN_TYPE);
        if !binary.is_file() {
            return ChainCheck::BinaryMissing;
        }
        let plan = match install::plan_chain(&self.chain) {
            Ok(plan) => plan,
            Err(e) => return ChainCheck::Failed(e.to_string()),
        };
        if !plan.changes {
            return ChainCheck::Chained;
        }
        if !may_write() {
            return ChainCheck::Stopped;
        }
        if let Err(e) = install::write_chain(&plan) {
            return ChainCheck::Failed(e.to_string());
        }
        // `ambit-cni uninstall` removed the binary while we wrote: take the entry back out
        // rather than leave a chain naming a plugin the runtime cannot run.
        if !binary.is_file() {
            return match install::unchain(&self.chain.conf_dir) {
                Ok(_) => ChainCheck::BinaryMissing,
                Err(e) => ChainCheck::Failed(format!(
                    "taking ambit-cni back out after its binary vanished: {e}"
                )),
            };
        }
        ChainCheck::Rechained {
            config: plan.config,
        }
    }

    /// Checks every `interval` until `stop` turns true (the agent drains). Each problem is
    /// logged once, until it changes.
    pub async fn run(self, metrics: ChainMetrics, mut stop: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = ChainCheck::Chained;
        loop {
            tokio::select! {
                _ = stop.wait_for(|stopping| *stopping) => return,
                _ = ticks.tick() => {}
            }
            let watch = self.clone();
            let stopping = stop.clone();
            let checked =
                tokio::task::spawn_blocking(move || watch.check(&|| !*stopping.borrow())).await;
            let outcome = match checked {
                Ok(outcome) => outcome,
                Err(e) => ChainCheck::Failed(format!("the chain check panicked: {e}")),
            };
            match &outcome {
                ChainCheck::Rechained { config } => {
                    metrics.rechains.inc();
                    warn!(
                        config = %config.display(),
                        "the node's CNI config no longer chained ambit-cni (rewritten by the network plugin?); chained it again"
                    );
                }
                ChainCheck::Stopped => return,
                _ if outcome == last => {}
                ChainCheck::Chained => info!("ambit-cni is chained in the node's CNI config"),
                ChainCheck::BinaryMissing => warn!(
                    bin_dir = %self.bin_dir.display(),
                    "ambit-cni is not installed in the CNI bin directory (uninstalled?); not chaining it"
                ),
                ChainCheck::Failed(error) => {
                    warn!(%error, "cannot check the CNI chain; will retry")
                }
            }
            last = outcome;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;
    use std::time::Instant;

    use serde_json::Value;

    use super::super::testing::TempDir;
    use super::*;

    const KINDNET: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "kindnet",
  "plugins": [
    {"type": "ptp", "ipMasq": false, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}, "mtu": 1500},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

    struct Node {
        _dir: TempDir,
        conflist: PathBuf,
        binary: PathBuf,
        watch: ChainWatch,
    }

    fn node(interval: Duration) -> Node {
        let dir = TempDir::new("cni-watch");
        let bin = dir.path().join("opt/cni/bin");
        let conf = dir.path().join("etc/cni/net.d");
        fs::create_dir_all(&bin).expect("bin");
        fs::create_dir_all(&conf).expect("conf");
        let conflist = conf.join("10-kindnet.conflist");
        fs::write(&conflist, KINDNET).expect("conflist");
        let binary = bin.join(PLUGIN_TYPE);
        fs::write(&binary, b"\x7fELF").expect("binary");
        let watch = ChainWatch {
            chain: ChainOptions {
                conf_dir: conf,
                agent_socket: "/var/run/ambit/cni.sock".into(),
                namespaces_file: "/var/run/ambit/mesh-namespaces".into(),
            },
            bin_dir: bin,
            interval,
        };
        Node {
            _dir: dir,
            conflist,
            binary,
            watch,
        }
    }

    fn types(path: &Path) -> Vec<String> {
        let list: Value = serde_json::from_slice(&fs::read(path).expect("read")).expect("json");
        list["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .map(|p| p["type"].as_str().expect("type").to_owned())
            .collect()
    }

    #[test]
    fn a_lost_entry_is_chained_again_and_a_present_one_left_alone() {
        let node = node(DEFAULT_INTERVAL);
        let yes = || true;
        assert_eq!(
            node.watch.check(&yes),
            ChainCheck::Rechained {
                config: node.conflist.clone()
            }
        );
        assert_eq!(types(&node.conflist), ["ptp", "portmap", "ambit-cni"]);
        let written = fs::read(&node.conflist).expect("read");
        assert_eq!(node.watch.check(&yes), ChainCheck::Chained);
        assert_eq!(
            fs::read(&node.conflist).expect("read"),
            written,
            "rewritten"
        );
    }

    #[test]
    fn nothing_is_chained_without_the_binary_or_while_stopping() {
        let node = node(DEFAULT_INTERVAL);
        assert_eq!(node.watch.check(&|| false), ChainCheck::Stopped);
        assert_eq!(fs::read_to_string(&node.conflist).expect("read"), KINDNET);
        fs::remove_file(&node.binary).expect("rm");
        assert_eq!(node.watch.check(&|| true), ChainCheck::BinaryMissing);
        assert_eq!(fs::read_to_string(&node.conflist).expect("read"), KINDNET);
    }

    /// `ambit-cni uninstall` runs between the check and the write: binary first, then the
    /// entries (none yet). The watch takes the entry it wrote back out.
    #[test]
    fn an_uninstall_racing_the_write_wins() {
        let node = node(DEFAULT_INTERVAL);
        let uninstall_now = || {
            install::uninstall(&node.watch.bin_dir, &node.watch.chain.conf_dir).expect("uninstall");
            true
        };
        assert_eq!(node.watch.check(&uninstall_now), ChainCheck::BinaryMissing);
        assert_eq!(types(&node.conflist), ["ptp", "portmap"]);
        assert!(!node.binary.exists());
    }

    #[test]
    fn a_broken_config_is_reported_and_left_untouched() {
        let node = node(DEFAULT_INTERVAL);
        fs::write(&node.conflist, "{\"plugins\": [").expect("write");
        let ChainCheck::Failed(error) = node.watch.check(&|| true) else {
            panic!("a broken config was not reported");
        };
        assert!(error.contains("10-kindnet.conflist"), "{error}");
        assert_eq!(
            fs::read_to_string(&node.conflist).expect("read"),
            "{\"plugins\": ["
        );
    }

    async fn until(what: &str, mut condition: impl FnMut() -> bool) {
        // Generous for a loaded machine; the interval under test is 20 ms.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_running_watch_rechains_a_rewritten_conflist_and_stops_on_drain() {
        let node = node(Duration::from_millis(20));
        let metrics = ChainMetrics::default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(node.watch.clone().run(metrics.clone(), stop_rx));
        // The metric is counted after the write: wait for it, then check both.
        until("the first chaining", || metrics.rechains.get() >= 1).await;
        assert!(types(&node.conflist).contains(&"ambit-cni".to_owned()));
        assert_eq!(metrics.rechains.get(), 1);

        // kindnet restarts and writes its conflist again, without ambit-cni.
        fs::write(&node.conflist, KINDNET).expect("rewrite");
        until("the re-chaining", || metrics.rechains.get() >= 2).await;
        assert_eq!(types(&node.conflist), ["ptp", "portmap", "ambit-cni"]);
        assert_eq!(metrics.rechains.get(), 2);

        // Draining: the watch ends by itself (so an uninstall after it is not undone).
        stop_tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the watch stopped on drain")
            .expect("no panic");
        assert_eq!(metrics.rechains.get(), 2);
    }
}
