//! Log setup: text or JSON lines, with a filter the admin API can change at runtime.

use std::io::IsTerminal as _;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, reload};

use super::ObservabilityError;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Reads and replaces the live log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("level", &self.level())
            .finish()
    }
}

impl LogControl {
    /// The filter in effect, in `EnvFilter` syntax (e.g. `info`, `ambit_agent=debug`).
    pub fn level(&self) -> String {
        self.handle
            .with_current(ToString::to_string)
            .unwrap_or_else(|_| "unknown".into())
    }

    pub fn set_level(&self, spec: &str) -> Result<(), ObservabilityError> {
        let error = |message: String| ObservabilityError::LogLevel {
            spec: spec.to_owned(),
            message,
        };
        let filter = EnvFilter::try_new(spec).map_err(|e| error(e.to_string()))?;
        self.handle.reload(filter).map_err(|e| error(e.to_string()))
    }
}

/// Installs the global subscriber; `filter` is `AMBIT_LOG`'s value or the default.
pub fn init(format: LogFormat, filter: &str) -> LogControl {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colour only for a person at a terminal: a container's log (a pipe or file) must not
    // carry escape codes, and writing them costs ~13 K instructions per access-log line.
    let ansi = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(ansi).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    LogControl { handle }
}
