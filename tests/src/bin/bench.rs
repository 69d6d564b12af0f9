//! `cargo xtask bench`'s testbed parts: the mesh's cost against no mesh on the two-node
//! testbed, the data path under control-plane load, the scale curves, the soak, and the
//! Kubernetes mode against the fake API server. Needs root. `--quick` runs the smoke-sized
//! settings; `--testbed-only`, `--kubernetes-only`, `--control-plane-only`, `--scale-only`
//! and `--soak-only` run one part. For the testbed part only: `--repeat N` runs it N times
//! and adds each aim's min, median and max over the runs (`target/bench/testbed-spread.json`;
//! also `cargo xtask bench --repeat N`), `--agent-workers N` gives its agents N data-path
//! threads instead of their default, `--against BIN` runs a second agent binary alternately
//! with the first (A B, B A, … for N pairs) and compares each aim pair by pair
//! (`target/bench/testbed-compare.json`). Use a release agent
//! (`AMBIT_BIN=target/release/ambit`, as xtask does): the figures are about the agent.

use std::fmt::Debug;
use std::path::Path;
use std::time::Instant;

use ambit_e2e::bench::{control_plane, kube, scale, soak};

/// `cargo xtask bench`'s testbed parts; all of them without a `--…-only`. Needs root; use a
/// release agent (`AMBIT_BIN=target/release/ambit`).
#[derive(clap::Parser)]
#[command(name = "ambit-bench")]
struct Args {
    /// Smoke-sized settings.
    #[arg(long)]
    quick: bool,
    /// Only the mesh against no mesh on the testbed.
    #[arg(long, group = "part")]
    testbed_only: bool,
    /// Only Kubernetes mode against the fake API server.
    #[arg(long, group = "part")]
    kubernetes_only: bool,
    /// Only the data path under control-plane load.
    #[arg(long, group = "part")]
    control_plane_only: bool,
    /// Only the scale curves.
    #[arg(long, group = "part")]
    scale_only: bool,
    /// Only the soak.
    #[arg(long, group = "part")]
    soak_only: bool,
    /// Testbed part: runs it N times and writes each aim's min, median and max.
    #[arg(long, value_name = "N", default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Testbed part: N data-path threads per agent instead of their default.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    agent_workers: Option<u16>,
    /// Testbed part: a second agent binary, run alternately with the first ($AMBIT_BIN)
    /// --repeat times each and compared pair by pair.
    #[arg(long, value_name = "BIN")]
    against: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    if !ambit_e2e::is_root() {
        anyhow::bail!(
            "the testbed benchmark creates network namespaces and loads eBPF: run it as root"
        );
    }
    let quick = args.quick;
    let agent_workers = args.agent_workers.map(usize::from);
    let repeat = usize::try_from(args.repeat)?;
    if let Some(candidate) = args.against {
        anyhow::ensure!(
            args.testbed_only,
            "--against compares the testbed part: add --testbed-only"
        );
        return compare(quick, agent_workers, repeat, candidate);
    }
    if args.testbed_only {
        return testbed(quick, agent_workers, repeat);
    }
    if args.kubernetes_only {
        return kubernetes(quick);
    }
    if args.control_plane_only {
        return control_plane(quick);
    }
    if args.scale_only {
        return scale(quick);
    }
    if args.soak_only {
        return soak(quick);
    }
    testbed(quick, agent_workers, repeat)?;
    control_plane(quick)?;
    scale(quick)?;
    soak(quick)?;
    kubernetes(quick)
}

/// Prints one part's heading, table and output files; fails when a figure is missing.
fn show(
    heading: String,
    markdown: String,
    files: &[(&str, &Path)],
    missing: &[impl Debug],
) -> anyhow::Result<()> {
    println!("\n{heading}:\n");
    println!("{markdown}");
    for (what, path) in files {
        println!("{what}: {}", path.display());
    }
    if !missing.is_empty() {
        anyhow::bail!("{heading}: figures not produced: {missing:?}");
    }
    Ok(())
}

fn testbed_settings(quick: bool, agent_workers: Option<usize>) -> ambit_e2e::bench::Settings {
    let mut settings = if quick {
        ambit_e2e::bench::Settings::quick()
    } else {
        ambit_e2e::bench::Settings::full()
    };
    settings.agent_worker_threads = agent_workers;
    settings
}

/// A figure missing in one run is reported once all runs are done, not fatal then.
fn no_gaps(gaps: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(
        gaps.is_empty(),
        "testbed benchmark: figures not produced: {gaps:?}"
    );
    Ok(())
}

fn testbed(quick: bool, agent_workers: Option<usize>, repeat: usize) -> anyhow::Result<()> {
    let settings = testbed_settings(quick, agent_workers);
    let mut reports = Vec::with_capacity(repeat);
    let mut gaps = Vec::new();
    for run in 1..=repeat {
        let started = Instant::now();
        let report = ambit_e2e::bench::run(&settings)?;
        let path = ambit_e2e::bench::write(&report)?;
        let mut files = vec![("JSON", path)];
        if repeat > 1 {
            files.push((
                "this run's JSON",
                ambit_e2e::bench::write_json(&format!("testbed-run{run}.json"), &report)?,
            ));
        }
        let files: Vec<(&str, &Path)> = files.iter().map(|(w, p)| (*w, p.as_path())).collect();
        let heading = format!(
            "Testbed benchmark, run {run} of {repeat} ({}; agent {}, worker threads: {}; {:.0?}; \
             CPU stolen by the hypervisor: {} %)",
            report.machine,
            report.agent_binary.display(),
            report
                .settings
                .agent_worker_threads
                .map_or_else(|| "the agent's default".to_owned(), |n| n.to_string()),
            started.elapsed(),
            ambit_e2e::bench::cell(report.steal_percent),
        );
        // A gap in one run must not throw the other runs away: reported after the spread.
        let missing = report.missing();
        show(heading, report.markdown(), &files, &Vec::<String>::new())?;
        if !missing.is_empty() {
            gaps.push(format!("run {run}: {missing:?}"));
        }
        reports.push(report);
    }
    if repeat > 1 {
        let spread = ambit_e2e::bench::Spread::of(&reports);
        let path = ambit_e2e::bench::write_json("testbed-spread.json", &spread)?;
        show(
            format!("Testbed aims over {repeat} runs"),
            spread.markdown(),
            &[("JSON", &path)],
            &Vec::<String>::new(),
        )?;
    }
    no_gaps(&gaps)
}

/// `--against`: pairs of runs, the baseline ($AMBIT_BIN) and the candidate alternating
/// which goes first, so that a drift of the machine during a pair favours neither.
fn compare(
    quick: bool,
    agent_workers: Option<usize>,
    pairs: usize,
    candidate: std::path::PathBuf,
) -> anyhow::Result<()> {
    let mut settings = testbed_settings(quick, agent_workers);
    let binaries = [ambit_e2e::testbed::agent_binary()?, candidate];
    let mut reports: [Vec<ambit_e2e::bench::Report>; 2] = [Vec::new(), Vec::new()];
    let mut gaps = Vec::new();
    for pair in 1..=pairs {
        let order = if pair % 2 == 1 { [0, 1] } else { [1, 0] };
        for side in order {
            settings.agent_binary = Some(binaries[side].clone());
            let started = Instant::now();
            let report = ambit_e2e::bench::run(&settings)?;
            let name = ["baseline", "candidate"][side];
            let path =
                ambit_e2e::bench::write_json(&format!("testbed-pair{pair}-{name}.json"), &report)?;
            show(
                format!(
                    "Testbed benchmark, pair {pair} of {pairs}, {name} {} ({:.0?}; CPU stolen \
                     by the hypervisor: {} %)",
                    report.agent_binary.display(),
                    started.elapsed(),
                    ambit_e2e::bench::cell(report.steal_percent),
                ),
                report.markdown(),
                &[("JSON", &path)],
                &Vec::<String>::new(),
            )?;
            let missing = report.missing();
            if !missing.is_empty() {
                gaps.push(format!("pair {pair}, {name}: {missing:?}"));
            }
            reports[side].push(report);
        }
    }
    let comparison = ambit_e2e::bench::Comparison::of(&reports[0], &reports[1]);
    let path = ambit_e2e::bench::write_json("testbed-compare.json", &comparison)?;
    show(
        format!("Testbed aims, candidate against baseline over {pairs} pairs"),
        comparison.markdown(),
        &[("JSON", &path)],
        &Vec::<String>::new(),
    )?;
    no_gaps(&gaps)
}

fn control_plane(quick: bool) -> anyhow::Result<()> {
    let settings = if quick {
        control_plane::ControlPlaneSettings::quick()
    } else {
        control_plane::ControlPlaneSettings::full()
    };
    let report = control_plane::run(&settings)?;
    let path = control_plane::write(&report)?;
    show(
        format!(
            "Data path under control-plane load ({}; agent {})",
            report.machine,
            report.agent_binary.display()
        ),
        report.markdown(),
        &[("JSON", &path)],
        &report.missing(),
    )
}

fn scale(quick: bool) -> anyhow::Result<()> {
    let settings = if quick {
        scale::ScaleSettings::quick()
    } else {
        scale::ScaleSettings::full()
    };
    let started = Instant::now();
    let report = scale::run(&settings)?;
    let (json, png) = scale::write(&report)?;
    show(
        format!(
            "Scale curves ({}; agent {}; {:.0?})",
            report.machine,
            report.agent_binary.display(),
            started.elapsed()
        ),
        report.markdown(),
        &[("JSON", &json), ("Plot", &png)],
        &report.missing(),
    )?;
    scale::check_png(&png)?;
    Ok(())
}

fn soak(quick: bool) -> anyhow::Result<()> {
    let settings = if quick {
        soak::SoakSettings::quick()
    } else {
        soak::SoakSettings::full()
    };
    let started = Instant::now();
    let report = soak::run(&settings)?;
    let path = soak::write(&report)?;
    show(
        format!(
            "Soak ({}; agent {}; {:.0?})",
            report.machine,
            report.agent_binary.display(),
            started.elapsed()
        ),
        report.markdown(),
        &[("JSON", &path)],
        &report.missing(),
    )
}

fn kubernetes(quick: bool) -> anyhow::Result<()> {
    let settings = if quick {
        kube::KubeSettings::quick()
    } else {
        kube::KubeSettings::full()
    };
    let report = kube::run(&settings)?;
    let path = kube::write(&report)?;
    show(
        "Kubernetes mode (fake API server)".to_owned(),
        report.markdown(),
        &[("JSON", &path)],
        &report.missing(),
    )
}
