//! `cargo xtask bench`'s testbed parts: the mesh's cost against no mesh on the two-node
//! testbed, the data path under control-plane load, the scale curves, the soak, and the
//! Kubernetes mode against the fake API server. Needs root. `--quick` runs the smoke-sized
//! settings; `--testbed-only`, `--kubernetes-only`, `--control-plane-only`, `--scale-only`
//! and `--soak-only` run one part. Use a release agent (`AMBIT_BIN=target/release/ambit`, as
//! xtask does): the figures are about the agent.

use std::fmt::Debug;
use std::path::Path;
use std::time::Instant;

use ambit_e2e::bench::{control_plane, kube, scale, soak};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let quick = flag("--quick");
    if !ambit_e2e::is_root() {
        anyhow::bail!(
            "the testbed benchmark creates network namespaces and loads eBPF: run it as root"
        );
    }
    if flag("--testbed-only") {
        return testbed(quick);
    }
    if flag("--kubernetes-only") {
        return kubernetes(quick);
    }
    if flag("--control-plane-only") {
        return control_plane(quick);
    }
    if flag("--scale-only") {
        return scale(quick);
    }
    if flag("--soak-only") {
        return soak(quick);
    }
    testbed(quick)?;
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

fn testbed(quick: bool) -> anyhow::Result<()> {
    let settings = if quick {
        ambit_e2e::bench::Settings::quick()
    } else {
        ambit_e2e::bench::Settings::full()
    };
    let started = Instant::now();
    let report = ambit_e2e::bench::run(&settings)?;
    let path = ambit_e2e::bench::write(&report)?;
    show(
        format!(
            "Testbed benchmark ({}; agent {}; {:.0?})",
            report.machine,
            report.agent_binary.display(),
            started.elapsed()
        ),
        report.markdown(),
        &[("JSON", &path)],
        &report.missing(),
    )
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
