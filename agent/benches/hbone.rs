//! HBONE micro-benchmark on loopback: bulk throughput and 1 KiB round-trip latency through
//! outbound + inbound (two TLS ends, HTTP/2 CONNECT), against direct TCP measured in the same
//! run. `cargo xtask bench` runs it; `AMBIT_BENCH_QUICK=1` shrinks it to a smoke run.
//!
//! Written by hand (no criterion): the figures wanted are one-shot throughput and latency
//! percentiles of a network path, reported as ratios to a same-run baseline.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_agent::identity::{CertManager, LocalCa, SpiffeId};
use ambit_agent::tunnel::{
    AllowAll, CopyStats, DirectDialer, Inbound, Listener, LocalWorkload, LocalWorkloads, Metrics,
    Outbound, OutboundRequest, TunnelConfig,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const MSG: usize = 1024;

struct Sizes {
    bulk_bytes: usize,
    rtt_iterations: usize,
    connections: usize,
}

struct Workloads {
    by_ip: HashMap<IpAddr, LocalWorkload>,
    /// The bench's workloads never change (the agent's epoch is its mesh state, replaced
    /// on every change).
    epoch: Arc<dyn std::any::Any + Send + Sync>,
}

impl LocalWorkloads for Workloads {
    fn by_ip(&self, ip: IpAddr) -> Option<LocalWorkload> {
        self.by_ip.get(&ip).cloned()
    }

    fn describe_epoch(&self) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        Some(self.epoch.clone())
    }
}

fn id(sa: &str) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::new("cluster.local", "bench", sa)?)
}

/// Discards what it reads, then answers one byte when the client half-closes: the client
/// times bulk transfer up to that byte, so the figure includes draining the pipe.
async fn spawn_sink() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.write_all(b"k").await;
            });
        }
    });
    Ok(addr)
}

/// Echoes fixed-size messages.
async fn spawn_echo() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; MSG];
                while s.read_exact(&mut buf).await.is_ok() {
                    if s.write_all(&buf).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

async fn bulk(mut stream: TcpStream, total: usize) -> anyhow::Result<f64> {
    let chunk = vec![0xA5u8; 256 * 1024];
    let start = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).await?;
        left -= n;
    }
    stream.shutdown().await?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).await?;
    Ok(total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
}

async fn round_trips(mut stream: TcpStream, iterations: usize) -> anyhow::Result<Vec<Duration>> {
    stream.set_nodelay(true)?;
    let msg = [7u8; MSG];
    let mut back = [0u8; MSG];
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let start = Instant::now();
        stream.write_all(&msg).await?;
        stream.read_exact(&mut back).await?;
        // The first tenth warms up (pool, windows, caches) and is not recorded.
        if i >= iterations / 10 {
            samples.push(start.elapsed());
        }
    }
    samples.sort();
    Ok(samples)
}

/// `AMBIT_BENCH_AGENT=1`: the per-connection work the agent adds around the tunnel, so an
/// instruction count sees it: its log subscriber at `info` (access-log lines formatted as
/// the agent formats them, written nowhere) and the inbound side's metrics.
fn agent_like() -> bool {
    std::env::var("AMBIT_BENCH_AGENT").is_ok_and(|v| v == "1")
}

fn install_agent_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (filter, _reload) =
        tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink))
        .init();
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// User + system CPU time of this process so far (from /proc: no unsafe in a bench).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let ticks: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse().ok())
        .collect();
    // USER_HZ is 100 on every Linux ABI the agent targets.
    ticks.iter().sum::<f64>() / 100.0
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

struct Mesh {
    outbound: Arc<Outbound>,
    hbone_addr: SocketAddr,
}

impl Mesh {
    async fn start(pooling: bool) -> anyhow::Result<Self> {
        let ca = Arc::new(LocalCa::generate()?);
        let ttl = Duration::from_secs(3600);
        let workloads = Arc::new(Workloads {
            by_ip: HashMap::from([(
                LOCALHOST,
                LocalWorkload {
                    name: "server".into(),
                    namespace: "bench".into(),
                    identity: id("server")?,
                },
            )]),
            epoch: Arc::new(()),
        });
        let mut inbound = Inbound::new(
            CertManager::new(ca.clone(), ttl),
            workloads,
            Arc::new(AllowAll),
            Arc::new(DirectDialer),
            TunnelConfig::default(),
            false,
        );
        if agent_like() {
            let mut registry = prometheus_client::registry::Registry::default();
            inbound = inbound.with_metrics(Arc::new(Metrics::new(&mut registry)));
        }
        let inbound = Arc::new(inbound);
        let listener = std::net::TcpListener::bind((LOCALHOST, 0))?;
        // As the agent's HBONE listeners: accepted sockets inherit it.
        socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
        let listener = Listener::from_std(listener)?;
        let hbone_addr = listener.local_addr()?;
        tokio::spawn(inbound.serve(listener));
        let outbound = Arc::new(Outbound::new(
            CertManager::new(ca, ttl),
            Arc::new(DirectDialer),
            TunnelConfig {
                pooling,
                ..TunnelConfig::default()
            },
        ));
        Ok(Self {
            outbound,
            hbone_addr,
        })
    }

    /// A client socket whose bytes go through outbound -> inbound -> `target`.
    async fn connect(&self, target: SocketAddr) -> anyhow::Result<TcpStream> {
        let capture = TcpListener::bind((LOCALHOST, 0)).await?;
        let client = TcpStream::connect(capture.local_addr()?).await?;
        let (accepted, source_addr) = capture.accept().await?;
        // As the agent's outbound listener's options arm every socket it accepts.
        ambit_agent::tunnel::reset_on_close(&accepted);
        let request = OutboundRequest {
            source: id("client")?,
            source_addr,
            source_workload: "client".into(),
            destination: id("server")?,
            hbone_addr: self.hbone_addr,
            original_destination: target,
        };
        let outbound = self.outbound.clone();
        tokio::spawn(async move {
            let _ = outbound
                .proxy(request, accepted, CopyStats::default())
                .await;
        });
        Ok(client)
    }
}

/// Connections per second, one after another, each with one 1 KiB round trip.
async fn connection_rate<F, Fut>(count: usize, mut connect: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<TcpStream>>,
{
    let start = Instant::now();
    for _ in 0..count {
        let mut stream = connect().await?;
        let msg = [1u8; MSG];
        let mut back = [0u8; MSG];
        stream.write_all(&msg).await?;
        stream.read_exact(&mut back).await?;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::var("AMBIT_BENCH_QUICK").is_ok_and(|v| v == "1");
    let sizes = if quick {
        Sizes {
            bulk_bytes: 64 << 20,
            rtt_iterations: 2_000,
            connections: 200,
        }
    } else {
        Sizes {
            bulk_bytes: 2 << 30,
            rtt_iterations: 20_000,
            connections: 3_000,
        }
    };
    // Overrides for instruction-count runs (callgrind): the difference between two sizes is
    // the cost of the extra bytes or connections, free of the setup.
    let mut sizes = sizes;
    if let Some(mib) = env_usize("AMBIT_BENCH_BULK_MIB") {
        sizes.bulk_bytes = mib << 20;
    }
    if let Some(count) = env_usize("AMBIT_BENCH_CONNECTIONS") {
        sizes.connections = count;
    }
    if let Some(count) = env_usize("AMBIT_BENCH_ROUND_TRIPS") {
        sizes.rtt_iterations = count;
    }
    if agent_like() {
        install_agent_logging();
    }
    let sink = spawn_sink().await?;
    let echo = spawn_echo().await?;
    let mesh = Mesh::start(true).await?;
    let unpooled = Mesh::start(false).await?;

    // AMBIT_BENCH_ONLY=bulk,rtt,pooled,handshake runs only those figures (the others print
    // NaN), so a profiler attached to the run sees one workload.
    let only = std::env::var("AMBIT_BENCH_ONLY").ok();
    let runs = |figure: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|f| f == figure))
    };
    let (mut direct_gbps, mut hbone_gbps) = (f64::NAN, f64::NAN);
    let (mut direct_cpu, mut hbone_cpu) = (f64::NAN, f64::NAN);
    if runs("bulk") {
        let gib = sizes.bulk_bytes as f64 / f64::from(1u32 << 30);
        let cpu = process_cpu_seconds();
        direct_gbps = bulk(TcpStream::connect(sink).await?, sizes.bulk_bytes).await?;
        let mid = process_cpu_seconds();
        hbone_gbps = bulk(mesh.connect(sink).await?, sizes.bulk_bytes).await?;
        let end = process_cpu_seconds();
        direct_cpu = (mid - cpu) / gib;
        hbone_cpu = (end - mid) / gib;
    }
    let (mut direct_rtt, mut hbone_rtt) = (Vec::new(), Vec::new());
    if runs("rtt") {
        direct_rtt = round_trips(TcpStream::connect(echo).await?, sizes.rtt_iterations).await?;
        hbone_rtt = round_trips(mesh.connect(echo).await?, sizes.rtt_iterations).await?;
    }
    let direct_cps = if runs("pooled") || runs("handshake") {
        connection_rate(sizes.connections, || async {
            Ok(TcpStream::connect(echo).await?)
        })
        .await?
    } else {
        f64::NAN
    };
    // CPU of the whole process per connection (client, both agents and the echo server),
    // which the shared VM's scheduling does not distort the way it does the rates.
    let per_conn_ms = |start: f64| (process_cpu_seconds() - start) * 1e3 / sizes.connections as f64;
    let (mut pooled_cps, mut pooled_cpu) = (f64::NAN, f64::NAN);
    if runs("pooled") {
        let cpu = process_cpu_seconds();
        pooled_cps = connection_rate(sizes.connections, || mesh.connect(echo)).await?;
        pooled_cpu = per_conn_ms(cpu);
    }
    let (mut handshake_cps, mut handshake_cpu) = (f64::NAN, f64::NAN);
    if runs("handshake") {
        let cpu = process_cpu_seconds();
        handshake_cps = connection_rate(sizes.connections, || unpooled.connect(echo)).await?;
        handshake_cpu = per_conn_ms(cpu);
    }

    let rows = [
        ("bulk throughput (Gbit/s)", direct_gbps, hbone_gbps),
        (
            "bulk CPU of the whole process (s/GiB; both agents in HBONE)",
            direct_cpu,
            hbone_cpu,
        ),
        (
            "1 KiB round trip p50 (µs)",
            percentile(&direct_rtt, 0.5),
            percentile(&hbone_rtt, 0.5),
        ),
        (
            "1 KiB round trip p90 (µs)",
            percentile(&direct_rtt, 0.9),
            percentile(&hbone_rtt, 0.9),
        ),
        (
            "1 KiB round trip p99 (µs)",
            percentile(&direct_rtt, 0.99),
            percentile(&hbone_rtt, 0.99),
        ),
        ("new connections/s, pooled HBONE", direct_cps, pooled_cps),
        (
            "new connections/s, full mTLS handshake each",
            direct_cps,
            handshake_cps,
        ),
        (
            "CPU per connection, whole process (ms; pooled | full handshake)",
            pooled_cpu,
            handshake_cpu,
        ),
    ];
    println!(
        "HBONE loopback micro-benchmark ({} MiB bulk, {} round trips{})",
        sizes.bulk_bytes >> 20,
        sizes.rtt_iterations,
        if quick { ", quick" } else { "" }
    );
    println!("| figure | direct TCP | HBONE | HBONE / direct |");
    println!("| --- | ---: | ---: | ---: |");
    let mut json = Vec::new();
    for (name, direct, hbone) in rows {
        println!(
            "| {name} | {direct:.2} | {hbone:.2} | {:.2} |",
            hbone / direct
        );
        json.push(format!(
            "{{\"figure\":\"{name}\",\"direct\":{direct:.3},\"hbone\":{hbone:.3},\"ratio\":{:.4}}}",
            hbone / direct
        ));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("hbone.json"), format!("[{}]\n", json.join(",")))?;
    Ok(())
}
