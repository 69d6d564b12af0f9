//! Scale curves: how the mesh's cost grows with work, against no mesh in the same run on
//! the two-node testbed (client pod on node 1, server pod on node 2: every figure is
//! cross-node). Three curves:
//! - held connections (1 … 10,000), each echoing 1 KiB on a fixed schedule: the agents'
//!   CPU and RSS, the whole path's CPU, the round trips achieved and their p99;
//! - new connections per second (connect, 64 B request/response, close) with 1 … 64
//!   concurrent clients, pooled HBONE (the default);
//! - bulk Gbit/s with 1 … 16 iperf3 streams.
//!
//! [`run`] returns the report; [`write`] writes `target/bench/scale.json` and the plot
//! `target/bench/scale.png`. As in the testbed benchmark, "no mesh" is the same testbed with
//! the namespace's opt-in label off, and every mesh figure is checked to have gone through
//! the receiving agent (its connection counter), every no-mesh figure not to have.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{iperf, load, procfs};
use crate::testbed::{APP_PORT, MESH_NS, PodSpec, Testbed};

const IPERF_PORT: u16 = 5201;
/// The held connections' echo server (ours: the pod app spends a thread per connection).
const ECHO_PORT: u16 = 9191;
const LOG_WAIT: Duration = Duration::from_secs(20);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being opened at once while the held set is built.
const OPENING_AT_ONCE: usize = 256;
const MIB: f64 = 1024.0 * 1024.0;
/// Descriptors kept for everything but the held connections' two ends.
const NOFILE_SPARE: u64 = 512;
/// Debian's fonts-dejavu-core (`cargo xtask setup` installs it): the plot's text.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Clone, Debug, Serialize)]
pub struct ScaleSettings {
    pub quick: bool,
    /// Held connections, ascending.
    pub connections: Vec<usize>,
    /// Each held connection sends 1 KiB and reads its echo once per this period, the
    /// connections' schedules spread evenly over it.
    pub message_interval: Duration,
    /// Load before the measured window starts, then the window.
    pub warmup: Duration,
    pub window: Duration,
    /// Concurrent clients of the new-connections curve, and seconds of each run.
    pub clients: Vec<usize>,
    pub connect_secs: f64,
    /// iperf3 parallel streams (`-P`), and seconds of each run.
    pub streams: Vec<u32>,
    pub bulk_secs: u64,
}

impl ScaleSettings {
    pub fn full() -> Self {
        Self {
            quick: false,
            connections: vec![1, 100, 1_000, 10_000],
            message_interval: Duration::from_secs(1),
            warmup: Duration::from_secs(2),
            window: Duration::from_secs(10),
            clients: vec![1, 4, 16, 64],
            connect_secs: 5.0,
            streams: vec![1, 4, 16],
            bulk_secs: 5,
        }
    }

    /// Every figure, tiny sizes (the end-to-end suite's smoke run).
    pub fn quick() -> Self {
        Self {
            quick: true,
            connections: vec![1, 10],
            message_interval: Duration::from_millis(250),
            warmup: Duration::from_millis(100),
            window: Duration::from_millis(600),
            clients: vec![1, 4],
            connect_secs: 0.3,
            streams: vec![1],
            bulk_secs: 1,
        }
    }
}

/// No mesh and mesh for one figure at one point of a curve.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Pair {
    pub no_mesh: Option<f64>,
    pub mesh: Option<f64>,
}

impl Pair {
    /// mesh / no mesh, where the baseline is above zero (meaningless for the agents' CPU,
    /// whose no-mesh baseline is noise).
    pub fn ratio(&self) -> Option<f64> {
        match (self.no_mesh, self.mesh) {
            (Some(b), Some(m)) if b > 0.0 => Some(m / b),
            _ => None,
        }
    }

    fn set(&mut self, mesh: bool, value: f64) {
        if mesh {
            self.mesh = Some(value);
        } else {
            self.no_mesh = Some(value);
        }
    }

    fn values(&self) -> [(&'static str, Option<f64>); 2] {
        [("no mesh", self.no_mesh), ("mesh", self.mesh)]
    }
}

/// One point of the held-connections curve.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeldPoint {
    pub connections: usize,
    /// Echoed round trips per second over the window (offered: connections / interval).
    pub round_trips_per_sec: Pair,
    /// p99 round trip, counted from each message's scheduled send time (ms).
    pub p99_ms: Pair,
    /// Both agents' CPU over the window, % of one core (no mesh: the agents carry nothing).
    pub agents_cpu_pct: Pair,
    /// The agents plus this process (the load and echo ends), % of one core: the path's
    /// cost, comparable with and without the mesh (the kernel's share is charged to
    /// whichever process it runs in).
    pub path_cpu_pct: Pair,
    /// Each agent's RSS at the end of the window (MiB): node 1 (client side), node 2.
    pub node1_rss_mib: Pair,
    pub node2_rss_mib: Pair,
    /// Connections that waited over 10 s for an echo and were given up (their later
    /// messages are missing from the round trips): the path no longer keeps up.
    pub stalled: Pair,
}

/// One point of a rate curve.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RatePoint {
    /// Concurrent clients or streams.
    pub x: usize,
    pub value: Pair,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScaleReport {
    pub settings: ScaleSettings,
    pub machine: String,
    pub agent_binary: PathBuf,
    pub nofile_limit: u64,
    pub held: Vec<HeldPoint>,
    /// New connections/s (pooled HBONE) by concurrent clients.
    pub connect: Vec<RatePoint>,
    /// Bulk Gbit/s by iperf3 streams.
    pub bulk: Vec<RatePoint>,
}

impl ScaleReport {
    /// Figures that should have a value and do not.
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        let mut check = |what: String, pair: &Pair| {
            for (side, v) in pair.values() {
                if !v.is_some_and(f64::is_finite) {
                    missing.push(format!("{what} ({side})"));
                }
            }
        };
        for p in &self.held {
            let n = p.connections;
            check(format!("{n} held: round trips/s"), &p.round_trips_per_sec);
            check(format!("{n} held: p99"), &p.p99_ms);
            check(format!("{n} held: agents' CPU"), &p.agents_cpu_pct);
            check(format!("{n} held: path CPU"), &p.path_cpu_pct);
            check(format!("{n} held: node 1 RSS"), &p.node1_rss_mib);
            check(format!("{n} held: node 2 RSS"), &p.node2_rss_mib);
            check(format!("{n} held: stalled"), &p.stalled);
        }
        for p in &self.connect {
            check(format!("connections/s, {} clients", p.x), &p.value);
        }
        for p in &self.bulk {
            check(format!("Gbit/s, {} streams", p.x), &p.value);
        }
        missing
    }

    pub fn markdown(&self) -> String {
        let s = &self.settings;
        // No ratio where the baseline is nil by construction (the agents carry nothing
        // without the mesh).
        let pair_cell = |p: &Pair, comparable: bool| match p.ratio().filter(|_| comparable) {
            Some(r) => format!(
                "{} / {} (×{r:.2})",
                super::cell(p.no_mesh),
                super::cell(p.mesh)
            ),
            None => format!("{} / {}", super::cell(p.no_mesh), super::cell(p.mesh)),
        };
        let mut out = format!(
            "Held connections, each echoing 1 KiB every {:?} (offered load: connections / {:?} \
             round trips/s), measured over {:?} after {:?}. Each cell: no mesh / mesh \
             (mesh ÷ no mesh).\n\n\
             | connections | round trips/s | p99 round trip (ms) | agents' CPU (% of a core) \
             | agents + load CPU (% of a core) | node 1 agent RSS (MiB) | node 2 agent RSS (MiB) \
             | stalled (no echo in 10 s) |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            s.message_interval, s.message_interval, s.window, s.warmup
        );
        let wanted = s.connections.iter().copied().max().unwrap_or(0);
        let measured = self.held.iter().map(|p| p.connections).max().unwrap_or(0);
        if measured < wanted {
            out.insert_str(
                0,
                &format!(
                    "**{wanted} held connections did not fit RLIMIT_NOFILE {} (both ends live in \
                     the bench process): the largest point is {measured}.**\n\n",
                    self.nofile_limit
                ),
            );
        }
        for p in &self.held {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                p.connections,
                pair_cell(&p.round_trips_per_sec, true),
                pair_cell(&p.p99_ms, true),
                pair_cell(&p.agents_cpu_pct, false),
                pair_cell(&p.path_cpu_pct, true),
                pair_cell(&p.node1_rss_mib, true),
                pair_cell(&p.node2_rss_mib, true),
                pair_cell(&p.stalled, false),
            ));
        }
        let rate_table = |out: &mut String, x: &str, unit: &str, points: &[RatePoint]| {
            out.push_str(&format!(
                "\n| {x} | {unit}, no mesh | {unit}, mesh | mesh / no mesh |\n| ---: | ---: | ---: | ---: |\n"
            ));
            for p in points {
                out.push_str(&format!(
                    "| {} | {} | {} | {} |\n",
                    p.x,
                    super::cell(p.value.no_mesh),
                    super::cell(p.value.mesh),
                    p.value.ratio().map_or("–".into(), |r| format!("{r:.2}"))
                ));
            }
        };
        rate_table(
            &mut out,
            "concurrent clients",
            "new connections/s (64 B echo, pooled HBONE)",
            &self.connect,
        );
        rate_table(&mut out, "iperf3 streams", "bulk Gbit/s", &self.bulk);
        out
    }
}

/// Runs every curve, no mesh first, then the mesh.
pub fn run(settings: &ScaleSettings) -> anyhow::Result<ScaleReport> {
    // Both ends of every held connection live in this process (the load and the echo
    // server), and the agents inherit the limit: room for twice the largest count, or the
    // counts that fit (a point beyond the limit is measured at the largest count that fits,
    // and the report says so).
    let largest = settings.connections.iter().copied().max().unwrap_or(0);
    let nofile = raise_nofile(2 * largest as u64 + NOFILE_SPARE)?;
    let room = usize::try_from(nofile.saturating_sub(NOFILE_SPARE) / 2).unwrap_or(usize::MAX);
    let mut counts: Vec<usize> = settings.connections.iter().map(|&n| n.min(room)).collect();
    counts.dedup();
    let agent_binary = crate::testbed::agent_binary()?;

    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server-b", MESH_NS, 1),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    super::tune_for_many_connections(&bed)?;
    let server = bed.pod("server-b");
    let _iperf = iperf::IperfServer::start(&server.ns.path(), IPERF_PORT)?;
    let _echo = EchoServer::start(&server.ns.path(), server.addr(ECHO_PORT))?;

    let mut report = ScaleReport {
        settings: settings.clone(),
        machine: super::machine(),
        agent_binary,
        nofile_limit: nofile,
        held: counts
            .iter()
            .map(|&connections| HeldPoint {
                connections,
                ..HeldPoint::default()
            })
            .collect(),
        connect: settings
            .clients
            .iter()
            .map(|&x| RatePoint {
                x,
                value: Pair::default(),
            })
            .collect(),
        bulk: settings
            .streams
            .iter()
            .map(|&x| RatePoint {
                x: x as usize,
                value: Pair::default(),
            })
            .collect(),
    };

    // Baseline: agents running, nothing enrolled.
    bed.mesh_enabled = false;
    bed.write_config()?;
    bed.start_agents()?;
    measure(&bed, settings, &mut report)?;

    // The mesh: enroll, then fresh agents (memory from the start), enrolled again.
    bed.mesh_enabled = true;
    bed.write_config()?;
    wait_enrolled(&bed)?;
    bed.kill_agent(0);
    bed.kill_agent(1);
    bed.start_agents()?;
    wait_enrolled(&bed)?;
    measure(&bed, settings, &mut report)?;
    Ok(report)
}

/// Writes `target/bench/scale.json` and `target/bench/scale.png`; returns both paths.
pub fn write(report: &ScaleReport) -> anyhow::Result<(PathBuf, PathBuf)> {
    let json = super::write_json("scale.json", report)?;
    let png = super::output_path("scale.png")?;
    plot(report, &png)?;
    Ok((json, png))
}

fn wait_enrolled(bed: &Testbed) -> anyhow::Result<()> {
    bed.agent(0)
        .wait_for_log(&["pod enrolled", "mesh/client"], LOG_WAIT)?;
    bed.agent(1)
        .wait_for_log(&["pod enrolled", "mesh/server-b"], LOG_WAIT)?;
    Ok(())
}

/// Connections node 2's agent (the receiving one) opened towards server-b, per its
/// metrics: how a figure proves it went through the mesh, or did not.
fn meshed_connections(bed: &Testbed) -> anyhow::Result<f64> {
    let text = bed.agent(1).metrics()?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| {
            l.contains("reporter=\"destination\"")
                && l.contains("destination_workload=\"server-b\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Checks that what ran since `before` was (mesh: at least `at_least` connections through
/// the receiving agent) or was not (no mesh: none) carried by the mesh.
fn check_path(bed: &Testbed, what: &str, before: f64, at_least: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + LOG_WAIT;
    loop {
        let seen = meshed_connections(bed)? - before;
        if !bed.mesh_enabled {
            if seen != 0.0 {
                bail!("{what}: {seen} connections went through the mesh in the no-mesh run");
            }
            return Ok(());
        }
        // Counters may lag the data by a copy-loop iteration.
        if seen >= at_least as f64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: only {seen} of at least {at_least} connections went through the \
                 receiving agent"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn measure(
    bed: &Testbed,
    settings: &ScaleSettings,
    report: &mut ScaleReport,
) -> anyhow::Result<()> {
    let mesh = bed.mesh_enabled;
    let label = if mesh { "mesh" } else { "no mesh" };
    let client = bed.pod("client").ns.path();
    let server = bed.pod("server-b");

    for point in &mut report.held {
        let n = point.connections;
        eprintln!("scale: {n} held connections ({label})");
        let before = meshed_connections(bed)?;
        let held = held_load(bed, &client, server.addr(ECHO_PORT), n, settings)?;
        check_path(bed, &format!("{n} held connections"), before, n)?;
        point
            .round_trips_per_sec
            .set(mesh, held.round_trips_per_sec);
        point.p99_ms.set(mesh, held.p99_ms);
        point.agents_cpu_pct.set(mesh, held.agents_cpu_pct);
        point.path_cpu_pct.set(mesh, held.path_cpu_pct);
        point.node1_rss_mib.set(mesh, held.rss_mib[0]);
        point.node2_rss_mib.set(mesh, held.rss_mib[1]);
        point.stalled.set(mesh, held.stalled as f64);
        // Let both agents see the closes before the next point.
        std::thread::sleep(Duration::from_millis(if settings.quick {
            200
        } else {
            1000
        }));
    }

    for point in &mut report.connect {
        eprintln!("scale: new connections, {} clients ({label})", point.x);
        let before = meshed_connections(bed)?;
        let rate = load::connection_rate(
            &client,
            server.addr(APP_PORT),
            Duration::from_secs_f64(settings.connect_secs),
            point.x,
        )?
        .per_sec;
        check_path(bed, &format!("{} clients", point.x), before, 1)?;
        point.value.set(mesh, rate);
    }

    for point in &mut report.bulk {
        eprintln!("scale: bulk, {} streams ({label})", point.x);
        let before = meshed_connections(bed)?;
        let bulk = iperf::run_client(
            &client,
            server.ip,
            IPERF_PORT,
            settings.bulk_secs,
            u32::try_from(point.x)?,
        )?;
        // iperf3's control connection and one per stream.
        check_path(bed, &format!("{} streams", point.x), before, point.x + 1)?;
        point.value.set(mesh, bulk.bits_per_second / 1e9);
    }
    Ok(())
}

/// What one held-connections run measured.
struct Held {
    round_trips_per_sec: f64,
    p99_ms: f64,
    agents_cpu_pct: f64,
    path_cpu_pct: f64,
    rss_mib: [f64; 2],
    stalled: u64,
}

/// Holds `n` connections from `client_netns` to the echo server at `to`, each echoing
/// 1 KiB once per interval, and reads the agents' CPU and RSS over the window.
fn held_load(
    bed: &Testbed,
    client_netns: &Path,
    to: SocketAddr,
    n: usize,
    settings: &ScaleSettings,
) -> anyhow::Result<Held> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (interval, warmup, window) = (settings.message_interval, settings.warmup, settings.window);
    let driver = load::spawn_in_netns(client_netns, move || {
        drive(to, n, interval, warmup, window, ready_tx)
    })?;
    // The driver says when the schedule starts once every connection made a round trip;
    // if it fails first, its error is the one to report.
    let Ok(start) = ready_rx.recv() else {
        return Err(join(driver).err().unwrap_or_else(|| {
            anyhow::anyhow!("the load driver stopped before its connections were open")
        }));
    };
    let pids = [bed.agent(0).pid(), bed.agent(1).pid(), std::process::id()];
    let cpu = || -> anyhow::Result<[f64; 3]> {
        let mut t = [0.0; 3];
        for (t, pid) in t.iter_mut().zip(pids) {
            *t = procfs::cpu_time(pid)?.as_secs_f64();
        }
        Ok(t)
    };
    sleep_until(start + warmup);
    let cpu_before = cpu()?;
    let measured_from = Instant::now();
    sleep_until(start + warmup + window);
    let cpu_after = cpu()?;
    let secs = measured_from.elapsed().as_secs_f64();
    let rss_mib = [
        procfs::rss_bytes(pids[0])? as f64 / MIB,
        procfs::rss_bytes(pids[1])? as f64 / MIB,
    ];
    let outcome = join(driver)?;
    let d = |i: usize| cpu_after[i] - cpu_before[i];
    Ok(Held {
        round_trips_per_sec: outcome.round_trips as f64 / window.as_secs_f64(),
        p99_ms: outcome.p99_ms,
        agents_cpu_pct: (d(0) + d(1)) / secs * 100.0,
        path_cpu_pct: (d(0) + d(1) + d(2)) / secs * 100.0,
        rss_mib,
        stalled: outcome.stalled,
    })
}

fn join<T>(handle: std::thread::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("load driver panicked"))?
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

struct DriveOutcome {
    /// Round trips scheduled inside the window.
    round_trips: u64,
    p99_ms: f64,
    stalled: u64,
}

/// The load, on the calling thread (already in the client's netns): one single-threaded
/// runtime for all the connections, so the load costs little next to the agents.
fn drive(
    to: SocketAddr,
    n: usize,
    interval: Duration,
    warmup: Duration,
    window: Duration,
    ready: mpsc::Sender<Instant>,
) -> anyhow::Result<DriveOutcome> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut conns: Vec<tokio::net::TcpStream> = futures::stream::iter(0..n)
            .map(|i| async move {
                let mut s = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(to))
                    .await
                    .with_context(|| format!("held connection {i}: connecting timed out"))?
                    .with_context(|| format!("held connection {i}: connecting to {to}"))?;
                s.set_nodelay(true)?;
                // One round trip: the connection reaches the server before the schedule.
                echo_once(&mut s)
                    .await
                    .with_context(|| format!("held connection {i}: first round trip"))?;
                anyhow::Ok(s)
            })
            .buffer_unordered(OPENING_AT_ONCE)
            .try_collect()
            .await?;
        let start = Instant::now() + Duration::from_millis(50);
        ready
            .send(start)
            .context("the bench stopped waiting for the load")?;
        let start_at = tokio::time::Instant::from_std(start);
        let (from, end) = (start_at + warmup, start_at + warmup + window);
        let hist = RefCell::new(Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?);
        let counted = Cell::new(0u64);
        let stalled = Cell::new(0u64);
        let per_conn = interval.as_nanos() as u64 / n.max(1) as u64;
        let mut all: futures::stream::FuturesUnordered<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(i, s)| {
                let (hist, counted, stalled) = (&hist, &counted, &stalled);
                async move {
                    let offset = Duration::from_nanos(per_conn * i as u64);
                    let mut ticks = tokio::time::interval_at(start_at + offset, interval);
                    loop {
                        // Missed ticks fire at once, and latency counts from the scheduled
                        // time: a slow path charges every message it delays.
                        let due = ticks.tick().await;
                        if due >= end {
                            return anyhow::Ok(());
                        }
                        match echo_once(s).await {
                            Ok(()) => {}
                            // Counted, and the connection given up (its stream is mid-echo).
                            Err(EchoError::TimedOut) => {
                                stalled.set(stalled.get() + 1);
                                return Ok(());
                            }
                            Err(e) => {
                                return Err(
                                    anyhow::Error::new(e).context(format!("held connection {i}"))
                                );
                            }
                        }
                        if due >= from {
                            hist.borrow_mut()
                                .saturating_record(due.elapsed().as_nanos() as u64);
                            counted.set(counted.get() + 1);
                        }
                    }
                }
            })
            .collect();
        while let Some(result) = all.next().await {
            result?;
        }
        drop(all);
        let hist = hist.into_inner();
        Ok(DriveOutcome {
            round_trips: counted.get(),
            p99_ms: hist.value_at_quantile(0.99) as f64 / 1e6,
            stalled: stalled.get(),
        })
    })
}

#[derive(Debug, thiserror::Error)]
enum EchoError {
    #[error("no echo within {IO_TIMEOUT:?}")]
    TimedOut,
    #[error("echo failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the echo differs from the request")]
    Differs,
}

async fn echo_once(s: &mut tokio::net::TcpStream) -> Result<(), EchoError> {
    let request = [0x5au8; load::MESSAGE];
    let mut response = [0u8; load::MESSAGE];
    tokio::time::timeout(IO_TIMEOUT, async {
        s.write_all(&request).await?;
        s.read_exact(&mut response).await?;
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|_| EchoError::TimedOut)??;
    if response != request {
        return Err(EchoError::Differs);
    }
    Ok(())
}

/// An echo server inside a pod on one single-threaded runtime (the pod app spends a thread
/// per connection, too many for 10,000); stopped on drop.
struct EchoServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl EchoServer {
    fn start(netns: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = load::spawn_in_netns(netns, move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(65_535)?;
            s.set_nonblocking(true)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(s.into())?;
                let accept = async {
                    loop {
                        let Ok((mut conn, _)) = listener.accept().await else {
                            // Out of descriptors or the like: the load reports the failure.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        tokio::spawn(async move {
                            let _ = conn.set_nodelay(true);
                            let (mut r, mut w) = conn.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = accept => {}
                }
                anyhow::Ok(())
            })
        })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Raises this process's RLIMIT_NOFILE (soft and hard) to at least `want` where it may
/// (root with CAP_SYS_RESOURCE), through util-linux's `prlimit` (the test crate has no
/// unsafe code), and returns the soft limit in force. The agents started afterwards
/// inherit it.
fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    let current = ambit_agent::sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    if current >= want {
        return Ok(current);
    }
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={want}:{want}"))
        .output()
        .context("running prlimit (util-linux)")?;
    if !out.status.success() {
        // A container without CAP_SYS_RESOURCE: the caller measures what fits.
        eprintln!(
            "scale: RLIMIT_NOFILE stays {current} ({want} wanted): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    ambit_agent::sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")
}

/// Registers the plot's font once (plotters' ab_glyph backend wants `'static` bytes).
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| {
                format!("reading the plot's font {FONT} (Debian's fonts-dejavu-core; `cargo xtask setup` installs it): {e}")
            })?;
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT} is not a font plotters can read"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// One line of a panel: its legend and points.
struct Line {
    label: String,
    color: plotters::style::RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

fn line(
    label: &str,
    color: plotters::style::RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
) -> Line {
    Line {
        label: label.into(),
        color,
        dashed,
        points,
    }
}

/// The four panels: agents' CPU and RSS against held connections (log x), new
/// connections/s against clients, Gbit/s against streams; mesh solid, no mesh dashed.
fn plot(report: &ScaleReport, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    register_font()?;
    const MESH: RGBColor = RGBColor(200, 40, 40);
    const BASE: RGBColor = RGBColor(40, 80, 200);
    const MESH2: RGBColor = RGBColor(230, 140, 20);
    const BASE2: RGBColor = RGBColor(30, 150, 90);

    let held = |get: fn(&HeldPoint) -> Pair, mesh: bool| -> Vec<(f64, f64)> {
        report
            .held
            .iter()
            .filter_map(|p| {
                let v = get(p);
                Some((
                    p.connections as f64,
                    if mesh { v.mesh? } else { v.no_mesh? },
                ))
            })
            .collect()
    };
    let rate = |points: &[RatePoint], mesh: bool| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter_map(|p| {
                Some((
                    p.x as f64,
                    if mesh {
                        p.value.mesh?
                    } else {
                        p.value.no_mesh?
                    },
                ))
            })
            .collect()
    };

    let root = BitMapBackend::new(path, (1600, 1200)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = root
        .titled(
            &format!(
                "ambit scale curves, cross-node, mesh vs no mesh ({})",
                if report.settings.quick {
                    "quick run"
                } else {
                    "full run"
                }
            ),
            ("sans-serif", 30),
        )
        .map_err(plot_error)?;
    let panels = root.split_evenly((2, 2));
    let interval = report.settings.message_interval;
    panel(
        &panels[0],
        &format!("Agents' CPU, held connections each echoing 1 KiB every {interval:?}"),
        "held connections",
        "CPU, % of one core (both agents)",
        &[
            line("mesh", MESH, false, held(|p| p.agents_cpu_pct, true)),
            line("no mesh", BASE, true, held(|p| p.agents_cpu_pct, false)),
            line(
                "mesh: agents + load",
                MESH2,
                false,
                held(|p| p.path_cpu_pct, true),
            ),
            line(
                "no mesh: agents + load",
                BASE2,
                true,
                held(|p| p.path_cpu_pct, false),
            ),
        ],
    )?;
    panel(
        &panels[1],
        "Agents' RSS with the held connections",
        "held connections",
        "RSS (MiB)",
        &[
            line(
                "mesh: node 1 agent",
                MESH,
                false,
                held(|p| p.node1_rss_mib, true),
            ),
            line(
                "mesh: node 2 agent",
                MESH2,
                false,
                held(|p| p.node2_rss_mib, true),
            ),
            line(
                "no mesh: node 1 agent",
                BASE,
                true,
                held(|p| p.node1_rss_mib, false),
            ),
            line(
                "no mesh: node 2 agent",
                BASE2,
                true,
                held(|p| p.node2_rss_mib, false),
            ),
        ],
    )?;
    panel(
        &panels[2],
        "New connections/s (64 B echo each, pooled HBONE)",
        "concurrent clients",
        "connections/s",
        &[
            line("mesh", MESH, false, rate(&report.connect, true)),
            line("no mesh", BASE, true, rate(&report.connect, false)),
        ],
    )?;
    panel(
        &panels[3],
        "Bulk throughput (iperf3)",
        "parallel streams",
        "Gbit/s",
        &[
            line("mesh", MESH, false, rate(&report.bulk, true)),
            line("no mesh", BASE, true, rate(&report.bulk, false)),
        ],
    )?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the scale plot: {e}")
}

fn panel<DB: plotters::prelude::DrawingBackend>(
    area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Line],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (x_min, x_max) = xs.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if x_min > x_max {
        bail!("no points for the panel {title:?}");
    }
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let y_range = 0.0..(y_max * 1.15).max(1e-3);
    let mut chart = ChartBuilder::on(area);
    chart
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    let x_range = (x_min * 0.8).max(0.5)..x_max * 1.25;
    // Every curve's x grows geometrically: log x.
    let mut chart = chart
        .build_cartesian_2d(x_range.log_scale(), y_range)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| super::fmt(*y))
        .light_line_style(TRANSPARENT)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(plot_error)?;
    for l in lines {
        let color = l.color;
        let style = color.stroke_width(3);
        if l.dashed {
            chart
                .draw_series(DashedLineSeries::new(
                    l.points.iter().copied(),
                    10,
                    6,
                    style,
                ))
                .map_err(plot_error)?
                .label(l.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
        } else {
            chart
                .draw_series(LineSeries::new(l.points.iter().copied(), style))
                .map_err(plot_error)?
                .label(l.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
        }
        chart
            .draw_series(l.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// Checks that `path` is a whole, decodable PNG of a plausible size (the quick run's check
/// that the plot was written).
pub fn check_png(path: &Path) -> anyhow::Result<(u32, u32)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{} is not a PNG", path.display()))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{}: the image data does not decode", path.display()))?;
    if info.width < 800 || info.height < 600 {
        bail!(
            "{}: {}×{} is too small for the plot",
            path.display(),
            info.width,
            info.height
        );
    }
    // A blank image means nothing was drawn.
    let pixels = &buf[..info.buffer_size()];
    let first = &pixels[..3.min(pixels.len())];
    if pixels.chunks(3).all(|p| p == first) {
        bail!("{}: every pixel is the same colour", path.display());
    }
    Ok((info.width, info.height))
}
