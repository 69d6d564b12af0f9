//! Log setup: text or JSON lines, with a filter the admin API can change at runtime.
//!
//! Lines are written to stdout by a thread of their own, never by the thread that logs: a
//! container runtime that reads the agent's stdout slowly (or not at all) fills the pipe,
//! and a `write` to a full pipe blocks — on a data-path thread that would stall every
//! connection it serves. The logging thread batches what queued up into one `write`; when
//! its queue is full, new lines are dropped and counted (`ambit_log_lines_dropped_total`),
//! so a stuck log costs lines, not connections.

use std::io::{BufWriter, IsTerminal as _, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
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

/// How long the logging thread lets lines gather after writing some, before it looks
/// again (see [`write_lines`]).
const GATHER: Duration = Duration::from_millis(10);

/// Reads and replaces the live log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    dropped: Arc<AtomicU64>,
}

/// Keeps the logging thread; dropping it writes out what is queued, waiting at most
/// [`FLUSH_AT_EXIT`]. Held by `main` until the process is about to exit (`let (_, _) =`
/// would drop it at once, and every later line would be counted as dropped).
#[must_use = "dropping the guard stops the log's writer thread"]
pub struct LogGuard {
    worker: Option<LogWorker>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        // The writer thread may be stuck in a write to a stalled stdout: wait for it on a
        // thread of its own, for a bounded time.
        let (done_tx, done) = std::sync::mpsc::channel();
        let flush = std::thread::Builder::new()
            .name("ambit-log-flush".into())
            .spawn(move || {
                worker.finish();
                let _ = done_tx.send(());
            });
        if flush.is_ok() {
            let _ = done.recv_timeout(FLUSH_AT_EXIT);
        }
    }
}

enum Message {
    Line(Vec<u8>),
    /// Write out what is queued and stop.
    Finish,
}

/// The logging thread and the way to stop it.
struct LogWorker {
    queue: SyncSender<Message>,
    thread: JoinHandle<()>,
}

impl LogWorker {
    /// Writes out what is queued, then returns once the thread has stopped.
    fn finish(self) {
        if self.queue.send(Message::Finish).is_ok() {
            let _ = self.thread.join();
        }
    }
}

/// Where log lines go: each `write` (one formatted line) is queued for the logging thread,
/// without blocking; a full queue drops the line and counts it.
///
/// Written here rather than taken from tracing-appender because of how its writer thread
/// waits: it blocks on the queue whenever it ran empty, so at thousands of access-log lines
/// a second every line cost the thread that logged it a futex wake-up and the two cores a
/// switch to the logging thread and back. This writer's thread lets lines gather instead
/// (see [`write_lines`]), and a sender only enqueues.
struct OffThreadWriter {
    queue: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl OffThreadWriter {
    fn dropped_lines(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

impl Write for &OffThreadWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        match self.queue.try_send(Message::Line(line.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for OffThreadWriter {
    type Writer = &'a OffThreadWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// The logging thread's loop. It waits on the queue only when the queue has stayed empty
/// for [`GATHER`] after the last lines it wrote: a waiting thread is woken by the next
/// sender, once per line if lines come one at a time. While lines keep coming it writes
/// what gathered, calls `pause` ([`GATHER`] in the agent), and looks again: one wake-up
/// per pause however many lines arrived (written in 64 KiB writes), none of them woken by
/// a sender. A lone line is still written at once; after a drain of `no_pause_from` lines
/// or more it looks again without pausing, so a burst does not fill the queue (and drop
/// lines) while stdout keeps up.
fn write_lines(
    queue: &Receiver<Message>,
    out: &mut impl Write,
    mut pause: impl FnMut(),
    no_pause_from: usize,
) {
    while let Ok(Message::Line(line)) = queue.recv() {
        let _ = out.write_all(&line);
        let mut gathered = 0usize;
        loop {
            let _ = out.flush();
            if gathered < no_pause_from {
                pause();
            }
            gathered = 0;
            loop {
                match queue.try_recv() {
                    Ok(Message::Line(line)) => {
                        let _ = out.write_all(&line);
                        gathered += 1;
                    }
                    Err(TryRecvError::Empty) => break,
                    Ok(Message::Finish) | Err(TryRecvError::Disconnected) => {
                        let _ = out.flush();
                        return;
                    }
                }
            }
            if gathered == 0 {
                break;
            }
        }
    }
    let _ = out.flush();
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
    /// enough, or a burst of more lines than the queue holds), or because the thread had
    /// stopped (at exit).
    pub fn lines_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
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
/// drops (and counts) lines once `queued` are waiting. Without a thread (it could not be
/// started) every line is dropped and counted.
fn off_thread_writer(
    out: impl Write + Send + 'static,
    queued: usize,
    pause: impl FnMut() + Send + 'static,
) -> (OffThreadWriter, Option<LogWorker>) {
    let (queue, lines) = std::sync::mpsc::sync_channel(queued);
    let writer = OffThreadWriter {
        queue: queue.clone(),
        dropped: Arc::default(),
    };
    let started = std::thread::Builder::new()
        .name("ambit-log".into())
        .spawn(move || {
            let mut out = BufWriter::with_capacity(WRITE_BATCH, out);
            write_lines(&lines, &mut out, pause, (queued / 4).max(1));
        });
    match started {
        Ok(thread) => (writer, Some(LogWorker { queue, thread })),
        Err(e) => {
            // The queue's receiving end went with the thread's closure.
            eprintln!("ambit: could not start the logging thread, every line is dropped: {e}");
            (writer, None)
        }
    }
}

/// Installs the global subscriber; `filter` is `AMBIT_LOG`'s value or the default.
pub fn init(format: LogFormat, filter: &str) -> (LogControl, LogGuard) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colour only for a person at a terminal: a container's log (a pipe or file) must not
    // carry escape codes, and writing them costs ~13 K instructions per access-log line.
    let ansi = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let (writer, worker) = off_thread_writer(std::io::stdout(), QUEUED_LINES, || {
        std::thread::sleep(GATHER)
    });
    let dropped = writer.dropped_lines();
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
    (LogControl { handle, dropped }, LogGuard { worker })
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
        let (writer, worker) = off_thread_writer(out.clone(), QUEUED, || {});
        let dropped = writer.dropped_lines();
        (&writer).write_all(b"first\n").expect("write");
        started
            .recv_timeout(BLOCKED)
            .expect("the logging thread never wrote the first line");
        // The logging thread is now stuck in a write: QUEUED lines fit in its queue.
        let (done_tx, done) = mpsc::channel();
        let logger = std::thread::spawn(move || {
            for i in 0..LINES {
                (&writer)
                    .write_all(format!("line {i}\n").as_bytes())
                    .expect("write");
            }
            let _ = done_tx.send(());
        });
        done.recv_timeout(BLOCKED)
            .expect("logging blocked on a stalled stdout");
        logger.join().expect("logger thread");
        assert_eq!(dropped.load(Ordering::Relaxed), (LINES - QUEUED) as u64);

        out.release();
        let expected: Vec<String> = std::iter::once("first".to_owned())
            .chain((0..QUEUED).map(|i| format!("line {i}")))
            .collect();
        // The writer thread drains its queue once released; the test waits for that
        // itself, with its own generous bound.
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
        finish_in_time(worker);
    }

    /// Stops the logging thread; fails rather than hangs if it does not stop.
    fn finish_in_time(worker: Option<LogWorker>) {
        let worker = worker.expect("logging thread");
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            worker.finish();
            let _ = done_tx.send(());
        });
        done.recv_timeout(BLOCKED)
            .expect("the logging thread did not stop");
    }

    /// Records each `write` the logging thread makes.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<String>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let text = String::from_utf8_lossy(buf).into_owned();
            self.0.lock().expect("lock").push(text);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Lines that arrive while the logging thread pauses are written together after the
    /// pause, and the thread goes back to waiting on the queue (where the next sender must
    /// wake it) only after a pause in which nothing arrived. The pause is the test's: it
    /// reports each one and holds the thread until told to go on.
    #[test]
    fn lines_that_keep_coming_gather_into_one_write_per_pause() {
        let (paused_tx, paused) = mpsc::channel::<()>();
        let (go, go_rx) = mpsc::channel::<()>();
        let writes = Writes::default();
        let (writer, worker) = off_thread_writer(writes.clone(), 64, move || {
            let _ = paused_tx.send(());
            let _ = go_rx.recv_timeout(BLOCKED);
        });
        let line = |i: usize| (&writer).write_all(format!("line {i}\n").as_bytes());
        let wait_pause = || paused.recv_timeout(BLOCKED).expect("the thread paused");
        let written = || writes.0.lock().expect("lock").clone();

        // A lone line is written before the thread pauses.
        line(0).expect("write");
        wait_pause();
        assert_eq!(written(), ["line 0\n"]);
        // Lines arriving during the pause: one write after it, then another pause.
        for i in 1..=10 {
            line(i).expect("write");
        }
        go.send(()).expect("go");
        wait_pause();
        let gathered: String = (1..=10).map(|i| format!("line {i}\n")).collect();
        assert_eq!(written(), ["line 0\n".to_owned(), gathered.clone()]);
        // Nothing arrived in this pause: the thread waits on the queue (no more pauses
        // without a line), and the next line is again written before a pause.
        go.send(()).expect("go");
        assert!(
            paused.recv_timeout(Duration::from_millis(100)).is_err(),
            "the thread kept pausing with nothing queued instead of waiting on the queue"
        );
        line(11).expect("write");
        wait_pause();
        assert_eq!(
            written(),
            ["line 0\n".to_owned(), gathered, "line 11\n".to_owned()]
        );
        go.send(()).expect("go");
        assert_eq!(writer.dropped_lines().load(Ordering::Relaxed), 0);
        finish_in_time(worker);
    }

    /// A drain that found a quarter of the queue or more is followed at once by another:
    /// pausing then could fill the queue and drop lines that stdout would have taken.
    #[test]
    fn a_burst_is_drained_again_without_a_pause() {
        const QUEUED: usize = 8;
        let (paused_tx, paused) = mpsc::channel::<()>();
        let (go, go_rx) = mpsc::channel::<()>();
        let writes = Writes::default();
        let (writer, worker) = off_thread_writer(writes.clone(), QUEUED, move || {
            let _ = paused_tx.send(());
            let _ = go_rx.recv_timeout(BLOCKED);
        });
        let line = |i: usize| (&writer).write_all(format!("line {i}\n").as_bytes());
        line(0).expect("write");
        paused.recv_timeout(BLOCKED).expect("the thread paused");
        // A burst of a quarter of the queue (2 lines) during the pause.
        line(1).expect("write");
        line(2).expect("write");
        go.send(()).expect("go");
        let deadline = std::time::Instant::now() + BLOCKED;
        while writes.0.lock().expect("lock").len() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the burst was never written"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            writes.0.lock().expect("lock").clone(),
            ["line 0\n", "line 1\nline 2\n"]
        );
        // Looked again at once, found nothing, and waits on the queue: no pause.
        assert!(
            paused.recv_timeout(Duration::from_millis(100)).is_err(),
            "the thread paused after a burst instead of looking again at once"
        );
        finish_in_time(worker);
    }
}
