//! Log setup: text or JSON lines, with a filter the admin API can change at runtime.
//!
//! Lines are written to stdout by a thread of their own, never by the thread that logs: a
//! container runtime that reads the agent's stdout slowly (or not at all) fills the pipe,
//! and a `write` to a full pipe blocks — on an async worker that would stall every
//! connection it serves. The logging thread batches what queued up into one `write`; when
//! its queue is full, new lines are dropped and counted (`ambit_log_lines_dropped_total`),
//! so a stuck log costs lines, not connections.

use std::io::{BufWriter, IsTerminal as _, Write};
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
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

/// Lines the log holds for its writer thread before it drops new ones: about two seconds of
/// access-log lines at 2,000 connections/s (an access-log line is ~500 bytes).
const QUEUED_LINES: usize = 4096;

/// How long the exit waits for queued lines to be written: a stalled stdout must not keep
/// a finished process alive.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// What the logging thread gathers into one `write` when lines queue up.
const WRITE_BATCH: usize = 64 * 1024;

/// Reads and replaces the live log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    dropped: ErrorCounter,
}

/// Keeps the logging thread; dropping it writes out what is queued, waiting at most
/// [`FLUSH_AT_EXIT`]. Held by `main` until the process is about to exit (`let (_, _) =`
/// would drop it at once, and every later line would be counted as dropped).
#[must_use = "dropping the guard stops the log's writer thread"]
pub struct LogGuard {
    worker: Option<WorkerGuard>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        // tracing-appender's own drop waits for the writer thread, which may be stuck in a
        // write to a stalled stdout (and then prints to stdout itself): wait on a thread of
        // its own, for a bounded time.
        let (done_tx, done) = std::sync::mpsc::channel();
        let flush = std::thread::Builder::new()
            .name("ambit-log-flush".into())
            .spawn(move || {
                drop(worker);
                let _ = done_tx.send(());
            });
        if flush.is_ok() {
            let _ = done.recv_timeout(FLUSH_AT_EXIT);
        }
    }
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

    /// Lines dropped because the writer thread's queue was full (stdout not read fast
    /// enough).
    pub fn lines_dropped(&self) -> u64 {
        u64::try_from(self.dropped.dropped_lines()).unwrap_or(u64::MAX)
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

/// A writer that hands each line to a thread writing to `out`: never blocks the caller;
/// drops (and counts) lines once `queued` are waiting.
fn off_thread_writer(
    out: impl Write + Send + 'static,
    queued: usize,
) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(queued)
        .thread_name("ambit-log")
        .finish(BufWriter::with_capacity(WRITE_BATCH, out))
}

/// Installs the global subscriber; `filter` is `AMBIT_LOG`'s value or the default.
pub fn init(format: LogFormat, filter: &str) -> (LogControl, LogGuard) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colour only for a person at a terminal: a container's log (a pipe or file) must not
    // carry escape codes, and writing them costs ~13 K instructions per access-log line.
    let ansi = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let (writer, guard) = off_thread_writer(std::io::stdout(), QUEUED_LINES);
    let dropped = writer.error_counter();
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(writer)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    (
        LogControl { handle, dropped },
        LogGuard {
            worker: Some(guard),
        },
    )
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;

    /// A generous bound that only a blocked call misses.
    const BLOCKED: Duration = Duration::from_secs(20);

    /// stdout of a container whose runtime stopped reading: a write says it has started,
    /// then waits until the test lets it through, and lands in `written`.
    #[derive(Clone)]
    struct StalledOutput {
        started: mpsc::SyncSender<()>,
        open: Arc<(Mutex<bool>, Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl StalledOutput {
        fn release(&self) {
            let (open, changed) = &*self.open;
            *open.lock().expect("lock") = true;
            changed.notify_all();
        }
    }

    impl Write for StalledOutput {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.started.try_send(());
            let (open, changed) = &*self.open;
            let mut open = open.lock().expect("lock");
            while !*open {
                open = changed.wait(open).expect("lock");
            }
            self.written.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_stdout_costs_counted_lines_and_never_blocks_the_logger() {
        const QUEUED: usize = 8;
        const LINES: usize = 100;
        let (started_tx, started) = mpsc::sync_channel(1);
        let out = StalledOutput {
            started: started_tx,
            open: Arc::default(),
            written: Arc::default(),
        };
        let (mut writer, guard) = off_thread_writer(out.clone(), QUEUED);
        let dropped = writer.error_counter();
        writer.write_all(b"first\n").expect("write");
        started
            .recv_timeout(BLOCKED)
            .expect("the logging thread never wrote the first line");
        // The logging thread is now stuck in a write: QUEUED lines fit in its queue.
        let (done_tx, done) = mpsc::channel();
        let logger = std::thread::spawn(move || {
            for i in 0..LINES {
                writer
                    .write_all(format!("line {i}\n").as_bytes())
                    .expect("write");
            }
            let _ = done_tx.send(());
        });
        done.recv_timeout(BLOCKED)
            .expect("logging blocked on a stalled stdout");
        logger.join().expect("logger thread");
        assert_eq!(dropped.dropped_lines(), LINES - QUEUED);

        out.release();
        let expected: Vec<String> = std::iter::once("first".to_owned())
            .chain((0..QUEUED).map(|i| format!("line {i}")))
            .collect();
        // The writer thread drains its queue once released; waiting for that (rather than
        // on the guard's drop, which gives up after 100 ms on a busy machine) keeps the
        // test free of timing.
        let (drained_tx, drained) = mpsc::channel();
        let written = out.written.clone();
        let watcher = std::thread::spawn(move || {
            loop {
                let text = String::from_utf8(written.lock().expect("lock").clone());
                // "first" and the QUEUED lines.
                if text.as_ref().map_or(0, |t| t.lines().count()) > QUEUED {
                    let _ = drained_tx.send(text);
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let written = drained
            .recv_timeout(BLOCKED)
            .expect("the queued lines were never written")
            .expect("utf8");
        watcher.join().expect("watcher thread");
        assert_eq!(written.lines().collect::<Vec<_>>(), expected);
        drop(guard);
    }
}
