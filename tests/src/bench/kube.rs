//! The Kubernetes-mode benchmark: what following a cluster costs the agent, through the
//! project's fake API server. Agent RSS and time to ready with many pods and services in
//! the cluster; time from a namespace label change to all of its pods on this node
//! enrolled; agent CPU while pods elsewhere churn.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use serde::Serialize;

use super::procfs;
use crate::apiserver::{self, ApiServer, Kind};
use crate::testbed::{MESH_NS, PodSpec, Testbed};

const MIB: f64 = 1024.0 * 1024.0;
const WAIT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Serialize)]
pub struct KubeSettings {
    /// Cluster sizes (pods on other nodes) for the RSS and time-to-ready figures.
    pub cluster_pods: Vec<usize>,
    pub cluster_services: usize,
    /// Pods of one namespace on the agent's node, enrolled by one label change.
    pub label_pods: usize,
    /// Pods created and deleted per second elsewhere in the cluster, and for how long.
    pub churn_per_sec: usize,
    pub churn_secs: u64,
}

impl KubeSettings {
    pub fn full() -> Self {
        Self {
            cluster_pods: vec![1_000, 10_000],
            cluster_services: 2_000,
            label_pods: 100,
            churn_per_sec: 100,
            churn_secs: 10,
        }
    }

    pub fn quick() -> Self {
        Self {
            cluster_pods: vec![200],
            cluster_services: 50,
            label_pods: 5,
            churn_per_sec: 20,
            churn_secs: 1,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ScaleFigure {
    pub pods: usize,
    pub services: usize,
    pub ready_ms: f64,
    pub rss_mib: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct KubeReport {
    pub settings: KubeSettings,
    pub scale: Vec<ScaleFigure>,
    /// Label change → each pod enrolled, milliseconds.
    pub label_p50_ms: Option<f64>,
    pub label_p99_ms: Option<f64>,
    pub label_max_ms: Option<f64>,
    /// Agent CPU (percent of one core) while pods churn elsewhere.
    pub churn_cpu_percent: Option<f64>,
    /// `ambit ca` with the largest cluster indexed: its RSS, and how long one certificate
    /// takes as a node agent sees it (key generation, CSR, TokenReview, signing), median.
    pub ca_pods: usize,
    pub ca_rss_mib: Option<f64>,
    pub ca_issue_p50_ms: Option<f64>,
}

impl KubeReport {
    pub fn markdown(&self) -> String {
        let mut s =
            String::from("| cluster | agent ready after | agent RSS |\n| --- | ---: | ---: |\n");
        for f in &self.scale {
            s.push_str(&format!(
                "| {} pods, {} services | {:.0} ms | {:.1} MiB |\n",
                f.pods, f.services, f.ready_ms, f.rss_mib
            ));
        }
        let ms = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.0} ms"));
        s.push_str(&format!(
            "\n| figure | value |\n| --- | ---: |\n\
             | namespace label → {n} pods enrolled, p50 | {} |\n\
             | namespace label → {n} pods enrolled, p99 | {} |\n\
             | namespace label → {n} pods enrolled, max | {} |\n\
             | agent CPU while {c} pods/s churn elsewhere | {} |\n\
             | `ambit ca` RSS with {p} pods indexed | {} |\n\
             | one certificate from `ambit ca` as an agent sees it, p50 | {} |\n",
            ms(self.label_p50_ms),
            ms(self.label_p99_ms),
            ms(self.label_max_ms),
            self.churn_cpu_percent
                .map_or_else(|| "–".to_owned(), |v| format!("{v:.1} % of a core")),
            self.ca_rss_mib
                .map_or_else(|| "–".to_owned(), |v| format!("{v:.1} MiB")),
            self.ca_issue_p50_ms
                .map_or_else(|| "–".to_owned(), |v| format!("{v:.1} ms")),
            n = self.settings.label_pods,
            c = self.settings.churn_per_sec,
            p = self.ca_pods,
        ));
        s
    }

    /// Figures that should have a value and do not.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.scale.len() != self.settings.cluster_pods.len() {
            missing.push("scale");
        }
        if self.label_p99_ms.is_none() {
            missing.push("label change to enrolled");
        }
        if self.churn_cpu_percent.is_none() {
            missing.push("churn CPU");
        }
        if self.ca_rss_mib.is_none() || self.ca_issue_p50_ms.is_none() {
            missing.push("CA figures");
        }
        missing
    }
}

pub fn run(settings: &KubeSettings) -> anyhow::Result<KubeReport> {
    let mut scale = Vec::new();
    for &pods in &settings.cluster_pods {
        scale.push(ready_and_rss(pods, settings.cluster_services)?);
    }
    let (p50, p99, max) = label_to_enrolled(settings.label_pods)?;
    let churn = churn_cpu(settings)?;
    let ca_pods = settings.cluster_pods.iter().copied().max().unwrap_or(0);
    let (ca_rss, ca_issue) = ca_figures(ca_pods)?;
    Ok(KubeReport {
        ca_pods,
        ca_rss_mib: Some(ca_rss),
        ca_issue_p50_ms: Some(ca_issue),
        settings: settings.clone(),
        scale,
        label_p50_ms: Some(p50),
        label_p99_ms: Some(p99),
        label_max_ms: Some(max),
        churn_cpu_percent: Some(churn),
    })
}

/// Fills the API server with `pods` pods (on other nodes, spread over 50 namespaces, half
/// of them opted in) and `services` services with one EndpointSlice each.
fn populate(api: &ApiServer, pods: usize, services: usize) -> anyhow::Result<()> {
    const NAMESPACES: usize = 50;
    for n in 0..NAMESPACES {
        let labels: &[(&str, &str)] = if n % 2 == 0 {
            &[("ambit.dev/mesh", "enabled")]
        } else {
            &[]
        };
        api.create(&apiserver::namespace(&format!("ns{n}"), labels))?;
    }
    for i in 0..pods {
        let ns = format!("ns{}", i % NAMESPACES);
        let ip = format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256);
        api.create(
            &apiserver::pod(&ns, &format!("pod-{i}"))
                .uid(&crate::kubebed::new_uid())
                .node(&format!("other-{}", i % 20))
                .ip(&ip)
                .service_account(&format!("sa-{}", i % 7))
                .label("app", &format!("app-{}", i % 100))
                .label("version", "v1")
                .build(),
        )?;
    }
    for s in 0..services {
        let ns = format!("ns{}", s % NAMESPACES);
        let name = format!("svc-{s}");
        let vip = format!("10.96.{}.{}", s / 256, s % 256);
        let app = format!("app-{}", s % 100);
        api.create(&apiserver::service(
            &ns,
            &name,
            &[("app", &app)],
            &vip,
            &[("http", 80, 8080)],
        ))?;
        let ips: Vec<String> = (0..pods)
            .filter(|i| i % 100 == s % 100 && i % NAMESPACES == s % NAMESPACES)
            .take(10)
            .map(|i| format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256))
            .collect();
        let endpoints: Vec<(&str, bool, Option<&str>)> =
            ips.iter().map(|ip| (ip.as_str(), true, None)).collect();
        api.create(&apiserver::endpoint_slice(
            &ns,
            &format!("{name}-1"),
            &name,
            &endpoints,
            &[("http", 8080)],
        ))?;
    }
    Ok(())
}

/// One agent on a one-node testbed with no local pods, against a cluster of `pods` pods:
/// time from start to ready, and RSS once ready.
fn ready_and_rss(pods: usize, services: usize) -> anyhow::Result<ScaleFigure> {
    let mut bed = Testbed::build(1, &[], Vec::new())?;
    bed.enable_kubernetes()?;
    let api = &bed.kube.as_ref().context("kubernetes mode")?.api;
    populate(api, pods, services)?;
    let started = Instant::now();
    bed.start_agent(0)?;
    let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    // Let the allocator settle after the first build.
    std::thread::sleep(Duration::from_millis(500));
    let rss = procfs::rss_bytes(bed.agent(0).pid())? as f64 / MIB;
    eprintln!(
        "kube bench: {pods} pods, {services} services: ready in {ready_ms:.0} ms, RSS {rss:.1} MiB"
    );
    Ok(ScaleFigure {
        pods,
        services,
        ready_ms,
        rss_mib: rss,
    })
}

/// `n` pods of one namespace on the agent's node; the namespace is labelled once the agent
/// is ready; each pod's delay is read from the agent's `pod enrolled` log timestamp.
fn label_to_enrolled(n: usize) -> anyhow::Result<(f64, f64, f64)> {
    let names: Vec<&'static str> = (0..n)
        .map(|i| &*Box::leak(format!("lp{i}").into_boxed_str()))
        .collect();
    let specs: Vec<PodSpec> = names
        .iter()
        .map(|name| PodSpec::new(name, MESH_NS, 0))
        .collect();
    let mut bed = Testbed::build(1, &specs, Vec::new())?;
    bed.mesh_enabled = false;
    bed.enable_kubernetes()?;
    bed.start_agent(0)?;
    let labelled = SystemTime::now();
    bed.kube
        .as_ref()
        .context("kubernetes mode")?
        .label_namespace(MESH_NS, Some("enabled"))?;
    bed.agent(0).wait_for_logs(&["pod enrolled"], n, WAIT)?;
    let mut delays: Vec<f64> = bed
        .agent(0)
        .logs()
        .iter()
        .filter(|l| l.contains("pod enrolled"))
        .filter_map(|l| log_time(l))
        .filter_map(|t| t.duration_since(labelled).ok())
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    anyhow::ensure!(
        delays.len() == n,
        "read {} of {n} enrollment times",
        delays.len()
    );
    delays.sort_by(f64::total_cmp);
    let pick = |q: f64| delays[((q * (n as f64)).ceil() as usize).clamp(1, n) - 1];
    // Where one enrollment's time goes: all of it, the wait for the capture lock (other
    // pods' enrollments) and the part under it (programs and links), medians over the pods.
    let logs = bed.agent(0).logs();
    let median_field = |field: &str| {
        let mut values: Vec<u64> = logs
            .iter()
            .filter(|l| l.contains("pod enrolled"))
            .filter_map(|l| log_field(l, field))
            .collect();
        values.sort_unstable();
        values.get(values.len() / 2).copied()
    };
    eprintln!(
        "kube bench: label → {n} pods enrolled: p50 {:.0} ms, p99 {:.0} ms \
         (one pod, medians: setup {:?} ms, waiting for the capture lock {:?} ms, \
         capture {:?} ms)",
        pick(0.5),
        pick(0.99),
        median_field("setup_ms"),
        median_field("capture_wait_ms"),
        median_field("capture_ms"),
    );
    Ok((pick(0.5), pick(0.99), delays[n - 1]))
}

/// The number in a `name=123` field of a text log line.
fn log_field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The RFC 3339 timestamp that starts a text log line.
fn log_time(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let nanos: i64 = format!("{frac:0<9}")[..9].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm, proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(SystemTime::UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos as u32))
}

/// Agent CPU while pods elsewhere in the cluster are created and deleted.
fn churn_cpu(settings: &KubeSettings) -> anyhow::Result<f64> {
    let mut bed = Testbed::build(1, &[], Vec::new())?;
    bed.enable_kubernetes()?;
    let api = &bed.kube.as_ref().context("kubernetes mode")?.api;
    populate(api, 1_000, 100)?;
    bed.start_agent(0)?;
    let pid = bed.agent(0).pid();
    let api = &bed.kube.as_ref().context("kubernetes mode")?.api;
    let cpu_before = procfs::cpu_time(pid)?;
    let started = Instant::now();
    let total = settings.churn_per_sec * settings.churn_secs as usize;
    for i in 0..total {
        // Pace: i-th change at i / rate seconds.
        let due = Duration::from_secs_f64(i as f64 / settings.churn_per_sec as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let name = format!("churn-{}", i / 2);
        if i % 2 == 0 {
            api.create(
                &apiserver::pod("ns0", &name)
                    .uid(&crate::kubebed::new_uid())
                    .node("other-1")
                    .ip(&format!("10.200.{}.{}", (i / 2) / 256 % 256, (i / 2) % 256))
                    .service_account("churn")
                    .build(),
            )?;
        } else {
            api.delete_json(Kind::Pod, "ns0", &name)?;
        }
    }
    let elapsed = started.elapsed();
    // The last changes' builds finish.
    std::thread::sleep(Duration::from_millis(200));
    let cpu = procfs::cpu_time(pid)? - cpu_before;
    let percent = 100.0 * cpu.as_secs_f64() / (elapsed + Duration::from_millis(200)).as_secs_f64();
    eprintln!(
        "kube bench: {} pod changes/s for {:.1} s: agent CPU {percent:.1} % of a core",
        settings.churn_per_sec,
        elapsed.as_secs_f64()
    );
    Ok(percent)
}

/// `ambit ca` against a cluster of `pods` pods: RSS once its pod index is synced, and the
/// median time of 20 certificates requested with a node agent's token.
fn ca_figures(pods: usize) -> anyhow::Result<(f64, f64)> {
    use ambit_agent::identity::CertificateAuthority as _;
    let mut bed = Testbed::build(1, &[], Vec::new())?;
    bed.enable_kubernetes()?;
    let kube = bed.kube.as_ref().context("kubernetes mode")?;
    populate(&kube.api, pods, 100)?;
    let node = bed.nodes[0].name.clone();
    kube.api.create(
        &apiserver::pod("ns0", "ca-bench")
            .uid(&crate::kubebed::new_uid())
            .node(&node)
            .ip("10.250.0.1")
            .service_account("bench")
            .build(),
    )?;
    let token_dir = crate::ca::register_node_agents(&bed)?;
    let ca = crate::ca::CaProcess::start_anywhere(&kube.kubeconfig)?;
    let port = ca.addr().port();
    let trust = bed.dir.join("ca-root.pem");
    std::fs::write(&trust, crate::ca::ca_root(&bed)?)?;
    ambit_agent::identity::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new()?;
    let remote = {
        let _context = runtime.enter();
        ambit_agent::identity::RemoteCa::new(ambit_agent::identity::RemoteCaConfig::new(
            format!("https://localhost:{port}"),
            token_dir.join(format!("{node}.token")),
            &trust,
        ))?
    };
    let identity: ambit_agent::identity::SpiffeId =
        "spiffe://cluster.local/ns/ns0/sa/bench".parse()?;
    // The CA answers once its pod index has synced; the first success marks that.
    let deadline = Instant::now() + WAIT;
    while runtime
        .block_on(remote.issue(&identity, Duration::from_secs(3600)))
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "the CA never issued");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss = procfs::rss_bytes(ca.pid())? as f64 / MIB;
    let mut times = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        runtime.block_on(remote.issue(&identity, Duration::from_secs(3600)))?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let p50 = times[times.len() / 2];
    eprintln!(
        "kube bench: ambit ca with {pods} pods: RSS {rss:.1} MiB, certificate p50 {p50:.1} ms"
    );
    Ok((rss, p50))
}

/// Writes `target/bench/kubernetes.json`.
pub fn write(report: &KubeReport) -> anyhow::Result<PathBuf> {
    super::write_json("kubernetes.json", report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_parse_to_the_right_instant() {
        let t = log_time("2026-12-01T03:24:45.219680Z  INFO ambit_agent::app: starting")
            .expect("parses");
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after epoch")
            .as_secs_f64();
        // 2026-12-01T03:24:45.21968Z
        assert!((secs - 1_796_095_485.219_68).abs() < 1e-3, "{secs}");
    }
}
