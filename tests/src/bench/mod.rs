//! The testbed benchmark: what the mesh costs, measured against no mesh in the same run on
//! the two-node testbed. `cargo xtask bench` runs [`run`] with [`Settings::full`] through
//! the `ambit-bench` binary; the end-to-end suite runs it once with [`Settings::quick`]
//! and checks that every figure was produced.
//!
//! Pods: `client` and `server-a` on node 1, `server-b` on node 2, all in the mesh
//! namespace. "No mesh" is the same testbed with the namespace's opt-in label off: the
//! agents keep running but enroll nothing, so the traffic is plain pod-to-pod routing.

pub mod control_plane;
pub mod crypto;
pub mod iperf;
pub mod kube;
pub mod load;
pub mod procfs;
pub mod relay;
pub mod scale;
pub mod soak;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::testbed::{APP_PORT, MESH_NS, PodSpec, Testbed, sysctl};

/// `target/bench/<file>`: where every part of the benchmark writes its output.
pub(crate) fn output_path(file: &str) -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.join(file))
}

/// Writes `report` as pretty JSON to `target/bench/<file>` and returns the path.
pub fn write_json(file: &str, report: &impl Serialize) -> anyhow::Result<PathBuf> {
    let path = output_path(file)?;
    std::fs::write(&path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Lets every pod of `bed` open tens of thousands of connections from one address and
/// queue thousands unaccepted: TIME_WAIT ports reused, ports from 20000 (below are the
/// agent's in-pod ports 15001/15006/15008), a deep accept queue for the holders.
pub(crate) fn tune_for_many_connections(bed: &Testbed) -> anyhow::Result<()> {
    for pod in &bed.pods {
        sysctl(&pod.ns, "net/ipv4/tcp_tw_reuse", "1")?;
        sysctl(&pod.ns, "net/ipv4/ip_local_port_range", "20000 65000")?;
        sysctl(&pod.ns, "net/core/somaxconn", "65535")?;
    }
    Ok(())
}

const IPERF_PORT: u16 = 5201;
const HOLD_PORT: u16 = 9090;
/// The plain relays' ports in the client's and the server's pods (floors only, no mesh):
/// one pair towards the app, one towards iperf3's server.
const RELAY_PORT: u16 = 9191;
const RELAY_BULK_PORT: u16 = 9192;
const LOG_WAIT: Duration = Duration::from_secs(20);
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub quick: bool,
    /// Seconds of each iperf3 run.
    pub bulk_secs: u64,
    /// Seconds of each latency run.
    pub latency_secs: u64,
    /// Requests per second of the fixed-rate latency run.
    pub fixed_rate: u32,
    /// Seconds of each new-connections run, and its concurrency.
    pub connect_secs: u64,
    pub connect_workers: usize,
    /// Idle proxied connections held open for the memory figure.
    pub idle_connections: usize,
    /// Each agent's `--worker-threads` (`ambit-bench --agent-workers N`); `None`: the
    /// agent's default, what users run. Both testbed nodes share this machine's cores, so
    /// fewer threads model a node's share of them; one thread per agent caps same-node bulk
    /// (one agent, one thread, both ends).
    pub agent_worker_threads: Option<usize>,
    /// The agent binary (`ambit-bench --against` alternates two); `None`: $AMBIT_BIN or
    /// target/debug/ambit.
    pub agent_binary: Option<PathBuf>,
}

impl Settings {
    pub fn full() -> Self {
        Self {
            quick: false,
            bulk_secs: 5,
            latency_secs: 5,
            fixed_rate: 1000,
            connect_secs: 5,
            connect_workers: 4,
            idle_connections: 10_000,
            agent_worker_threads: None,
            agent_binary: None,
        }
    }

    /// A smoke run: every figure, small sizes.
    pub fn quick() -> Self {
        Self {
            quick: true,
            bulk_secs: 1,
            latency_secs: 1,
            fixed_rate: 1000,
            connect_secs: 1,
            connect_workers: 2,
            idle_connections: 1_000,
            agent_worker_threads: None,
            agent_binary: None,
        }
    }
}

/// One figure: no mesh and mesh, across nodes and on the same node.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub figure: String,
    pub cross_node: Pair,
    pub same_node: Pair,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Pair {
    pub no_mesh: Option<f64>,
    pub mesh: Option<f64>,
    /// mesh / no mesh; none where the baseline is nil by construction (the agents do no
    /// work without the mesh, so CPU per GiB and bytes per connection are zero plus noise).
    pub ratio: Option<f64>,
}

impl Pair {
    fn new(no_mesh: Option<f64>, mesh: Option<f64>, comparable: bool) -> Self {
        let ratio = match (no_mesh, mesh) {
            (Some(b), Some(m)) if comparable && b > 0.0 => Some(m / b),
            _ => None,
        };
        Self {
            no_mesh,
            mesh,
            ratio,
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        self.ratio
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub settings: Settings,
    pub idle_connections: IdleCounts,
    /// RLIMIT_NOFILE in force for the agents.
    pub nofile_limit: u64,
    pub agent_binary: PathBuf,
    pub machine: String,
    pub rows: Vec<Row>,
    /// The project's aims, each with the figure compared and whether it is met.
    pub aims: Vec<Aim>,
    /// What bounds some aims on this machine whatever the agent does, measured in the run.
    pub floors: Vec<Floor>,
    /// The fixed-rate runs that stalled, window by window.
    pub stalls: Vec<Stall>,
    /// Share of the machine's CPU time the hypervisor gave to others during the whole run
    /// (%): runs with much of it are not comparable with quiet ones.
    pub steal_percent: Option<f64>,
}

/// A fixed-rate run with at least one stalled [`load::Window`]: all its windows, to tell one
/// pause from a run that was slow throughout.
#[derive(Clone, Debug, Serialize)]
pub struct Stall {
    /// "cross-node, mesh" and the like.
    pub run: String,
    pub p50_us: f64,
    pub steal_percent: Option<f64>,
    pub run_queue_wait_us_per_round_trip: Option<f64>,
    pub windows: Vec<load::Window>,
}

fn stalls(cross: [&Figures; 2], same: [&Figures; 2]) -> Vec<Stall> {
    let runs = [
        ("cross-node, no mesh", cross[0]),
        ("cross-node, mesh", cross[1]),
        ("same node, no mesh", same[0]),
        ("same node, mesh", same[1]),
    ];
    runs.into_iter()
        .filter_map(|(run, figs)| {
            let fixed = figs.fixed.as_ref()?;
            fixed.stalled_windows().next().is_some().then(|| Stall {
                run: run.into(),
                p50_us: fixed.p50_us,
                steal_percent: figs.fixed_steal_percent,
                run_queue_wait_us_per_round_trip: figs.fixed_run_queue_wait_us,
                windows: fixed.windows.clone(),
            })
        })
        .collect()
}

/// A figure of work any mesh with the agents' TCP legs or HBONE's handshake does, next to
/// the aim it bounds.
#[derive(Clone, Debug, Serialize)]
pub struct Floor {
    pub figure: String,
    pub value: Option<f64>,
    /// The aim or figure it is set beside.
    pub beside: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Aim {
    pub aim: String,
    pub value: Option<f64>,
    pub met: Option<bool>,
}

impl Report {
    pub fn row(&self, figure: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.figure == figure)
    }

    /// Figures that should have a value and do not (the quick test insists on none).
    pub fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for r in &self.rows {
            for (place, pair) in [("cross-node", r.cross_node), ("same-node", r.same_node)] {
                for (side, v) in [("no mesh", pair.no_mesh), ("mesh", pair.mesh)] {
                    if !v.is_some_and(f64::is_finite) {
                        missing.push(format!("{} ({place}, {side})", r.figure));
                    }
                }
            }
        }
        for a in &self.aims {
            if a.value.is_none() {
                missing.push(format!("aim: {}", a.aim));
            }
        }
        for f in &self.floors {
            if !f.value.is_some_and(f64::is_finite) {
                missing.push(format!("floor: {}", f.figure));
            }
        }
        missing
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| figure | no mesh, cross-node | mesh, cross-node | mesh / no mesh | no mesh, same node | mesh, same node | mesh / no mesh |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                r.figure,
                cell(r.cross_node.no_mesh),
                cell(r.cross_node.mesh),
                r.cross_node
                    .ratio()
                    .map_or("–".into(), |x| format!("{x:.2}")),
                cell(r.same_node.no_mesh),
                cell(r.same_node.mesh),
                r.same_node
                    .ratio()
                    .map_or("–".into(), |x| format!("{x:.2}")),
            ));
        }
        s.push_str("\n| aim | measured | met |\n| --- | ---: | :---: |\n");
        for a in &self.aims {
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                a.aim,
                cell(a.value),
                match a.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "–",
                }
            ));
        }
        s.push_str(
            "\n| floor (cross-node, this machine) | measured | beside |\n| --- | ---: | --- |\n",
        );
        for f in &self.floors {
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                f.figure,
                cell(f.value),
                f.beside
            ));
        }
        s
    }
}

/// A table cell: the figure by [`fmt`], or a dash where there is none.
pub fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), fmt)
}

pub(crate) fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Which server pod a placement talks to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Cross,
    Same,
}

impl Place {
    fn server(self) -> &'static str {
        match self {
            Place::Cross => "server-b",
            Place::Same => "server-a",
        }
    }
}

/// How many idle connections each placement holds: the settings' count, fewer on the same
/// node when one agent holding both ends (two descriptors per connection) would pass the
/// open-file limit.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct IdleCounts {
    pub cross_node: usize,
    pub same_node: usize,
}

impl IdleCounts {
    fn new(wanted: usize, nofile: u64) -> Self {
        let room = usize::try_from(nofile)
            .unwrap_or(usize::MAX)
            .saturating_sub(1000);
        Self {
            cross_node: wanted.min(room),
            same_node: wanted.min(room / 2),
        }
    }

    fn of(self, place: Place) -> usize {
        match place {
            Place::Cross => self.cross_node,
            Place::Same => self.same_node,
        }
    }

    fn describe(self) -> String {
        if self.cross_node == self.same_node {
            format!("{} held", self.cross_node)
        } else {
            format!(
                "{} held, {} on the same node",
                self.cross_node, self.same_node
            )
        }
    }
}

/// Figures of one phase (no mesh or mesh) for one placement.
#[derive(Default)]
struct Figures {
    bulk1_gbps: Option<f64>,
    bulk4_gbps: Option<f64>,
    cpu_s_per_gib: Option<f64>,
    fixed: Option<load::Latency>,
    /// TCP's retransmissions and delayed ACKs in the client's and the server's pods during
    /// the fixed-rate run: whether TCP saw trouble when its latency stalls.
    fixed_tcp: Option<procfs::TcpTrouble>,
    /// During the fixed-rate run: the machine's CPU time stolen by the hypervisor (%), and
    /// both agents' threads' time waiting for a CPU per round trip (µs).
    fixed_steal_percent: Option<f64>,
    fixed_run_queue_wait_us: Option<f64>,
    full: Option<load::Latency>,
    /// Both agents' CPU time per round trip of the full-speed run.
    cpu_us_per_round_trip: Option<f64>,
    conns_pooled: Option<f64>,
    conns_handshake: Option<f64>,
    /// Both agents' CPU time per connection of the two figures above.
    cpu_us_per_conn_pooled: Option<f64>,
    cpu_us_per_conn_handshake: Option<f64>,
    /// RSS growth per held connection, client node's agent and server node's agent.
    per_conn_bytes: [Option<f64>; 2],
    rss_with_conns_mib: [Option<f64>; 2],
}

/// Runs every scenario and returns the report (also printed and written by [`write`]).
pub fn run(settings: &Settings) -> anyhow::Result<Report> {
    // The client ends of the held connections live in this process; the agents (which
    // inherit the limit and raise theirs the same way) hold one descriptor per proxied
    // connection and side.
    let nofile = ambit_agent::sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let idle = IdleCounts::new(settings.idle_connections, nofile);
    let agent_binary = match &settings.agent_binary {
        Some(binary) => binary.clone(),
        None => crate::testbed::agent_binary()?,
    };
    evict_from_page_cache(&agent_binary)?;
    let machine_cpu_before = procfs::MachineCpu::now()?;

    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server-a", MESH_NS, 0),
        PodSpec::new("server-b", MESH_NS, 1),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    tune_for_many_connections(&bed)?;
    let workers: Vec<String> = match settings.agent_worker_threads {
        Some(n) => vec!["--worker-threads".into(), n.to_string()],
        None => Vec::new(),
    };
    bed.agent_args.clone_from(&workers);
    bed.agent_binary = Some(agent_binary.clone());
    let _iperf: Vec<iperf::IperfServer> = ["server-a", "server-b"]
        .iter()
        .map(|p| iperf::IperfServer::start(&bed.pod(p).ns.path(), IPERF_PORT))
        .collect::<anyhow::Result<_>>()?;
    let holders: Vec<load::Holder> = ["server-a", "server-b"]
        .iter()
        .map(|p| {
            let pod = bed.pod(p);
            load::Holder::start(&pod.ns.path(), pod.addr(HOLD_PORT))
        })
        .collect::<anyhow::Result<_>>()?;

    // Baseline first: agents running, nothing enrolled.
    bed.mesh_enabled = false;
    bed.write_config()?;
    bed.start_agents()?;
    settle();
    let idle_no_mesh = agents_rss(&bed)?;
    let mut base_cross = Figures::default();
    let mut base_same = Figures::default();
    for (place, figs) in [
        (Place::Cross, &mut base_cross),
        (Place::Same, &mut base_same),
    ] {
        measure(&bed, settings, idle, place, &holders, figs)?;
    }
    let floors = floors(&bed, settings, &base_cross)?;
    // Without the mesh there is no HBONE connection to pool or not.
    base_cross.conns_handshake = base_cross.conns_pooled;
    base_same.conns_handshake = base_same.conns_pooled;
    base_cross.cpu_us_per_conn_handshake = base_cross.cpu_us_per_conn_pooled;
    base_same.cpu_us_per_conn_handshake = base_same.cpu_us_per_conn_pooled;

    // The mesh: enroll live, check the path goes through both agents.
    bed.mesh_enabled = true;
    bed.write_config()?;
    for (agent, pod) in [
        (0, "mesh/client"),
        (0, "mesh/server-a"),
        (1, "mesh/server-b"),
    ] {
        bed.agent(agent)
            .wait_for_log(&["pod enrolled", pod], LOG_WAIT)?;
    }
    let mut idle_mesh = None;
    let mut mesh_cross = Figures::default();
    let mut mesh_same = Figures::default();
    for (place, figs) in [
        (Place::Cross, &mut mesh_cross),
        (Place::Same, &mut mesh_same),
    ] {
        // Fresh agents for each placement, for the same reason as measuring memory first.
        bed.kill_agent(0);
        bed.kill_agent(1);
        bed.start_agents()?;
        settle();
        if idle_mesh.is_none() {
            idle_mesh = Some(agents_rss(&bed)?);
        }
        check_meshed(&bed, place)?;
        measure(&bed, settings, idle, place, &holders, figs)?;
    }
    let idle_mesh = idle_mesh.context("no mesh placement ran")?;

    // A full TCP + TLS + HTTP/2 handshake per connection: node 1's agent (the client's,
    // which dials HBONE) restarted without pooling.
    bed.kill_agent(0);
    bed.agent_args = [workers, vec!["--no-pool".into()]].concat();
    bed.start_agent(0)?;
    for place in [Place::Cross, Place::Same] {
        check_meshed(&bed, place)?;
        let (rate, cpu_us) = connections_with_cpu(
            &bed,
            settings,
            &bed.pod("client").ns.path(),
            bed.pod(place.server()).addr(APP_PORT),
        )?;
        let figs = match place {
            Place::Cross => &mut mesh_cross,
            Place::Same => &mut mesh_same,
        };
        figs.conns_handshake = Some(rate);
        figs.cpu_us_per_conn_handshake = cpu_us;
    }
    drop(holders);

    let rows = rows(
        settings,
        idle,
        [&base_cross, &mesh_cross],
        [&base_same, &mesh_same],
        idle_no_mesh,
        idle_mesh,
    );
    let mut report = Report {
        settings: settings.clone(),
        idle_connections: idle,
        nofile_limit: nofile,
        agent_binary,
        machine: machine(),
        rows,
        aims: Vec::new(),
        floors,
        stalls: stalls([&base_cross, &mesh_cross], [&base_same, &mesh_same]),
        steal_percent: machine_cpu_before.steal_percent_until(procfs::MachineCpu::now()?),
    };
    report.aims = aims(&report);
    Ok(report)
}

/// Prints the table and writes `target/bench/testbed.json`.
pub fn write(report: &Report) -> anyhow::Result<PathBuf> {
    write_json("testbed.json", report)
}

/// The floors, on the no-mesh testbed (nothing enrolled): a plain relay pair with the mesh's
/// three TCP legs between the client and the server on the other node, and one full
/// handshake's public-key work.
fn floors(bed: &Testbed, settings: &Settings, no_mesh: &Figures) -> anyhow::Result<Vec<Floor>> {
    let client = bed.pod("client").ns.path();
    let server = bed.pod(Place::Cross.server());
    let relay_pair = |port: u16, upstream: u16, copies: usize| {
        let far = relay::Relay::start(
            &server.ns.path(),
            server.addr(port),
            server.addr(upstream),
            copies,
        )?;
        let near = relay::Relay::start(
            &client,
            (std::net::Ipv4Addr::LOCALHOST, port).into(),
            far.addr,
            copies,
        )?;
        anyhow::Ok((near, far))
    };
    let relays_cpu = |(near, far): &(relay::Relay, relay::Relay)| -> anyhow::Result<f64> {
        Ok((near.cpu_time()? + far.cpu_time()?).as_secs_f64())
    };

    let relays = relay_pair(RELAY_PORT, APP_PORT, relay::SMALL_COPIES)?;
    let cpu_before = relays_cpu(&relays)?;
    let rate = load::connection_rate(
        &client,
        relays.0.addr,
        Duration::from_secs(settings.connect_secs),
        settings.connect_workers,
    )?;
    let cpu_us = (relays_cpu(&relays)? - cpu_before) * 1e6 / rate.connections.max(1) as f64;
    let cpu_before = relays_cpu(&relays)?;
    let latency_run = Duration::from_secs(settings.latency_secs);
    let latency = load::round_trips(&client, relays.0.addr, latency_run, None)?;
    let round_trips = latency.round_trips_per_sec * latency_run.as_secs_f64();
    let relays_cpu_s = relays_cpu(&relays)? - cpu_before;
    let cpu_us_per_round_trip = (round_trips > 0.0).then(|| relays_cpu_s * 1e6 / round_trips);
    drop(relays);

    // Bulk as the mesh's is measured: 1 stream, then 4, CPU over both.
    let relays = relay_pair(RELAY_BULK_PORT, IPERF_PORT, relay::BULK_COPIES)?;
    let cpu_before = relays_cpu(&relays)?;
    let bulk = |streams| {
        iperf::run_client(
            &client,
            std::net::Ipv4Addr::LOCALHOST,
            relays.0.addr.port(),
            settings.bulk_secs,
            streams,
        )
    };
    let (one, four) = (bulk(1)?, bulk(4)?);
    let cpu_s_per_gib = (relays_cpu(&relays)? - cpu_before) / ((one.bytes + four.bytes) / GIB);
    drop(relays);

    let handshake_us = crypto::handshake_us(if settings.quick { 50 } else { 400 })?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    Ok(vec![
        Floor {
            figure: "plain 3-leg relay (no TLS, HTTP/2, capture): new connections/s, / no mesh"
                .into(),
            value: no_mesh.conns_pooled.map(|base| rate.per_sec / base),
            beside: "new connections/s, pooled, mesh / no mesh ≥ 0.50".into(),
        },
        Floor {
            figure: "plain 3-leg relay: CPU µs per connection, both relays".into(),
            value: Some(cpu_us),
            beside: "agents' CPU µs per new connection, pooled HBONE".into(),
        },
        Floor {
            figure: "plain 3-leg relay: bulk, 1 stream, / no mesh".into(),
            value: no_mesh
                .bulk1_gbps
                .map(|base| one.bits_per_second / 1e9 / base),
            beside: "cross-node bulk, 1 stream, mesh / no mesh ≥ 0.50".into(),
        },
        Floor {
            figure: "plain 3-leg relay: CPU s per GiB, both relays (1 and 4 streams)".into(),
            value: Some(cpu_s_per_gib),
            beside: "agents' CPU per GiB, both agents, cross-node (s) ≤ 1.5".into(),
        },
        Floor {
            figure: "plain 3-leg relay: p50 added per 1 KiB round trip, full speed (µs)".into(),
            value: no_mesh
                .full
                .as_ref()
                .map(|base| latency.p50_us - base.p50_us),
            beside: "p50 added per round trip ≤ 60".into(),
        },
        Floor {
            figure: "plain 3-leg relay: CPU µs per 1 KiB round trip, full speed, both relays"
                .into(),
            value: cpu_us_per_round_trip,
            beside: "agents' CPU µs per 1 KiB round trip, full speed".into(),
        },
        Floor {
            figure: "one full handshake's X25519 and ECDSA P-256 work, both ends (µs of one core)"
                .into(),
            value: Some(handshake_us),
            beside: "agents' CPU µs per new connection, full handshake each".into(),
        },
        Floor {
            figure: format!("full handshakes/s with {cores:.0} cores doing only that work"),
            value: Some(cores * 1e6 / handshake_us),
            beside: "new connections/s, full handshake each ≥ 2000".into(),
        },
    ])
}

/// Lets the agents finish what enrolling started before memory is read.
/// Drops the agent binary's pages from the page cache before the first agents start. A
/// fresh agent's resident code depends on it: faults map neighbouring pages already cached
/// (fault-around), so a binary just written or copied (every page cached) showed ~2 MiB more
/// idle RSS than one read from disk, and the figures moved with what ran before the bench.
/// Starting from an evicted binary makes them comparable between runs. Dirty pages cannot
/// be dropped, so the file is synced first; `dd iflag=nocache count=0` then asks the kernel
/// to drop the whole file's cache (coreutils' documented use), which keeps this crate free
/// of unsafe posix_fadvise.
fn evict_from_page_cache(binary: &Path) -> anyhow::Result<()> {
    let file = binary.display();
    for (what, args) in [
        ("sync", vec![file.to_string()]),
        (
            "dd",
            vec![
                format!("if={file}"),
                "iflag=nocache".into(),
                "count=0".into(),
                "status=none".into(),
            ],
        ),
    ] {
        let status = Command::new(what)
            .args(&args)
            .status()
            .with_context(|| format!("running {what} to evict {file} from the page cache"))?;
        anyhow::ensure!(status.success(), "{what} {args:?} failed: {status}");
    }
    Ok(())
}

fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

/// RSS of node 1's and node 2's agents, in bytes.
fn agents_rss(bed: &Testbed) -> anyhow::Result<[f64; 2]> {
    Ok([
        procfs::rss_bytes(bed.agent(0).pid())? as f64,
        procfs::rss_bytes(bed.agent(1).pid())? as f64,
    ])
}

/// New connections per second from `client_netns` to `to`, and both agents' CPU
/// microseconds per connection made meanwhile (near 0 without the mesh; `None` without
/// connections).
fn connections_with_cpu(
    bed: &Testbed,
    settings: &Settings,
    client_netns: &Path,
    to: std::net::SocketAddr,
) -> anyhow::Result<(f64, Option<f64>)> {
    let cpu_before = agents_cpu(bed)?;
    let rate = load::connection_rate(
        client_netns,
        to,
        Duration::from_secs(settings.connect_secs),
        settings.connect_workers,
    )?;
    let cpu_s = agents_cpu(bed)? - cpu_before;
    let cpu_us = (rate.connections > 0).then(|| cpu_s * 1e6 / rate.connections as f64);
    Ok((rate.per_sec, cpu_us))
}

fn agents_run_queue_wait(bed: &Testbed) -> anyhow::Result<Duration> {
    Ok(procfs::run_queue_wait(bed.agent(0).pid())? + procfs::run_queue_wait(bed.agent(1).pid())?)
}

fn agents_cpu(bed: &Testbed) -> anyhow::Result<f64> {
    Ok(procfs::cpu_time(bed.agent(0).pid())?.as_secs_f64()
        + procfs::cpu_time(bed.agent(1).pid())?.as_secs_f64())
}

/// One request through the mesh; waits for the receiving agent to log it, so a figure
/// called "mesh" really went through both agents.
fn check_meshed(bed: &Testbed, place: Place) -> anyhow::Result<()> {
    let server = bed.pod(place.server());
    let receiving = usize::from(place == Place::Cross);
    let before = bed
        .agent(receiving)
        .logs()
        .iter()
        .filter(|l| l.contains("inbound connection closed"))
        .count();
    let reply = bed.pod("client").request(server.addr(APP_PORT), b"bench")?;
    anyhow::ensure!(reply.ends_with("bench"), "unexpected reply {reply:?}");
    bed.agent(receiving).wait_for_logs(
        &["inbound connection closed", &server.identity()],
        before + 1,
        LOG_WAIT,
    )?;
    Ok(())
}

fn measure(
    bed: &Testbed,
    settings: &Settings,
    idle: IdleCounts,
    place: Place,
    holders: &[load::Holder],
    figs: &mut Figures,
) -> anyhow::Result<()> {
    let client = bed.pod("client").ns.path();
    let server = bed.pod(place.server());
    eprintln!(
        "bench: client → {} ({})",
        place.server(),
        if bed.mesh_enabled { "mesh" } else { "no mesh" }
    );

    // Memory per idle proxied connection, first: later figures leave freed memory in the
    // agents' heaps that new connections would reuse unseen.
    let holder = holders
        .iter()
        .find(|h| h.addr.ip() == std::net::IpAddr::V4(server.ip))
        .context("no holder for the server pod")?;
    settle();
    let before = agents_rss(bed)?;
    let count = idle.of(place);
    let conns = load::open_idle(&client, holder.addr, count)?;
    holder.wait_queued(count, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(1));
    let after = agents_rss(bed)?;
    let n = count as f64;
    for i in 0..2 {
        figs.per_conn_bytes[i] = Some((after[i] - before[i]) / n);
        figs.rss_with_conns_mib[i] = Some(after[i] / MIB);
    }
    drop(conns);
    holder.release();
    // Let both agents see the closes before the next figure.
    std::thread::sleep(Duration::from_secs(1));
    // Bulk, with both agents' CPU time around it.
    let cpu_before = agents_cpu(bed)?;
    let one = iperf::run_client(&client, server.ip, IPERF_PORT, settings.bulk_secs, 1)?;
    let four = iperf::run_client(&client, server.ip, IPERF_PORT, settings.bulk_secs, 4)?;
    let cpu = agents_cpu(bed)? - cpu_before;
    figs.bulk1_gbps = Some(one.bits_per_second / 1e9);
    figs.bulk4_gbps = Some(four.bits_per_second / 1e9);
    figs.cpu_s_per_gib = Some(cpu / ((one.bytes + four.bytes) / GIB));

    // Latency on one long-lived connection.
    let app = server.addr(APP_PORT);
    let latency = Duration::from_secs(settings.latency_secs);
    let pods_tcp = || -> anyhow::Result<procfs::TcpTrouble> {
        let mut both = procfs::TcpTrouble::default();
        for ns in [client.clone(), server.ns.path()] {
            let of_pod = load::join(load::spawn_in_netns(
                &ns,
                procfs::TcpTrouble::of_current_netns,
            )?)?;
            both = both.plus(of_pod);
        }
        Ok(both)
    };
    let tcp_before = pods_tcp()?;
    let machine_before = procfs::MachineCpu::now()?;
    let wait_before = agents_run_queue_wait(bed)?;
    let fixed = load::round_trips(&client, app, latency, Some(settings.fixed_rate))?;
    let wait = agents_run_queue_wait(bed)?.saturating_sub(wait_before);
    figs.fixed_steal_percent = machine_before.steal_percent_until(procfs::MachineCpu::now()?);
    figs.fixed_tcp = Some(tcp_before.since(pods_tcp()?));
    let round_trips = fixed.round_trips_per_sec * latency.as_secs_f64();
    figs.fixed_run_queue_wait_us =
        (round_trips > 0.0).then(|| wait.as_secs_f64() * 1e6 / round_trips);
    let stalled: Vec<&load::Window> = fixed.stalled_windows().collect();
    if let (Some(first), Some(worst)) = (
        stalled.first(),
        stalled
            .iter()
            .max_by(|a, b| a.latency_p99_us.total_cmp(&b.latency_p99_us)),
    ) {
        eprintln!(
            "bench: the {}/s run stalled in {} of its {} windows of {} ms, the first at {} ms; \
             worst p99 {:.0} µs, longest exchange {:.0} µs; TCP retransmitted {} segments; \
             steal {:.1} %; agents' run-queue wait {:.1} µs per round trip",
            settings.fixed_rate,
            stalled.len(),
            fixed.windows.len(),
            load::WINDOW.as_millis(),
            first.start_ms,
            worst.latency_p99_us,
            worst.service_max_us,
            figs.fixed_tcp.map_or(0, |t| t.retransmitted),
            figs.fixed_steal_percent.unwrap_or(f64::NAN),
            figs.fixed_run_queue_wait_us.unwrap_or(f64::NAN),
        );
    }
    figs.fixed = Some(fixed);
    // The CPU time also covers the connect and 200 warm-up exchanges (about 1 % more
    // exchanges than counted at these rates); the relay floor's is measured the same way.
    let cpu_before = agents_cpu(bed)?;
    let full = load::round_trips(&client, app, latency, None)?;
    let round_trips = full.round_trips_per_sec * latency.as_secs_f64();
    let cpu = agents_cpu(bed)? - cpu_before;
    figs.cpu_us_per_round_trip = (round_trips > 0.0).then(|| cpu * 1e6 / round_trips);
    figs.full = Some(full);

    // New connections.
    let (rate, cpu_us) = connections_with_cpu(bed, settings, &client, app)?;
    figs.conns_pooled = Some(rate);
    figs.cpu_us_per_conn_pooled = cpu_us;

    Ok(())
}

fn rows(
    settings: &Settings,
    idle: IdleCounts,
    cross: [&Figures; 2],
    same: [&Figures; 2],
    idle_no_mesh: [f64; 2],
    idle_mesh: [f64; 2],
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut add = |figure: String, get: &dyn Fn(&Figures) -> Option<f64>| {
        let comparable = !figure.contains("agents' CPU")
            && !figure.contains("bytes per idle")
            && !figure.contains(" during the ");
        rows.push(Row {
            cross_node: Pair::new(get(cross[0]), get(cross[1]), comparable),
            same_node: Pair::new(get(same[0]), get(same[1]), comparable),
            figure,
        });
    };
    add("bulk, 1 stream (Gbit/s)".into(), &|f| f.bulk1_gbps);
    add("bulk, 4 streams (Gbit/s)".into(), &|f| f.bulk4_gbps);
    let rate = settings.fixed_rate;
    add(format!("1 KiB round trip p50 at {rate}/s (µs)"), &|f| {
        f.fixed.as_ref().map(|l| l.p50_us)
    });
    add(format!("1 KiB round trip p90 at {rate}/s (µs)"), &|f| {
        f.fixed.as_ref().map(|l| l.p90_us)
    });
    add(format!("1 KiB round trip p99 at {rate}/s (µs)"), &|f| {
        f.fixed.as_ref().map(|l| l.p99_us)
    });
    add(
        format!("1 KiB round trip service time p99 at {rate}/s, without queueing (µs)"),
        &|f| f.fixed.as_ref().map(|l| l.service_p99_us),
    );
    add(
        format!(
            "{}-ms windows that stalled during the {rate}/s run",
            load::WINDOW.as_millis()
        ),
        &|f| f.fixed.as_ref().map(|l| l.stalled_windows().count() as f64),
    );
    add(
        format!("CPU stolen by the hypervisor during the {rate}/s run (%)"),
        &|f| f.fixed_steal_percent,
    );
    add(
        format!("agents' run-queue wait per round trip during the {rate}/s run (µs)"),
        &|f| f.fixed_run_queue_wait_us,
    );
    add(
        format!("TCP segments retransmitted in both pods during the {rate}/s run"),
        &|f| f.fixed_tcp.map(|t| t.retransmitted as f64),
    );
    add(
        format!("TCP delayed ACKs in both pods during the {rate}/s run"),
        &|f| f.fixed_tcp.map(|t| t.delayed_acks as f64),
    );
    add("1 KiB round trip p50, full speed (µs)".into(), &|f| {
        f.full.as_ref().map(|l| l.p50_us)
    });
    add("1 KiB round trip p90, full speed (µs)".into(), &|f| {
        f.full.as_ref().map(|l| l.p90_us)
    });
    add("1 KiB round trip p99, full speed (µs)".into(), &|f| {
        f.full.as_ref().map(|l| l.p99_us)
    });
    add("1 KiB round trips/s, full speed".into(), &|f| {
        f.full.as_ref().map(|l| l.round_trips_per_sec)
    });
    add(
        "agents' CPU µs per 1 KiB round trip, full speed (both agents)".into(),
        &|f| f.cpu_us_per_round_trip,
    );
    add("new connections/s, pooled HBONE".into(), &|f| {
        f.conns_pooled
    });
    add("new connections/s, full mTLS handshake each".into(), &|f| {
        f.conns_handshake
    });
    add("agents' CPU s per GiB (both agents)".into(), &|f| {
        f.cpu_s_per_gib
    });
    add(
        "agents' CPU µs per new connection, pooled HBONE (both agents)".into(),
        &|f| f.cpu_us_per_conn_pooled,
    );
    add(
        "agents' CPU µs per new connection, full handshake each (both agents)".into(),
        &|f| f.cpu_us_per_conn_handshake,
    );
    let n = idle.describe();
    add(
        format!("node 1 agent (client side): bytes per idle connection ({n})"),
        &|f| f.per_conn_bytes[0],
    );
    add(
        format!("node 2 agent: bytes per idle connection ({n})"),
        &|f| f.per_conn_bytes[1],
    );
    add(
        "node 1 agent RSS with the idle connections (MiB)".into(),
        &|f| f.rss_with_conns_mib[0],
    );
    add(
        "node 2 agent RSS with the idle connections (MiB)".into(),
        &|f| f.rss_with_conns_mib[1],
    );
    for (i, node) in ["node 1", "node 2"].iter().enumerate() {
        let pair = Pair::new(Some(idle_no_mesh[i] / MIB), Some(idle_mesh[i] / MIB), true);
        rows.push(Row {
            figure: format!("{node} agent idle RSS (MiB; mesh = pods enrolled)"),
            cross_node: pair,
            same_node: pair,
        });
    }
    rows
}

fn aims(report: &Report) -> Vec<Aim> {
    let find = |prefix: &str| report.rows.iter().find(|r| r.figure.starts_with(prefix));
    let mut aims = Vec::new();
    let mut aim = |text: &str, value: Option<f64>, ok: &dyn Fn(f64) -> bool| {
        aims.push(Aim {
            aim: text.into(),
            value,
            met: value.map(ok),
        });
    };
    // The targets of issue #14, each against no mesh measured in the same run.
    aim(
        "agents' CPU per GiB, both agents, cross-node (s) ≤ 1.5",
        find("agents' CPU s per GiB").and_then(|r| r.cross_node.mesh),
        &|v| v <= 1.5,
    );
    let bulk1 = find("bulk, 1 stream").map(|r| r.cross_node);
    let bulk4 = find("bulk, 4 streams").map(|r| r.cross_node);
    aim(
        "cross-node bulk, 1 stream, mesh / no mesh ≥ 0.50",
        bulk1.and_then(|p| p.ratio()),
        &|v| v >= 0.50,
    );
    aim(
        "cross-node bulk with the mesh, 4 streams / 1 stream ≥ 1.00",
        bulk4
            .and_then(|p| p.mesh)
            .zip(bulk1.and_then(|p| p.mesh))
            .map(|(four, one)| four / one),
        &|v| v >= 1.0,
    );
    let full_p50 = find("1 KiB round trip p50, full speed").map(|r| r.cross_node);
    aim(
        "cross-node p50 added per round trip (µs, full speed) ≤ 60",
        full_p50.and_then(|p| Some(p.mesh? - p.no_mesh?)),
        &|v| v <= 60.0,
    );
    aim(
        "cross-node new connections/s, pooled, mesh / no mesh ≥ 0.50",
        find("new connections/s, pooled").and_then(|r| r.cross_node.ratio()),
        &|v| v >= 0.50,
    );
    aim(
        "cross-node new connections/s, full handshake each ≥ 2000",
        find("new connections/s, full").and_then(|r| r.cross_node.mesh),
        &|v| v >= 2000.0,
    );
    let per_conn = [
        find("node 1 agent (client side): bytes").and_then(|r| r.cross_node.mesh),
        find("node 2 agent: bytes").and_then(|r| r.cross_node.mesh),
    ];
    aim(
        "bytes per idle proxied connection, per agent (larger of the two, cross-node) ≤ 3072",
        per_conn[0].zip(per_conn[1]).map(|(a, b)| a.max(b)),
        &|v| v <= 3072.0,
    );
    let idle = [
        find("node 1 agent idle RSS").and_then(|r| r.cross_node.mesh),
        find("node 2 agent idle RSS").and_then(|r| r.cross_node.mesh),
    ];
    aim(
        "agent idle RSS, pods enrolled (MiB, larger of the two) ≤ 15 MB (14.3 MiB)",
        idle[0].zip(idle[1]).map(|(a, b)| a.max(b)),
        &|v| v * MIB <= 15e6,
    );
    aims
}

/// CPU model, cores, memory and kernel, for the report.
pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / MIB);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

/// One aim over repeated runs of the testbed part (`ambit-bench --repeat N`): this VM moves
/// single runs by ±15–25 %, so commits are compared on medians and spreads, not one run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AimSpread {
    pub aim: String,
    pub runs: usize,
    pub min: Option<f64>,
    pub median: Option<f64>,
    pub max: Option<f64>,
    /// In how many of the runs the aim was met.
    pub met_in: usize,
}

/// One floor over repeated runs: it moves with the machine, so it tells which runs of two
/// agents were made in the same state of it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FloorSpread {
    pub figure: String,
    pub runs: usize,
    pub min: Option<f64>,
    pub median: Option<f64>,
    pub max: Option<f64>,
}

/// The aims over repeated runs, with what was measured and where.
#[derive(Clone, Debug, Serialize)]
pub struct Spread {
    pub machine: String,
    pub agent_binary: PathBuf,
    pub settings: Option<Settings>,
    pub aims: Vec<AimSpread>,
    pub floors: Vec<FloorSpread>,
}

impl Spread {
    pub fn of(reports: &[Report]) -> Self {
        let first = reports.first();
        Self {
            machine: first.map(|r| r.machine.clone()).unwrap_or_default(),
            agent_binary: first.map(|r| r.agent_binary.clone()).unwrap_or_default(),
            settings: first.map(|r| r.settings.clone()),
            aims: aim_spread(reports),
            floors: floor_spread(reports),
        }
    }

    /// The aims as a Markdown table.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| aim | min | median | max | met in |\n| --- | ---: | ---: | ---: | ---: |\n",
        );
        for a in &self.aims {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} of {} |\n",
                a.aim,
                cell(a.min),
                cell(a.median),
                cell(a.max),
                a.met_in,
                a.runs
            ));
        }
        s.push_str("\n| floor | min | median | max |\n| --- | ---: | ---: | ---: |\n");
        for f in &self.floors {
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                f.figure,
                cell(f.min),
                cell(f.median),
                cell(f.max)
            ));
        }
        s
    }
}

/// Each aim's spread over the runs (aims matched by name; a run without a value for one
/// counts in `runs` but not in the figures).
fn aim_spread(reports: &[Report]) -> Vec<AimSpread> {
    let Some(first) = reports.first() else {
        return Vec::new();
    };
    first
        .aims
        .iter()
        .map(|aim| {
            let of_this = || {
                reports
                    .iter()
                    .filter_map(|r| r.aims.iter().find(|a| a.aim == aim.aim))
            };
            let (min, median, max) = min_median_max(of_this().filter_map(|a| a.value).collect());
            AimSpread {
                aim: aim.aim.clone(),
                runs: reports.len(),
                min,
                median,
                max,
                met_in: of_this().filter(|a| a.met == Some(true)).count(),
            }
        })
        .collect()
}

/// Each floor's spread over the runs, matched by name like the aims.
fn floor_spread(reports: &[Report]) -> Vec<FloorSpread> {
    let Some(first) = reports.first() else {
        return Vec::new();
    };
    first
        .floors
        .iter()
        .map(|floor| {
            let values = reports
                .iter()
                .filter_map(|r| r.floors.iter().find(|f| f.figure == floor.figure))
                .filter_map(|f| f.value)
                .collect();
            let (min, median, max) = min_median_max(values);
            FloorSpread {
                figure: floor.figure.clone(),
                runs: reports.len(),
                min,
                median,
                max,
            }
        })
        .collect()
}

/// Two agents' runs made alternately (`ambit-bench --against`), compared pair by pair: an
/// hour in which this VM is slow slows both runs of a pair, so their ratio holds where the
/// figures themselves move by a quarter.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub baseline: PathBuf,
    pub candidate: PathBuf,
    pub pairs: usize,
    pub aims: Vec<AimComparison>,
}

/// One aim of a [`Comparison`].
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AimComparison {
    pub aim: String,
    pub baseline_median: Option<f64>,
    pub candidate_median: Option<f64>,
    /// The median over the pairs of candidate / baseline.
    pub median_ratio: Option<f64>,
    /// Pairs in which the candidate did better: lower for a "≤" aim, higher for a "≥" one.
    pub candidate_better_in: usize,
    /// Pairs with a value on both sides.
    pub pairs_with_both: usize,
}

impl Comparison {
    /// `baseline[i]` and `candidate[i]` are the i-th pair; aims matched by name.
    pub fn of(baseline: &[Report], candidate: &[Report]) -> Self {
        let name = |reports: &[Report]| {
            reports
                .first()
                .map(|r| r.agent_binary.clone())
                .unwrap_or_default()
        };
        let aims = baseline.first().map_or_else(Vec::new, |first| {
            first
                .aims
                .iter()
                .map(|aim| {
                    let value = |r: &Report| {
                        r.aims
                            .iter()
                            .find(|a| a.aim == aim.aim)
                            .and_then(|a| a.value)
                    };
                    let both: Vec<(f64, f64)> = baseline
                        .iter()
                        .zip(candidate)
                        .filter_map(|(b, c)| Some((value(b)?, value(c)?)))
                        .collect();
                    let lower_is_better = aim.aim.contains('≤');
                    let (_, median_ratio, _) = min_median_max(
                        both.iter()
                            .filter(|(b, _)| *b != 0.0)
                            .map(|(b, c)| c / b)
                            .collect(),
                    );
                    AimComparison {
                        aim: aim.aim.clone(),
                        baseline_median: min_median_max(
                            baseline.iter().filter_map(value).collect(),
                        )
                        .1,
                        candidate_median: min_median_max(
                            candidate.iter().filter_map(value).collect(),
                        )
                        .1,
                        median_ratio,
                        candidate_better_in: both
                            .iter()
                            .filter(|(b, c)| if lower_is_better { c < b } else { c > b })
                            .count(),
                        pairs_with_both: both.len(),
                    }
                })
                .collect()
        });
        Self {
            baseline: name(baseline),
            candidate: name(candidate),
            pairs: baseline.len().min(candidate.len()),
            aims,
        }
    }

    /// The comparison as a Markdown table.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "baseline {}, candidate {}, {} pairs\n\n\
             | aim | baseline, median | candidate, median | candidate / baseline, median of pairs | candidate better in |\n\
             | --- | ---: | ---: | ---: | ---: |\n",
            self.baseline.display(),
            self.candidate.display(),
            self.pairs
        );
        for a in &self.aims {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} of {} |\n",
                a.aim,
                cell(a.baseline_median),
                cell(a.candidate_median),
                cell(a.median_ratio),
                a.candidate_better_in,
                a.pairs_with_both
            ));
        }
        s
    }
}

fn min_median_max(mut values: Vec<f64>) -> (Option<f64>, Option<f64>, Option<f64>) {
    values.sort_by(f64::total_cmp);
    let median = match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[n / 2]),
        n => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    };
    (values.first().copied(), median, values.last().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(aims: &[(&str, Option<f64>, Option<bool>)]) -> Report {
        Report {
            settings: Settings::quick(),
            idle_connections: IdleCounts::new(10, 1024),
            nofile_limit: 1024,
            agent_binary: PathBuf::from("ambit"),
            machine: "test".into(),
            rows: Vec::new(),
            aims: aims
                .iter()
                .map(|&(aim, value, met)| Aim {
                    aim: aim.into(),
                    value,
                    met,
                })
                .collect(),
            floors: Vec::new(),
            stalls: Vec::new(),
            steal_percent: None,
        }
    }

    #[test]
    fn spread_takes_min_median_max_and_counts_runs_that_met_each_aim() {
        let runs = [
            report(&[
                ("cpu", Some(2.0), Some(false)),
                ("bulk", Some(0.4), Some(false)),
            ]),
            report(&[("cpu", Some(1.4), Some(true)), ("bulk", None, None)]),
            report(&[
                ("cpu", Some(1.8), Some(false)),
                ("bulk", Some(0.6), Some(true)),
            ]),
            report(&[
                ("cpu", Some(1.5), Some(true)),
                ("bulk", Some(0.5), Some(true)),
            ]),
        ];
        let spread = Spread::of(&runs);
        assert_eq!(
            spread.aims,
            vec![
                AimSpread {
                    aim: "cpu".into(),
                    runs: 4,
                    min: Some(1.4),
                    median: Some(1.65),
                    max: Some(2.0),
                    met_in: 2,
                },
                AimSpread {
                    aim: "bulk".into(),
                    runs: 4,
                    min: Some(0.4),
                    median: Some(0.5),
                    max: Some(0.6),
                    met_in: 2,
                },
            ]
        );
        let table = spread.markdown();
        assert!(
            table.contains("| cpu | 1.40 | 1.65 | 2.00 | 2 of 4 |"),
            "{table}"
        );
        assert!(aim_spread(&[]).is_empty());
    }

    #[test]
    fn comparison_goes_pair_by_pair_and_knows_which_way_is_better() {
        let cpu = "CPU (s) ≤ 1.5";
        let rate = "rate ≥ 2000";
        let run = |c: f64, r: Option<f64>| report(&[(cpu, Some(c), None), (rate, r, None)]);
        // The machine slows down between the first and the second pair; within each pair
        // the candidate uses less CPU and reaches a higher rate, except the last rate.
        let baseline = [
            run(2.0, Some(1000.0)),
            run(4.0, Some(500.0)),
            run(3.0, None),
        ];
        let candidate = [
            run(1.8, Some(1100.0)),
            run(3.6, Some(450.0)),
            run(2.7, Some(9.0)),
        ];
        let comparison = Comparison::of(&baseline, &candidate);
        assert_eq!(comparison.pairs, 3);
        let [cpu_row, rate_row] = comparison.aims.as_slice() else {
            panic!("two aims: {comparison:?}");
        };
        assert_eq!(cpu_row.candidate_better_in, 3);
        assert_eq!(cpu_row.pairs_with_both, 3);
        let ratio = cpu_row.median_ratio.expect("a ratio");
        assert!((ratio - 0.9).abs() < 1e-9, "{ratio}");
        assert_eq!(cpu_row.baseline_median, Some(3.0));
        assert_eq!(
            rate_row.pairs_with_both, 2,
            "a pair without a value is left out"
        );
        assert_eq!(rate_row.candidate_better_in, 1);
        assert_eq!(rate_row.candidate_median, Some(450.0));
        let table = comparison.markdown();
        assert!(
            table.contains("| CPU (s) ≤ 1.5 | 3.00 | 2.70 | 0.90 | 3 of 3 |"),
            "{table}"
        );
    }

    #[test]
    fn spread_carries_each_floor_by_name() {
        let floor = |value: Option<f64>| Floor {
            figure: "crypto".into(),
            value,
            beside: "handshakes".into(),
        };
        let runs: Vec<Report> = [Some(249.0), Some(355.0), None, Some(250.0)]
            .into_iter()
            .map(|value| Report {
                floors: vec![floor(value)],
                ..report(&[])
            })
            .collect();
        let spread = Spread::of(&runs);
        assert_eq!(
            spread.floors,
            vec![FloorSpread {
                figure: "crypto".into(),
                runs: 4,
                min: Some(249.0),
                median: Some(250.0),
                max: Some(355.0),
            }]
        );
        assert!(
            spread.markdown().contains("| crypto | 249 | 250 | 355 |"),
            "{}",
            spread.markdown()
        );
    }
}
