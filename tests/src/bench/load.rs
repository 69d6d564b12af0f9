//! Our small load tool: 1 KiB round trips on one long-lived connection (at a fixed rate or
//! as fast as they go), new connections per second, and many idle connections held open.
//! Client threads enter a pod's network namespace once and then use plain blocking sockets.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;

/// Request and response size of the latency figures.
pub const MESSAGE: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `f` on a new thread inside the network namespace at `netns`.
pub fn spawn_in_netns<T, F>(
    netns: &Path,
    f: F,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    let file =
        std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    Ok(std::thread::Builder::new()
        .name("bench-netns".into())
        .spawn(move || {
            ambit_agent::sys::setns_net(file.as_fd()).context("setns")?;
            f()
        })?)
}

/// The result of a thread started by [`spawn_in_netns`]; a panic is an error.
pub(crate) fn join<T>(handle: std::thread::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
}

fn connect(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {to}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Reads the pod app's greeting line (`<pod> peer=… local=…\n`), sent before the echo.
fn skip_greeting(s: &mut TcpStream) -> anyhow::Result<()> {
    let mut byte = [0u8; 1];
    loop {
        s.read_exact(&mut byte)
            .context("reading the app's greeting")?;
        if byte[0] == b'\n' {
            return Ok(());
        }
    }
}

/// Round-trip latency percentiles, in microseconds.
#[derive(Clone, Debug)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub round_trips_per_sec: f64,
    /// The exchange alone, from its write to the last byte of its answer: unlike the
    /// latency of a fixed-rate run, it does not include waiting behind an earlier slow one.
    pub service_p99_us: f64,
    /// A fixed-rate run in [`WINDOW`]s (empty at full speed).
    pub windows: Vec<Window>,
}

impl Latency {
    /// The run's windows that stalled against its own p50.
    pub fn stalled_windows(&self) -> impl Iterator<Item = &Window> {
        self.windows.iter().filter(|w| w.stalled(self.p50_us))
    }
}

/// Width of a fixed-rate run's [`Window`]s.
pub const WINDOW: Duration = Duration::from_millis(100);

/// The round trips of a fixed-rate run due within one [`WINDOW`]: where in the run a stall
/// sits, and whether it is one long exchange (the others only queued behind it: a high
/// latency, a low service time) or slow exchanges throughout.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Window {
    /// From the first scheduled send of the run.
    pub start_ms: u64,
    pub round_trips: usize,
    pub latency_p99_us: f64,
    pub latency_max_us: f64,
    pub service_max_us: f64,
}

impl Window {
    /// A window whose p99 is ten times the run's p50 and above 5 ms: a stall, not the
    /// jitter of a busy 2-core machine (a late wake-up of the load's own thread costs 1–3 ms
    /// now and then, with or without the mesh).
    pub fn stalled(&self, run_p50_us: f64) -> bool {
        self.latency_p99_us > (10.0 * run_p50_us).max(5000.0)
    }
}

/// One round trip of a fixed-rate run: when it was due (from the run's start), its latency
/// from then, and its service time (from its actual write).
#[derive(Clone, Copy, Debug)]
struct Sample {
    due: Duration,
    latency: Duration,
    service: Duration,
}

/// Groups `samples` (in due order) into windows of `width` by due time.
fn windows(samples: &[Sample], width: Duration) -> Vec<Window> {
    let mut out: Vec<Window> = Vec::new();
    let index = |s: &Sample| (s.due.as_nanos() / width.as_nanos().max(1)) as u64;
    for group in samples.chunk_by(|a, b| index(a) == index(b)) {
        let mut latencies: Vec<Duration> = group.iter().map(|s| s.latency).collect();
        latencies.sort_unstable();
        // Nearest rank, as hdrhistogram reports percentiles.
        let rank = ((latencies.len() as f64 * 0.99).ceil() as usize).clamp(1, latencies.len());
        let us = |d: Duration| d.as_nanos() as f64 / 1000.0;
        out.push(Window {
            start_ms: index(&group[0]) * width.as_millis() as u64,
            round_trips: group.len(),
            latency_p99_us: us(latencies[rank - 1]),
            latency_max_us: us(latencies[latencies.len() - 1]),
            service_max_us: group.iter().map(|s| us(s.service)).fold(0.0, f64::max),
        });
    }
    out
}

/// 1 KiB request, 1 KiB echo, on one connection to the pod app at `to`, for `duration`.
/// With `rate` the requests are sent on a fixed schedule and each latency is counted from
/// the scheduled send time, so a slow answer also charges the requests it delays
/// (no coordinated omission); without, back to back.
pub fn round_trips(
    client_netns: &Path,
    to: SocketAddr,
    duration: Duration,
    rate: Option<u32>,
) -> anyhow::Result<Latency> {
    join(spawn_in_netns(client_netns, move || {
        let mut s = connect(to)?;
        skip_greeting(&mut s)?;
        let request = vec![0x5au8; MESSAGE];
        let mut response = vec![0u8; MESSAGE];
        let mut once = |s: &mut TcpStream| -> anyhow::Result<()> {
            s.write_all(&request)?;
            s.read_exact(&mut response)?;
            Ok(())
        };
        for _ in 0..200 {
            once(&mut s)?;
        }
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
        let mut service_hist = hist.clone();
        let interval = rate.map(|r| Duration::from_secs(1) / r.max(1));
        let mut samples = Vec::with_capacity(
            rate.map_or(0, |r| r as usize * duration.as_secs().max(1) as usize + 1),
        );
        let started = Instant::now();
        let mut sent: u32 = 0;
        while started.elapsed() < duration {
            let t0 = match interval {
                Some(interval) => {
                    let due = started + interval * sent;
                    // Sleep most of the wait and spin the end: sleep overshoots by tens
                    // of microseconds, which would otherwise count as latency.
                    let now = Instant::now();
                    if due > now + Duration::from_micros(200) {
                        std::thread::sleep(due - now - Duration::from_micros(200));
                    }
                    while Instant::now() < due {
                        std::hint::spin_loop();
                    }
                    due
                }
                None => Instant::now(),
            };
            let sending = Instant::now();
            once(&mut s)?;
            let done = Instant::now();
            let latency = done - t0;
            let service = done - sending;
            hist.saturating_record(latency.as_nanos() as u64);
            service_hist.saturating_record(service.as_nanos() as u64);
            if interval.is_some() {
                samples.push(Sample {
                    due: t0 - started,
                    latency,
                    service,
                });
            }
            sent += 1;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let _ = s.shutdown(Shutdown::Both);
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Ok(Latency {
            p50_us: us(0.50),
            p90_us: us(0.90),
            p99_us: us(0.99),
            round_trips_per_sec: f64::from(sent) / elapsed,
            service_p99_us: service_hist.value_at_quantile(0.99) as f64 / 1000.0,
            windows: windows(&samples, WINDOW),
        })
    })?)
}

/// Connections made by [`connection_rate`].
#[derive(Clone, Copy, Debug)]
pub struct ConnectionRate {
    pub per_sec: f64,
    pub connections: u64,
}

/// New connections per second for `duration`, `workers` at a time, each connection doing
/// one request/response: connect, send 64 bytes, half-close, read the greeting and echo to
/// the end.
pub fn connection_rate(
    client_netns: &Path,
    to: SocketAddr,
    duration: Duration,
    workers: usize,
) -> anyhow::Result<ConnectionRate> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        handles.push(spawn_in_netns(client_netns, move || {
            let payload = [0x42u8; 64];
            let mut done = 0u64;
            let mut reply = Vec::with_capacity(256);
            while Instant::now() < deadline {
                let mut s = connect(to)?;
                s.write_all(&payload)?;
                s.shutdown(Shutdown::Write)?;
                reply.clear();
                s.read_to_end(&mut reply)?;
                if !reply.ends_with(&payload) {
                    bail!("connection to {to}: short reply ({} bytes)", reply.len());
                }
                done += 1;
            }
            Ok(done)
        })?);
    }
    let mut total = 0;
    for h in handles {
        total += join(h)?;
    }
    Ok(ConnectionRate {
        per_sec: total as f64 / started.elapsed().as_secs_f64(),
        connections: total,
    })
}

/// A listener inside a pod that never accepts: connections complete their handshake and
/// wait in its accept queue, open and idle, costing this process no descriptor (the
/// machine's hard RLIMIT_NOFILE may be too low for both ends of 10,000 connections). The
/// queue length, read with `ss`, tells when every connection is through.
pub struct Holder {
    pub addr: SocketAddr,
    netns: PathBuf,
    listener: TcpListener,
}

impl Holder {
    /// Needs `net.core.somaxconn` ≥ the connections to hold, in the pod's netns.
    pub fn start(netns: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = join(spawn_in_netns(netns, move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(65_535)?;
            s.set_nonblocking(true)?;
            Ok(TcpListener::from(s))
        })?)?;
        Ok(Self {
            addr,
            netns: netns.to_path_buf(),
            listener,
        })
    }

    /// Connections waiting in the accept queue (`ss` Recv-Q of a listener).
    pub fn queued(&self) -> anyhow::Result<usize> {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .args([
                "ss",
                "-ltnH",
                "sport",
                "=",
                &format!(":{}", self.addr.port()),
            ])
            .output()
            .context("running ss (iproute2)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let queued = text
            .lines()
            .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .with_context(|| format!("no listener on {} in `ss` output: {text}", self.addr))?;
        Ok(queued)
    }

    /// Waits until at least `count` connections are queued.
    pub fn wait_queued(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let queued = self.queued()?;
            if queued >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {queued} of {count} connections reached {} in {timeout:?}",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The next queued connection, if any (blocking, with the load tool's timeouts).
    pub fn accept(&self) -> std::io::Result<Option<TcpStream>> {
        match self.listener.accept() {
            Ok((s, _)) => {
                // Accepted sockets do not inherit the listener's O_NONBLOCK on Linux; set
                // it explicitly anyway so a timeout, not a hang, ends a silent peer.
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Some(s))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Accepts and closes every queued connection.
    pub fn release(&self) {
        while self.listener.accept().is_ok() {}
    }
}

/// Opens `count` connections from inside `client_netns` to `to` and returns them, open and
/// idle (the caller checks they arrived with [`Holder::wait_queued`]).
pub fn open_idle(
    client_netns: &Path,
    to: SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    join(spawn_in_netns(client_netns, move || {
        (0..count)
            .map(|i| connect(to).with_context(|| format!("idle connection {i}")))
            .collect()
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(due_ms: u64, latency_us: u64, service_us: u64) -> Sample {
        Sample {
            due: Duration::from_millis(due_ms),
            latency: Duration::from_micros(latency_us),
            service: Duration::from_micros(service_us),
        }
    }

    #[test]
    fn a_pause_shows_as_the_window_it_is_in_with_the_exchange_that_caused_it() {
        // 1 ms apart; the exchange due at 150 ms takes 30 ms and the next 29 queue behind it.
        let mut samples = Vec::new();
        for ms in 0..300u64 {
            let (latency, service) = match ms {
                150 => (30_000, 30_000),
                151..180 => ((180 - ms) * 1000, 60),
                _ => (80, 80),
            };
            samples.push(sample(ms, latency, service));
        }
        let windows = windows(&samples, Duration::from_millis(100));
        assert_eq!(
            windows.iter().map(|w| w.start_ms).collect::<Vec<_>>(),
            [0, 100, 200]
        );
        assert!(windows.iter().all(|w| w.round_trips == 100));
        let run_p50_us = 80.0;
        let stalled: Vec<u64> = windows
            .iter()
            .filter(|w| w.stalled(run_p50_us))
            .map(|w| w.start_ms)
            .collect();
        assert_eq!(stalled, [100]);
        let pause = &windows[1];
        assert_eq!(pause.latency_max_us, 30_000.0);
        assert_eq!(pause.service_max_us, 30_000.0);
        // Nearest rank: the 99th of 100 values, the second largest.
        assert_eq!(pause.latency_p99_us, 29_000.0);
        assert_eq!(windows[0].latency_p99_us, 80.0);
    }

    #[test]
    fn jitter_of_a_few_milliseconds_is_not_a_stall() {
        let window = Window {
            start_ms: 0,
            round_trips: 100,
            latency_p99_us: 4900.0,
            latency_max_us: 4950.0,
            service_max_us: 950.0,
        };
        assert!(!window.stalled(60.0));
        let slow_run = Window {
            latency_p99_us: 7000.0,
            ..window
        };
        // Ten times an 800 µs p50 is 8 ms: 7 ms is within that run's own spread.
        assert!(!slow_run.stalled(800.0));
        assert!(slow_run.stalled(600.0));
    }

    #[test]
    fn a_run_without_samples_has_no_windows() {
        assert!(windows(&[], WINDOW).is_empty());
    }
}
