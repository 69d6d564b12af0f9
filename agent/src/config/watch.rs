//! Watching the local-mode file: a change is parsed whole and published as a new snapshot;
//! a file that does not parse is refused with an error naming the place, and the previous
//! state stays in force.
//!
//! Polling (content compared, not mtime) rather than inotify: it also sees files replaced
//! by rename (editors, ConfigMap symlink swaps) and costs one small read per interval.
//!
//! A changed file is applied only once it has stopped changing: the same content read twice,
//! a settle interval apart. A file caught mid-write can be valid YAML (cut at a line end,
//! the documents after the cut simply missing), so parsing alone cannot tell it from the
//! real thing. Writers should still replace the file by rename, as a ConfigMap volume does.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{ConfigError, MeshState, parse};

/// How long a changed file must stay unchanged before it is applied.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(200);

pub struct ConfigWatcher {
    path: PathBuf,
    node: String,
    interval: Duration,
    settle: Duration,
    /// Whether the last applied state had a workload on this node (`None`: none seen yet),
    /// so the warning about an unknown node comes once per change, not per reload.
    node_known: Mutex<Option<bool>>,
}

/// Where the watched text comes from: the file, or a script in tests.
trait Source: Send {
    fn read(&mut self) -> impl Future<Output = io::Result<String>> + Send;
}

struct FileSource(PathBuf);

impl Source for FileSource {
    fn read(&mut self) -> impl Future<Output = io::Result<String>> + Send {
        tokio::fs::read_to_string(self.0.clone())
    }
}

/// Read failures in a row: the first is logged, the rest only counted, and the end of the
/// streak is logged with its length.
#[derive(Default)]
struct ReadFailures {
    streak: u64,
}

impl ReadFailures {
    fn failed(&mut self, path: &std::path::Path, error: &io::Error) {
        if self.streak == 0 {
            warn!(path = %path.display(), %error, "configuration file unreadable (deleted, or being replaced?); keeping the current configuration");
        }
        self.streak += 1;
    }

    fn succeeded(&mut self, path: &std::path::Path) {
        if self.streak > 0 {
            info!(path = %path.display(), failed_reads = self.streak, "configuration file readable again");
            self.streak = 0;
        }
    }
}

impl ConfigWatcher {
    pub fn new(path: PathBuf, node: String, interval: Duration) -> Self {
        Self {
            path,
            node,
            interval,
            settle: DEFAULT_SETTLE,
            node_known: Mutex::new(None),
        }
    }

    /// How long a changed file must read the same before it is applied.
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// Reads and parses the file once.
    pub fn load(&self) -> Result<(String, MeshState), ConfigError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| ConfigError::Read {
            path: self.path.clone(),
            source,
        })?;
        let (state, warnings) = parse(&text, &self.node)?;
        for warning in warnings {
            warn!(%warning, "policy warning");
        }
        self.check_node(&state);
        Ok((text, state))
    }

    /// Publishes every valid change to `tx` until all receivers are gone.
    pub async fn run(self, last_text: String, tx: watch::Sender<Arc<MeshState>>) {
        let source = FileSource(self.path.clone());
        self.watch(source, last_text, tx).await;
    }

    async fn watch(
        self,
        mut source: impl Source,
        mut last_text: String,
        tx: watch::Sender<Arc<MeshState>>,
    ) {
        let mut failures = ReadFailures::default();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let Some(mut text) = self.read(&mut source, &mut failures).await else {
                continue;
            };
            if text == last_text {
                continue;
            }
            // Changed: wait until two reads a settle interval apart agree.
            loop {
                tokio::time::sleep(self.settle).await;
                let Some(again) = self.read(&mut source, &mut failures).await else {
                    break;
                };
                if again == text {
                    break;
                }
                text = again;
            }
            if failures.streak > 0 || text == last_text {
                continue;
            }
            last_text = text;
            match parse(&last_text, &self.node) {
                Ok((state, warnings)) => {
                    for warning in warnings {
                        warn!(%warning, "policy warning");
                    }
                    info!(path = %self.path.display(), "configuration reloaded");
                    self.check_node(&state);
                    let _ = tx.send(Arc::new(state));
                }
                Err(e) => {
                    error!(path = %self.path.display(), error = %e, "configuration refused; keeping the previous one");
                }
            }
        }
    }

    async fn read(&self, source: &mut impl Source, failures: &mut ReadFailures) -> Option<String> {
        match source.read().await {
            Ok(text) => {
                failures.succeeded(&self.path);
                Some(text)
            }
            Err(e) => {
                failures.failed(&self.path, &e);
                None
            }
        }
    }

    /// Warns when no workload in the configuration runs on this node (a typo in `--node`
    /// would otherwise give a ready agent serving nothing), once per change.
    fn check_node(&self, state: &MeshState) {
        let known = state.node_known();
        let before = self
            .node_known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(known);
        if before == Some(known) {
            return;
        }
        if !known {
            warn!(node = %self.node, path = %self.path.display(), "no workload in the configuration is on this node: check --node; no pod is served until one is");
        } else if before == Some(false) {
            info!(node = %self.node, "the configuration has workloads on this node again");
        }
    }
}

#[cfg(test)]
pub(super) mod testing {
    //! A scripted file for the watcher tests.

    use super::*;

    /// The file's content (`None`: deleted) and every read served, in order.
    #[derive(Clone, Default)]
    pub struct ScriptedFile {
        content: Arc<Mutex<Option<String>>>,
        served: Arc<Mutex<Vec<Option<String>>>>,
    }

    impl ScriptedFile {
        pub fn new(text: &str) -> Self {
            let file = Self::default();
            file.set(Some(text));
            file
        }

        pub fn set(&self, text: Option<&str>) {
            *self.content.lock().expect("lock") = text.map(str::to_owned);
        }

        /// Every read so far: the text served, or `None` for a failed read.
        pub fn served(&self) -> Vec<Option<String>> {
            self.served.lock().expect("lock").clone()
        }
    }

    impl Source for ScriptedFile {
        fn read(&mut self) -> impl Future<Output = io::Result<String>> + Send {
            let content = self.content.lock().expect("lock").clone();
            self.served.lock().expect("lock").push(content.clone());
            std::future::ready(content.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound)))
        }
    }

    impl ConfigWatcher {
        pub async fn watch_scripted(
            self,
            file: ScriptedFile,
            last_text: String,
            tx: watch::Sender<Arc<MeshState>>,
        ) {
            self.watch(file, last_text, tx).await;
        }
    }
}
