//! Watching the local-mode file: a change is parsed whole and published as a new snapshot;
//! a file that does not parse is refused with an error naming the place, and the previous
//! state stays in force.
//!
//! Polling (content compared, not mtime) rather than inotify: it also sees files replaced
//! by rename (editors, ConfigMap symlink swaps) and costs one small read per interval.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{ConfigError, MeshState, parse};

pub struct ConfigWatcher {
    path: PathBuf,
    node: String,
    interval: Duration,
}

impl ConfigWatcher {
    pub fn new(path: PathBuf, node: String, interval: Duration) -> Self {
        Self {
            path,
            node,
            interval,
        }
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
        Ok((text, state))
    }

    /// Publishes every valid change to `tx` until all receivers are gone.
    pub async fn run(self, mut last_text: String, tx: watch::Sender<Arc<MeshState>>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let Ok(text) = tokio::fs::read_to_string(&self.path).await else {
                continue;
            };
            if text == last_text {
                continue;
            }
            last_text = text;
            match parse(&last_text, &self.node) {
                Ok((state, warnings)) => {
                    for warning in warnings {
                        warn!(%warning, "policy warning");
                    }
                    info!(path = %self.path.display(), "configuration reloaded");
                    let _ = tx.send(Arc::new(state));
                }
                Err(e) => {
                    error!(path = %self.path.display(), error = %e, "configuration refused; keeping the previous one");
                }
            }
        }
    }
}
