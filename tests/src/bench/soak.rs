//! The soak: many proxied connections held open while new ones arrive at a steady, paced
//! rate and the workload certificates rotate; then every held connection must still carry
//! bytes both ways, and both agents must give back the descriptors and memory the load took.
//!
//! Two nodes, mesh on: `client` on node 1 dials `server` on node 2 (cross-node, through both
//! agents). The held connections end in a [`load::Holder`], which accepts only at the end:
//! the bench process then holds one descriptor per held connection instead of two (the hard
//! RLIMIT_NOFILE may be 20,000, which both ends of 10,000 connections would exhaust). The
//! new connections go to the pod's echo app.

use std::io::{self, BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{load, procfs};
use crate::testbed::{APP_PORT, MESH_NS, PodSpec, Testbed};

const HOLD_PORT: u16 = 9090;
const LOG_WAIT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the held connections' answers may take, all together.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: f64 = 1024.0 * 1024.0;
/// What the agents log on each successful background renewal.
const RENEWED: &str = "renewed workload certificate";
/// Error details kept per error list (the counts are complete; the examples explain them).
const EXAMPLES: usize = 10;

#[derive(Clone, Debug, Serialize)]
pub struct SoakSettings {
    pub quick: bool,
    /// Proxied connections held open through the load.
    pub held: usize,
    /// New connections per second (connect, 64-byte echo, close), paced.
    pub new_per_sec: u32,
    /// How long the new connections arrive.
    pub load_secs: u64,
    /// The agents' `--cert-ttl-secs`: certificates are renewed at half life.
    pub cert_ttl_secs: u64,
    /// When the "after" figures are read, counted from the held connections' close.
    pub after_secs: u64,
}

impl SoakSettings {
    /// 10,000 held, 1,000 new/s for 60 s, a renewal every 10 s, figures 30 s after.
    pub fn full() -> Self {
        Self {
            quick: false,
            held: 10_000,
            new_per_sec: 1_000,
            load_secs: 60,
            cert_ttl_secs: 20,
            after_secs: 30,
        }
    }

    /// A smoke run (about 15 s): every figure, at least one renewal under load.
    pub fn quick() -> Self {
        Self {
            quick: true,
            held: 200,
            new_per_sec: 100,
            load_secs: 5,
            cert_ttl_secs: 4,
            after_secs: 2,
        }
    }
}

/// How a connection failed.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// connect() failed (refused, unreachable, …).
    Connect,
    /// Reset or aborted by the other side (ECONNRESET, EPIPE, ECONNABORTED).
    Reset,
    /// Bytes missing, extra or different, or the connection ended early.
    WrongReply,
    /// No answer in time (connect or exchange).
    Timeout,
}

/// Failures by kind, with the first few explained.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Errors {
    pub connect: u64,
    pub reset: u64,
    pub wrong_reply: u64,
    pub timeout: u64,
    pub examples: Vec<String>,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.connect + self.reset + self.wrong_reply + self.timeout
    }

    fn add(&mut self, kind: Kind, detail: String) {
        match kind {
            Kind::Connect => self.connect += 1,
            Kind::Reset => self.reset += 1,
            Kind::WrongReply => self.wrong_reply += 1,
            Kind::Timeout => self.timeout += 1,
        }
        if self.examples.len() < EXAMPLES {
            self.examples.push(format!("{kind:?}: {detail}"));
        }
    }

    fn add_io(&mut self, what: &str, e: &io::Error) {
        self.add(exchange_kind(e), format!("{what}: {e}"));
    }
}

/// The kind of an error met after the connection was established.
fn exchange_kind(e: &io::Error) -> Kind {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Kind::Reset,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Kind::Timeout,
        _ => Kind::WrongReply,
    }
}

/// One agent's figures.
#[derive(Clone, Debug, Serialize)]
pub struct AgentFigures {
    pub agent: String,
    pub fds_before: usize,
    pub fds_max: usize,
    pub fds_after: usize,
    pub rss_before_mib: f64,
    pub rss_max_mib: f64,
    pub rss_after_mib: f64,
    pub fds_after_over_before: f64,
    pub rss_after_over_before: f64,
    /// Background renewals logged while the new connections arrived, and over the run.
    pub renewals_during_load: usize,
    pub renewals_total: usize,
    /// WARN and ERROR lines logged from the held connections' opening to the end.
    pub warnings: usize,
    pub warning_examples: Vec<String>,
}

/// Both agents' descriptors and memory at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub t_secs: f64,
    pub phase: &'static str,
    pub fds: [usize; 2],
    pub rss_mib: [f64; 2],
    /// The bench process's own descriptors (the client ends and the pod apps' sockets).
    pub bench_fds: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub settings: SoakSettings,
    pub agent_binary: PathBuf,
    pub machine: String,
    pub nofile_limit: u64,
    pub held_opened: usize,
    /// Held connections that answered correctly at the end.
    pub held_verified: usize,
    /// Trickle writes (5 bytes, one held connection in ten each second) during the load.
    pub held_pings: u64,
    pub held_errors: Errors,
    pub new_attempted: u64,
    pub new_ok: u64,
    pub new_per_sec_achieved: f64,
    pub new_p50_ms: Option<f64>,
    pub new_p99_ms: Option<f64>,
    pub new_max_ms: Option<f64>,
    pub new_errors: Errors,
    pub agents: Vec<AgentFigures>,
    /// One sample a second, from the held connections' opening to the "after" figure.
    pub samples: Vec<Sample>,
    /// Samples that could not be read, and why.
    pub sample_failures: Vec<String>,
    /// The most new connections in progress at once.
    pub new_max_in_flight: usize,
}

impl SoakReport {
    pub fn errors(&self) -> u64 {
        self.held_errors.total() + self.new_errors.total()
    }

    /// Figures that should have a value and do not (the quick test insists on none).
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if self.agents.len() != 2 {
            missing.push(format!("figures of 2 agents (got {})", self.agents.len()));
        }
        for a in &self.agents {
            if a.fds_before == 0 || a.fds_max == 0 || a.fds_after == 0 {
                missing.push(format!("{}: open descriptors", a.agent));
            }
            if !(a.rss_before_mib > 0.0 && a.rss_max_mib > 0.0 && a.rss_after_mib > 0.0) {
                missing.push(format!("{}: RSS", a.agent));
            }
            if a.renewals_during_load == 0 {
                missing.push(format!(
                    "{}: a certificate renewal during the load",
                    a.agent
                ));
            }
        }
        if self.new_p99_ms.is_none() {
            missing.push("new-connection times".into());
        }
        if self.held_opened != self.settings.held {
            missing.push(format!(
                "{} held connections (opened {})",
                self.settings.held, self.held_opened
            ));
        }
        if self.samples.is_empty() || !self.sample_failures.is_empty() {
            missing.push(format!(
                "samples during the load ({} lost: {:?})",
                self.sample_failures.len(),
                self.sample_failures.first()
            ));
        }
        missing
    }

    /// The aims: no error, descriptors and memory back within 5 % of the start.
    pub fn aims(&self) -> Vec<(String, String, bool)> {
        let worst =
            |f: &dyn Fn(&AgentFigures) -> f64| self.agents.iter().map(f).fold(0.0_f64, f64::max);
        let fds = worst(&|a| a.fds_after_over_before);
        let rss = worst(&|a| a.rss_after_over_before);
        vec![
            (
                "errors (held and new connections) = 0".into(),
                self.errors().to_string(),
                self.errors() == 0,
            ),
            (
                format!(
                    "open FDs {} s after / before (larger of the two agents) ≤ 1.05",
                    self.settings.after_secs
                ),
                format!("{fds:.3}"),
                fds <= 1.05,
            ),
            (
                format!(
                    "RSS {} s after / before (larger of the two agents) ≤ 1.05",
                    self.settings.after_secs
                ),
                format!("{rss:.3}"),
                rss <= 1.05,
            ),
        ]
    }

    pub fn markdown(&self) -> String {
        let s = &self.settings;
        let ms = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.1} ms"));
        let mut out = format!(
            "{} held + {}/s new connections for {} s, cross-node through both agents; \
             certificate TTL {} s (renewed at half life).\n\n\
             | errors | new connections | held connections |\n| --- | ---: | ---: |\n",
            s.held, s.new_per_sec, s.load_secs, s.cert_ttl_secs
        );
        for (kind, n, h) in [
            ("connect", self.new_errors.connect, self.held_errors.connect),
            ("reset", self.new_errors.reset, self.held_errors.reset),
            (
                "wrong reply",
                self.new_errors.wrong_reply,
                self.held_errors.wrong_reply,
            ),
            ("timeout", self.new_errors.timeout, self.held_errors.timeout),
        ] {
            out.push_str(&format!("| {kind} | {n} | {h} |\n"));
        }
        out.push_str(&format!(
            "| **total** | **{}** | **{}** |\n\
             | connections | {} of {} answered ({:.0}/s; p50 {}, p99 {}, max {}; at most {} in flight) | {} of {} alive and intact at the end ({} trickle writes) |\n\n",
            self.new_errors.total(),
            self.held_errors.total(),
            self.new_ok,
            self.new_attempted,
            self.new_per_sec_achieved,
            ms(self.new_p50_ms),
            ms(self.new_p99_ms),
            ms(self.new_max_ms),
            self.new_max_in_flight,
            self.held_verified,
            self.held_opened,
            self.held_pings,
        ));
        out.push_str(&format!(
            "| agent | open FDs before | max | {a} s after | after / before | RSS before (MiB) | max | {a} s after | after / before | renewals during load |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            a = s.after_secs
        ));
        for a in &self.agents {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.3} | {:.1} | {:.1} | {:.1} | {:.3} | {} |\n",
                a.agent,
                a.fds_before,
                a.fds_max,
                a.fds_after,
                a.fds_after_over_before,
                a.rss_before_mib,
                a.rss_max_mib,
                a.rss_after_mib,
                a.rss_after_over_before,
                a.renewals_during_load,
            ));
        }
        out.push_str("\n| aim | measured | met |\n| --- | ---: | :---: |\n");
        for (aim, value, met) in self.aims() {
            out.push_str(&format!(
                "| {aim} | {value} | {} |\n",
                if met { "yes" } else { "**no**" }
            ));
        }
        for (what, errors) in [("new", &self.new_errors), ("held", &self.held_errors)] {
            for e in &errors.examples {
                out.push_str(&format!("\n{what}: {e}"));
            }
        }
        for a in &self.agents {
            for w in &a.warning_examples {
                out.push_str(&format!("\n{}: {w}", a.agent));
            }
        }
        out
    }
}

/// Runs the soak and returns the report (written by [`write`]).
pub fn run(settings: &SoakSettings) -> anyhow::Result<SoakReport> {
    // The client ends of the held connections live in this process; the agents inherit
    // the limit (and raise theirs the same way).
    let nofile = ambit_agent::sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let needed = settings.held + 2_000;
    anyhow::ensure!(
        usize::try_from(nofile).unwrap_or(usize::MAX) >= needed,
        "RLIMIT_NOFILE is {nofile}: {} held connections need at least {needed}",
        settings.held
    );
    let agent_binary = crate::testbed::agent_binary()?;
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server", MESH_NS, 1),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    super::tune_for_many_connections(&bed)?;
    let client_ns = bed.pod("client").ns.path();
    let server = bed.pod("server");
    let holder = load::Holder::start(&server.ns.path(), server.addr(HOLD_PORT))?;
    let app = server.addr(APP_PORT);
    bed.agent_args = vec!["--cert-ttl-secs".into(), settings.cert_ttl_secs.to_string()];
    bed.start_agents()?;
    for (agent, pod) in [(0, "mesh/client"), (1, "mesh/server")] {
        bed.agent(agent)
            .wait_for_log(&["pod enrolled", pod], LOG_WAIT)?;
    }
    let pids = [bed.agent(0).pid(), bed.agent(1).pid()];

    // Warm-up: certificates issued, the HBONE pool up, one second of the new-connection
    // load; it must be clean, or the soak would measure a broken mesh.
    check_meshed(&bed, app)?;
    let warm = churn(
        &client_ns,
        app,
        settings.new_per_sec,
        Duration::from_secs(1),
    )?;
    anyhow::ensure!(
        warm.errors.total() == 0,
        "the warm-up already failed: {:?}",
        warm.errors
    );
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let before = sample(pids, t0, "before")?;
    let logs_from = [bed.agent(0).logs().len(), bed.agent(1).logs().len()];
    eprintln!(
        "soak: before: FDs {:?}, RSS {:.1?} MiB; opening {} held connections",
        before.fds, before.rss_mib, settings.held
    );

    let sampler = Sampler::start(pids, t0);
    let held = load::open_idle(&client_ns, holder.addr, settings.held)
        .context("opening the held connections")?;
    holder.wait_queued(settings.held, Duration::from_secs(120))?;
    let held_opened = held.len();
    let renewals_at_start = [renewals(&bed, 0), renewals(&bed, 1)];

    sampler.phase("load");
    eprintln!(
        "soak: load: {}/s new connections for {} s",
        settings.new_per_sec, settings.load_secs
    );
    let trickle = Trickle::start(held);
    let load = churn(
        &client_ns,
        app,
        settings.new_per_sec,
        Duration::from_secs(settings.load_secs),
    )?;
    let (held, pings, mut held_errors, dead) = trickle.stop()?;
    let renewals_at_end = [renewals(&bed, 0), renewals(&bed, 1)];

    sampler.phase("verify");
    let held_verified = verify_held(&held, &pings, &dead, &holder, &mut held_errors)?;
    drop(held);
    holder.release();
    let closed = Instant::now();

    sampler.phase("after");
    eprintln!(
        "soak: held connections closed; figures in {} s",
        settings.after_secs
    );
    std::thread::sleep(Duration::from_secs(settings.after_secs).saturating_sub(closed.elapsed()));
    let after = sample(pids, t0, "after")?;
    let (mut samples, sample_failures) = sampler.stop()?;
    samples.insert(0, before.clone());
    samples.push(after.clone());

    let mut agents = Vec::new();
    for (i, name) in ["node 1 (client side)", "node 2 (server side)"]
        .into_iter()
        .enumerate()
    {
        let during = samples
            .iter()
            .filter(|s| s.phase != "before" && s.phase != "after");
        let fds_max = during.clone().map(|s| s.fds[i]).max().unwrap_or(0);
        let rss_max = during.map(|s| s.rss_mib[i]).fold(0.0_f64, f64::max);
        let logs = bed.agent(i).logs();
        let warnings: Vec<&String> = logs
            .get(logs_from[i]..)
            .unwrap_or_default()
            .iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        agents.push(AgentFigures {
            agent: name.into(),
            fds_before: before.fds[i],
            fds_max,
            fds_after: after.fds[i],
            rss_before_mib: before.rss_mib[i],
            rss_max_mib: rss_max,
            rss_after_mib: after.rss_mib[i],
            fds_after_over_before: after.fds[i] as f64 / before.fds[i].max(1) as f64,
            rss_after_over_before: after.rss_mib[i] / before.rss_mib[i].max(f64::MIN_POSITIVE),
            renewals_during_load: renewals_at_end[i] - renewals_at_start[i],
            renewals_total: renewals(&bed, i),
            warnings: warnings.len(),
            warning_examples: warnings
                .iter()
                .take(EXAMPLES)
                .map(|l| l.to_string())
                .collect(),
        });
    }

    Ok(SoakReport {
        settings: settings.clone(),
        agent_binary,
        machine: super::machine(),
        nofile_limit: nofile,
        held_opened,
        held_verified,
        held_pings: pings.iter().map(|&p| u64::from(p)).sum(),
        held_errors,
        new_attempted: load.attempted,
        new_ok: load.ok,
        new_per_sec_achieved: load.attempted as f64 / load.launch_secs.max(f64::MIN_POSITIVE),
        new_p50_ms: load.quantile_ms(0.50),
        new_p99_ms: load.quantile_ms(0.99),
        new_max_ms: load.quantile_ms(1.0),
        new_errors: load.errors,
        agents,
        samples,
        sample_failures,
        new_max_in_flight: load.max_in_flight,
    })
}

/// Writes `target/bench/soak.json`.
pub fn write(report: &SoakReport) -> anyhow::Result<PathBuf> {
    super::write_json("soak.json", report)
}

/// Background renewals node `i`'s agent has logged so far.
fn renewals(bed: &Testbed, i: usize) -> usize {
    bed.agent(i)
        .logs()
        .iter()
        .filter(|l| l.contains(RENEWED))
        .count()
}

/// One request that the receiving agent logs, so the load really goes through the mesh.
fn check_meshed(bed: &Testbed, app: SocketAddr) -> anyhow::Result<()> {
    let reply = bed.pod("client").request(app, b"soak")?;
    anyhow::ensure!(reply.ends_with("soak"), "unexpected reply {reply:?}");
    bed.agent(1).wait_for_log(
        &["inbound connection closed", &bed.pod("server").identity()],
        LOG_WAIT,
    )?;
    Ok(())
}

fn sample(pids: [u32; 2], t0: Instant, phase: &'static str) -> anyhow::Result<Sample> {
    Ok(Sample {
        t_secs: t0.elapsed().as_secs_f64(),
        phase,
        fds: [procfs::open_fds(pids[0])?, procfs::open_fds(pids[1])?],
        bench_fds: procfs::open_fds(std::process::id())?,
        rss_mib: [
            procfs::rss_bytes(pids[0])? as f64 / MIB,
            procfs::rss_bytes(pids[1])? as f64 / MIB,
        ],
    })
}

/// Samples both agents once a second on a thread of its own.
struct Sampler {
    stop: Arc<AtomicBool>,
    phase: Arc<Mutex<&'static str>>,
    handle: std::thread::JoinHandle<anyhow::Result<(Vec<Sample>, Vec<String>)>>,
}

impl Sampler {
    fn start(pids: [u32; 2], t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(Mutex::new("hold"));
        let handle = std::thread::spawn({
            let stop = stop.clone();
            let phase = phase.clone();
            move || {
                let mut samples = Vec::new();
                let mut next = Instant::now();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        let now = *phase.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                        // A failed read (this process out of descriptors, say) loses one
                        // sample, not the soak; the report says how many were lost.
                        match sample(pids, t0, now) {
                            Ok(s) => samples.push(s),
                            Err(e) => {
                                failures.push(format!("{:.0} s: {e:#}", t0.elapsed().as_secs_f64()))
                            }
                        }
                        next += Duration::from_secs(1);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok((samples, failures))
            }
        });
        Self {
            stop,
            phase,
            handle,
        }
    }

    fn phase(&self, phase: &'static str) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
    }

    fn stop(self) -> anyhow::Result<(Vec<Sample>, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("sampler panicked"))?
    }
}

/// Writes `ping\n` to one held connection in ten each second, so every held connection
/// carries a few bytes through each certificate rotation (read back at the end).
struct Trickle {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<TrickleResult>,
}

/// The held connections, the pings each got, the write failures, and which are dead.
type TrickleResult = (Vec<TcpStream>, Vec<u32>, Errors, Vec<bool>);

const PING: &[u8] = b"ping\n";

impl Trickle {
    fn start(held: Vec<TcpStream>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut pings = vec![0u32; held.len()];
                let mut dead = vec![false; held.len()];
                let mut errors = Errors::default();
                let started = Instant::now();
                let mut round = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let due = started + Duration::from_secs(round as u64);
                    if Instant::now() < due {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    for i in (round % 10..held.len()).step_by(10) {
                        if dead[i] {
                            continue;
                        }
                        match (&held[i]).write_all(PING) {
                            Ok(()) => pings[i] += 1,
                            Err(e) => {
                                errors.add_io(&format!("held connection {i}: ping"), &e);
                                dead[i] = true;
                            }
                        }
                    }
                    round += 1;
                }
                (held, pings, errors, dead)
            }
        });
        Self { stop, handle }
    }

    fn stop(self) -> anyhow::Result<TrickleResult> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("trickle thread panicked"))
    }
}

/// Each live held connection sends `end <i> <pings>\n`; the server side (accepting from the
/// holder only now) reads the pings and the end line and answers `ok <i> <pings seen>\n`.
/// A connection is verified when its own index and every ping came back.
fn verify_held(
    held: &[TcpStream],
    pings: &[u32],
    dead: &[bool],
    holder: &load::Holder,
    errors: &mut Errors,
) -> anyhow::Result<usize> {
    let mut live = vec![false; held.len()];
    for (i, s) in held.iter().enumerate() {
        if dead[i] {
            continue;
        }
        match (&*s).write_all(format!("end {i} {}\n", pings[i]).as_bytes()) {
            Ok(()) => live[i] = true,
            Err(e) => errors.add_io(&format!("held connection {i}: end line"), &e),
        }
    }
    let expected = live.iter().filter(|&&l| l).count();
    let verified = std::thread::scope(|scope| -> anyhow::Result<usize> {
        let server = scope.spawn(|| answer_held(holder, expected));
        let mut verified = 0;
        // One deadline for all answers: a mesh that lost many connections must not cost
        // a timeout each.
        let deadline = Instant::now() + VERIFY_TIMEOUT;
        for (i, s) in held.iter().enumerate() {
            if !live[i] {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let mut line = String::new();
            match BufReader::new(s).read_line(&mut line) {
                Ok(_) if line == format!("ok {i} {}\n", pings[i]) => verified += 1,
                Ok(_) => errors.add(
                    Kind::WrongReply,
                    format!(
                        "held connection {i}: {line:?}, wanted \"ok {i} {}\"",
                        pings[i]
                    ),
                ),
                Err(e) => errors.add_io(&format!("held connection {i}: answer"), &e),
            }
        }
        let answered = server
            .join()
            .map_err(|_| anyhow::anyhow!("held-connection server panicked"))??;
        eprintln!("soak: server side answered {answered} of {expected} held connections");
        Ok(verified)
    })?;
    Ok(verified)
}

/// Accepts the held connections from the holder and answers each end line; returns how
/// many it answered. Stops after `expected`, or at the verification deadline.
fn answer_held(holder: &load::Holder, expected: usize) -> anyhow::Result<usize> {
    let mut answered = 0;
    let deadline = Instant::now() + VERIFY_TIMEOUT;
    while answered < expected && Instant::now() < deadline {
        let Some(s) = holder.accept()? else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        // The end line was sent before this thread started: a connection without it
        // within a second lost it.
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut reader = BufReader::new(&s);
        let mut seen = 0u32;
        let mut line = String::new();
        let reply = loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break None,
                Ok(_) if line.as_bytes() == PING => seen += 1,
                Ok(_) => {
                    break line
                        .strip_prefix("end ")
                        .and_then(|rest| rest.split_whitespace().next())
                        .map(|i| format!("ok {i} {seen}\n"));
                }
            }
        };
        // A connection with no end line gets nothing: the client counts it.
        if let Some(reply) = reply
            && (&s).write_all(reply.as_bytes()).is_ok()
        {
            answered += 1;
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    Ok(answered)
}

/// The paced new-connection load's outcome.
struct Churn {
    attempted: u64,
    ok: u64,
    /// Time over which the connections were started.
    launch_secs: f64,
    errors: Errors,
    max_in_flight: usize,
    /// Connect-to-last-byte times of the successful connections, microseconds.
    times_us: Histogram<u64>,
}

impl Churn {
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.times_us.is_empty()).then(|| self.times_us.value_at_quantile(q) as f64 / 1000.0)
    }
}

/// Starts `rate` connections a second to `to` for `duration`, on a schedule (every 10 ms,
/// as many as are due; late ticks catch up), each on its own task: connect, send 64 bytes
/// naming the connection, half-close, read the greeting and the echo to the end.
fn churn(netns: &Path, to: SocketAddr, rate: u32, duration: Duration) -> anyhow::Result<Churn> {
    let handle = load::spawn_in_netns(netns, move || {
        // One thread: the sockets must be created inside this thread's netns.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let started = Instant::now();
            let mut launched: u64 = 0;
            let mut out = Churn {
                attempted: 0,
                ok: 0,
                launch_secs: 0.0,
                errors: Errors::default(),
                max_in_flight: 0,
                times_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
            };
            let record = |out: &mut Churn, r: Result<Result<Duration, (Kind, String)>, _>| match r {
                Ok(Ok(took)) => {
                    out.ok += 1;
                    out.times_us.saturating_record(took.as_micros() as u64);
                }
                Ok(Err((kind, detail))) => out.errors.add(kind, detail),
                Err(e) => out
                    .errors
                    .add(Kind::WrongReply, format!("task failed: {e}")),
            };
            loop {
                tick.tick().await;
                let elapsed = started.elapsed();
                if elapsed >= duration {
                    break;
                }
                let due = (elapsed.as_secs_f64() * f64::from(rate)) as u64 + 1;
                while launched < due {
                    tasks.spawn(one_connection(to, launched));
                    launched += 1;
                }
                out.max_in_flight = out.max_in_flight.max(tasks.len());
                while let Some(r) = tasks.try_join_next() {
                    record(&mut out, r);
                }
            }
            out.launch_secs = started.elapsed().as_secs_f64();
            while let Some(r) = tasks.join_next().await {
                record(&mut out, r);
            }
            out.attempted = launched;
            Ok(out)
        })
    })?;
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"))?
}

async fn one_connection(to: SocketAddr, n: u64) -> Result<Duration, (Kind, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let started = Instant::now();
    let mut s =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(to)).await {
            Err(_) => return Err((Kind::Timeout, format!("connection {n}: connect"))),
            Ok(Err(e)) => {
                let kind = match e.kind() {
                    io::ErrorKind::TimedOut => Kind::Timeout,
                    _ => Kind::Connect,
                };
                return Err((kind, format!("connection {n}: connect: {e}")));
            }
            Ok(Ok(s)) => s,
        };
    let payload = format!("{:<63}\n", format!("soak connection {n}"));
    let exchange = async {
        s.write_all(payload.as_bytes()).await?;
        s.shutdown().await?;
        let mut reply = Vec::with_capacity(192);
        s.read_to_end(&mut reply).await?;
        Ok::<_, io::Error>(reply)
    };
    let reply = match tokio::time::timeout(IO_TIMEOUT, exchange).await {
        Err(_) => return Err((Kind::Timeout, format!("connection {n}: exchange"))),
        Ok(Err(e)) => return Err((exchange_kind(&e), format!("connection {n}: {e}"))),
        Ok(Ok(reply)) => reply,
    };
    // The app's greeting line, then exactly our bytes.
    let echo = reply
        .iter()
        .position(|&b| b == b'\n')
        .filter(|_| reply.starts_with(b"server peer="))
        .map(|nl| &reply[nl + 1..]);
    if echo != Some(payload.as_bytes()) {
        return Err((
            Kind::WrongReply,
            format!(
                "connection {n}: {:?}",
                String::from_utf8_lossy(&reply[..reply.len().min(200)])
            ),
        ));
    }
    Ok(started.elapsed())
}
