//! The data path never waits on the control plane: connection latency through the mesh,
//! measured while the client's agent is quiet, while it enrolls and unenrolls other pods
//! in a loop, and while its `/metrics` and `/config_dump` are scraped 20 times a second
//! each (300 times Prometheus's default rate).
//! Each figure is compared with the quiet phase of the same run (same agents, same pods,
//! same held connections), so only the control-plane activity differs.
//!
//! Pods: `client` and the churn pods on node 1, `server` on node 2, all in the mesh
//! namespace. The churn pods are enrolled and unenrolled by toggling their pod-level
//! opt-out label (`ambit.dev/mesh: disabled`) in the local-mode file the agents watch.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{load, procfs};
use crate::testbed::{APP_PORT, MESH_NS, PodSpec, Testbed};

const HOLD_PORT: u16 = 9090;
const WAIT: Duration = Duration::from_secs(30);
/// The churn pods (at most this many).
const CHURN_PODS: [&str; 8] = [
    "churn-1", "churn-2", "churn-3", "churn-4", "churn-5", "churn-6", "churn-7", "churn-8",
];
/// Between two writes of the churn loop: more than the agents' reload interval (100 ms in
/// the testbed) plus the watcher's settle time (200 ms), so every write is applied.
const CHURN_PAUSE: Duration = Duration::from_millis(350);

#[derive(Clone, Debug, Serialize)]
pub struct ControlPlaneSettings {
    pub quick: bool,
    /// Seconds of each phase: half new connections, half round trips.
    pub phase_secs: u64,
    /// Pods on the client's node enrolled and unenrolled together, in a loop.
    pub churn_pods: usize,
    /// Idle proxied connections held open through every phase (work for the scrapes).
    pub held_connections: usize,
    /// Scrapes of `/metrics` and of `/config_dump` per second, each (paced). Prometheus
    /// scrapes every 15 s by default: 20/s is 300 times that. A flat-out loop on this
    /// 2-core machine measures CPU contention between the scraper and the agent, not
    /// whether the data path waits on a scrape.
    pub scrapes_per_sec: u32,
    /// Requests per second of the 1 KiB round trips.
    pub fixed_rate: u32,
}

impl ControlPlaneSettings {
    pub fn full() -> Self {
        Self {
            quick: false,
            phase_secs: 10,
            churn_pods: 8,
            held_connections: 2_000,
            scrapes_per_sec: 20,
            fixed_rate: 1000,
        }
    }

    /// A smoke run: every figure, about 10 s.
    pub fn quick() -> Self {
        Self {
            quick: true,
            phase_secs: 2,
            churn_pods: 2,
            held_connections: 100,
            scrapes_per_sec: 20,
            fixed_rate: 1000,
        }
    }
}

/// What the client's agent was doing during a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activity {
    Quiet,
    EnrollingPods,
    Scraping,
}

/// Latency percentiles of one phase, microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub activity: Activity,
    pub connect_p50_us: Option<f64>,
    pub connect_p99_us: Option<f64>,
    pub connections: u64,
    pub round_trip_p50_us: Option<f64>,
    pub round_trip_p99_us: Option<f64>,
    /// Churn pods' "pod enrolled" and "pod unenrolled" log lines of the client's agent
    /// during the phase.
    pub enrollment_changes: u64,
    /// Completed scrapes (`/metrics` and `/config_dump` each count one).
    pub scrapes: u64,
    /// CPU of the client's agent over the phase, percent of one core: tells CPU contention
    /// (the machine has few cores) from waiting.
    pub agent_cpu_percent: f64,
}

/// One figure in the three phases, with the loaded phases against the quiet one.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub figure: String,
    pub quiet: Option<f64>,
    pub enrolling: Option<f64>,
    pub scraping: Option<f64>,
    pub enrolling_ratio: Option<f64>,
    pub scraping_ratio: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ControlPlaneReport {
    pub settings: ControlPlaneSettings,
    pub agent_binary: PathBuf,
    pub machine: String,
    pub phases: Vec<Phase>,
    pub rows: Vec<Row>,
}

impl ControlPlaneReport {
    /// Figures that should have a value and do not, and phases that did not do their
    /// activity (the quick test insists on none).
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for r in &self.rows {
            for (phase, v) in [
                ("quiet", r.quiet),
                ("enrolling", r.enrolling),
                ("scraping", r.scraping),
                ("enrolling / quiet", r.enrolling_ratio),
                ("scraping / quiet", r.scraping_ratio),
            ] {
                if !v.is_some_and(f64::is_finite) {
                    missing.push(format!("{} ({phase})", r.figure));
                }
            }
        }
        for p in &self.phases {
            if p.activity == Activity::EnrollingPods && p.enrollment_changes == 0 {
                missing.push("no pod enrolled or unenrolled in the enrolling phase".into());
            }
            if p.activity == Activity::Scraping && p.scrapes == 0 {
                missing.push("no scrape in the scraping phase".into());
            }
        }
        missing
    }

    pub fn markdown(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("{v:.0}"));
        let r = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("{v:.2}"));
        let mut s = String::from(
            "| figure (cross-node, mesh) | quiet | enrolling pods | scraping | enrolling / quiet | scraping / quiet |\n\
             | --- | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for row in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                row.figure,
                f(row.quiet),
                f(row.enrolling),
                f(row.scraping),
                r(row.enrolling_ratio),
                r(row.scraping_ratio),
            ));
        }
        let of = |a: Activity| self.phases.iter().find(|p| p.activity == a);
        s.push_str(&format!(
            "| client's agent CPU (% of a core) | {} | {} | {} | | |\n",
            f(of(Activity::Quiet).map(|p| p.agent_cpu_percent)),
            f(of(Activity::EnrollingPods).map(|p| p.agent_cpu_percent)),
            f(of(Activity::Scraping).map(|p| p.agent_cpu_percent)),
        ));
        s.push_str(&format!(
            "\n{} s per phase; {} connections held open; enrolling phase: {} churn pods, {} \
             enrollments and unenrollments; scraping phase: {} scrapes of /metrics and \
             /config_dump (paced at {}/s each).\n",
            self.settings.phase_secs,
            self.settings.held_connections,
            self.settings.churn_pods,
            of(Activity::EnrollingPods).map_or(0, |p| p.enrollment_changes),
            of(Activity::Scraping).map_or(0, |p| p.scrapes),
            self.settings.scrapes_per_sec,
        ));
        s
    }
}

/// Writes `target/bench/control-plane.json`.
pub fn write(report: &ControlPlaneReport) -> anyhow::Result<PathBuf> {
    super::write_json("control-plane.json", report)
}

/// Runs the three phases and returns the report.
pub fn run(settings: &ControlPlaneSettings) -> anyhow::Result<ControlPlaneReport> {
    anyhow::ensure!(
        (1..=CHURN_PODS.len()).contains(&settings.churn_pods),
        "churn_pods must be 1..={}",
        CHURN_PODS.len()
    );
    ambit_agent::sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let agent_binary = crate::testbed::agent_binary()?;
    let churn = &CHURN_PODS[..settings.churn_pods];
    let mut pods = vec![
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server", MESH_NS, 1),
    ];
    for name in churn {
        let mut pod = PodSpec::new(name, MESH_NS, 0);
        pod.labels.push((
            ambit_agent::config::MESH_LABEL,
            ambit_agent::config::MESH_DISABLED,
        ));
        pods.push(pod);
    }
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    super::tune_for_many_connections(&bed)?;
    // The two versions of the file the churn loop alternates: churn pods opted out (as
    // built) and opted in.
    let churn_off = std::fs::read_to_string(&bed.config)?;
    for pod in bed.pods.iter_mut().filter(|p| churn.contains(&p.spec.name)) {
        pod.spec
            .labels
            .retain(|(k, _)| *k != ambit_agent::config::MESH_LABEL);
    }
    bed.write_config()?;
    let churn_on = std::fs::read_to_string(&bed.config)?;
    write_atomically(&bed.config, &churn_off)?;
    anyhow::ensure!(churn_on != churn_off, "the churn label changes nothing");

    bed.start_agents()?;
    bed.agent(0)
        .wait_for_log(&["pod enrolled", "mesh/client"], WAIT)?;
    bed.agent(1)
        .wait_for_log(&["pod enrolled", "mesh/server"], WAIT)?;
    let client_ns = bed.pod("client").ns.path();
    let server = bed.pod("server");
    let app = server.addr(APP_PORT);
    // Through both agents: the server's agent logs the inbound connection.
    let reply = bed.pod("client").request(app, b"control-plane")?;
    anyhow::ensure!(
        reply.ends_with("control-plane"),
        "unexpected reply {reply:?}"
    );
    bed.agent(1)
        .wait_for_log(&["inbound connection closed", &server.identity()], WAIT)?;

    let holder = load::Holder::start(&server.ns.path(), server.addr(HOLD_PORT))?;
    let held = load::open_idle(&client_ns, holder.addr, settings.held_connections)?;
    holder.wait_queued(settings.held_connections, Duration::from_secs(60))?;

    let half = Duration::from_secs(settings.phase_secs).max(Duration::from_secs(2)) / 2;
    let agent = bed.agent(0);
    let mut phases = Vec::new();
    for activity in [Activity::Quiet, Activity::EnrollingPods, Activity::Scraping] {
        eprintln!("bench: control plane, {activity:?}");
        let stop = AtomicBool::new(false);
        let count = |parts: &[&str]| {
            agent
                .logs()
                .iter()
                .filter(|l| parts.iter().all(|p| l.contains(p)))
                .count() as u64
        };
        let churn_before =
            count(&["pod enrolled", "mesh/churn-"]) + count(&["pod unenrolled", "mesh/churn-"]);
        let scrapes = AtomicU64::new(0);
        let cpu_before = procfs::cpu_time(agent.pid())?;
        let phase_started = Instant::now();
        let (connect, round_trips) =
            std::thread::scope(|s| -> anyhow::Result<_> {
                let background: Vec<std::thread::ScopedJoinHandle<'_, anyhow::Result<()>>> =
                    match activity {
                        Activity::Quiet => Vec::new(),
                        Activity::EnrollingPods => {
                            vec![s.spawn(|| churn_loop(&bed.config, &churn_on, &churn_off, &stop))]
                        }
                        Activity::Scraping => vec![s.spawn(|| {
                            scrape_loop(agent, settings.scrapes_per_sec, &stop, &scrapes)
                        })],
                    };
                let measured = connect_latency(&client_ns, app, half).and_then(|connect| {
                    Ok((
                        connect,
                        load::round_trips(&client_ns, app, half, Some(settings.fixed_rate))?,
                    ))
                });
                stop.store(true, Ordering::Relaxed);
                for handle in background {
                    handle
                        .join()
                        .map_err(|_| anyhow::anyhow!("background thread panicked"))??;
                }
                measured
            })?;
        let agent_cpu_percent = 100.0 * (procfs::cpu_time(agent.pid())? - cpu_before).as_secs_f64()
            / phase_started.elapsed().as_secs_f64();
        if activity == Activity::EnrollingPods {
            // Back to the starting point before the next phase: every churn pod that was
            // enrolled is unenrolled again, and nothing has changed for a second (enrolling
            // a pod takes a while, so the last writes may still be in flight).
            let deadline = Instant::now() + WAIT;
            let mut last = (u64::MAX, u64::MAX);
            let mut steady_since = Instant::now();
            loop {
                let now = (
                    count(&["pod enrolled", "mesh/churn-"]),
                    count(&["pod unenrolled", "mesh/churn-"]),
                );
                if now != last {
                    last = now;
                    steady_since = Instant::now();
                } else if now.0 == now.1 && steady_since.elapsed() >= Duration::from_secs(1) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "churn pods still changing after {WAIT:?}: {now:?} (enrolled, unenrolled)"
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let churn_after =
            count(&["pod enrolled", "mesh/churn-"]) + count(&["pod unenrolled", "mesh/churn-"]);
        phases.push(Phase {
            activity,
            connect_p50_us: Some(connect.p50_us),
            connect_p99_us: Some(connect.p99_us),
            connections: connect.count,
            round_trip_p50_us: Some(round_trips.p50_us),
            round_trip_p99_us: Some(round_trips.p99_us),
            enrollment_changes: churn_after - churn_before,
            scrapes: scrapes.load(Ordering::Relaxed),
            agent_cpu_percent,
        });
    }
    drop(held);
    holder.release();

    let rate = settings.fixed_rate;
    let rows = vec![
        row(
            "new connection: connect + 64 B request/response + close, p50 (µs)",
            &phases,
            |p| p.connect_p50_us,
        ),
        row(
            "new connection: connect + 64 B request/response + close, p99 (µs)",
            &phases,
            |p| p.connect_p99_us,
        ),
        row(
            &format!("1 KiB round trip at {rate}/s on an open connection, p50 (µs)"),
            &phases,
            |p| p.round_trip_p50_us,
        ),
        row(
            &format!("1 KiB round trip at {rate}/s on an open connection, p99 (µs)"),
            &phases,
            |p| p.round_trip_p99_us,
        ),
    ];
    Ok(ControlPlaneReport {
        settings: settings.clone(),
        agent_binary,
        machine: super::machine(),
        phases,
        rows,
    })
}

fn row(figure: &str, phases: &[Phase], get: impl Fn(&Phase) -> Option<f64>) -> Row {
    let of = |a: Activity| phases.iter().find(|p| p.activity == a).and_then(&get);
    let quiet = of(Activity::Quiet);
    let ratio = |v: Option<f64>| match (v, quiet) {
        (Some(v), Some(q)) if q > 0.0 => Some(v / q),
        _ => None,
    };
    let enrolling = of(Activity::EnrollingPods);
    let scraping = of(Activity::Scraping);
    Row {
        figure: figure.to_owned(),
        quiet,
        enrolling,
        scraping,
        enrolling_ratio: ratio(enrolling),
        scraping_ratio: ratio(scraping),
    }
}

/// Replaces the file the agents watch in one step (they never read half of it).
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("churn.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Alternates the churn pods between opted in and opted out until `stop`, and leaves them
/// opted out.
fn churn_loop(config: &Path, on: &str, off: &str, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut enrolled = false;
    while !stop.load(Ordering::Relaxed) {
        enrolled = !enrolled;
        write_atomically(config, if enrolled { on } else { off })?;
        std::thread::sleep(CHURN_PAUSE);
    }
    write_atomically(config, off)
}

/// Scrapes the agent's `/metrics` and `/config_dump`, `per_sec` pairs a second, until `stop`.
fn scrape_loop(
    agent: &crate::testbed::Agent,
    per_sec: u32,
    stop: &AtomicBool,
    scrapes: &AtomicU64,
) -> anyhow::Result<()> {
    let interval = Duration::from_secs(1) / per_sec.max(1);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        next += interval;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let metrics = agent.metrics().context("scraping /metrics")?;
        anyhow::ensure!(!metrics.is_empty(), "empty /metrics");
        let dump = agent.admin_get("/config_dump").context("/config_dump")?;
        anyhow::ensure!(dump.contains("\"workloads\""), "no workloads in the dump");
        scrapes.fetch_add(2, Ordering::Relaxed);
    }
    Ok(())
}

struct ConnectLatency {
    p50_us: f64,
    p99_us: f64,
    count: u64,
}

/// One connection at a time for `duration`: connect, send 64 bytes, half-close, read the
/// greeting and echo to the end, close; each timed from before the connect to the end.
fn connect_latency(
    client_netns: &Path,
    to: SocketAddr,
    duration: Duration,
) -> anyhow::Result<ConnectLatency> {
    let handle = load::spawn_in_netns(client_netns, move || {
        let payload = [0x42u8; 64];
        let mut reply = Vec::with_capacity(256);
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            let t0 = Instant::now();
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .with_context(|| format!("connecting to {to}"))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(&payload)?;
            s.shutdown(Shutdown::Write)?;
            reply.clear();
            s.read_to_end(&mut reply)?;
            drop(s);
            hist.saturating_record(t0.elapsed().as_nanos() as u64);
            if !reply.ends_with(&payload) {
                bail!("connection to {to}: short reply ({} bytes)", reply.len());
            }
        }
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        Ok(ConnectLatency {
            p50_us: us(0.50),
            p99_us: us(0.99),
            count: hist.len(),
        })
    })?;
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
}
