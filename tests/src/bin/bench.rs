//! `cargo xtask bench`'s testbed part: the mesh's cost against no mesh on the two-node
//! testbed. Needs root. `--quick` runs the smoke-sized settings. Use a release agent
//! (`AMBIT_BIN=target/release/ambit`, as xtask does): the figures are about the agent.
//! `--soak-only` runs just the soak (target/bench/soak.json).

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    if !ambit_e2e::is_root() {
        anyhow::bail!(
            "the testbed benchmark creates network namespaces and loads eBPF: run it as root"
        );
    }
    // `--kubernetes-only`: just the Kubernetes-mode figures.
    let kube_only = std::env::args().any(|a| a == "--kubernetes-only");
    // `--scale-only`: just the scale curves.
    if std::env::args().any(|a| a == "--scale-only") {
        return scale(quick);
    }
    let settings = if quick {
        ambit_e2e::bench::Settings::quick()
    } else {
        ambit_e2e::bench::Settings::full()
    };
    // `--soak-only`: just the soak (held + new connections under certificate rotation).
    let soak_only = std::env::args().any(|a| a == "--soak-only");
    let started = std::time::Instant::now();
    // `--control-plane-only`: just the data path under control-plane load.
    if std::env::args().any(|a| a == "--control-plane-only") {
        return control_plane(quick);
    }
    if soak_only {
        return soak(quick);
    }
    if !kube_only {
        testbed(&settings, started)?;
        control_plane(quick)?;
        scale(quick)?;
        soak(quick)?;
    }
    let kube_settings = if quick {
        ambit_e2e::bench::kube::KubeSettings::quick()
    } else {
        ambit_e2e::bench::kube::KubeSettings::full()
    };
    let kube = ambit_e2e::bench::kube::run(&kube_settings)?;
    let path = ambit_e2e::bench::kube::write(&kube)?;
    println!("\nKubernetes mode (fake API server):\n");
    println!("{}", kube.markdown());
    println!("JSON: {}", path.display());
    let missing = kube.missing();
    if !missing.is_empty() {
        anyhow::bail!("Kubernetes figures not produced: {missing:?}");
    }
    if !kube_only {
        soak(quick)?;
    }
    Ok(())
}

fn soak(quick: bool) -> anyhow::Result<()> {
    let settings = if quick {
        ambit_e2e::bench::soak::SoakSettings::quick()
    } else {
        ambit_e2e::bench::soak::SoakSettings::full()
    };
    let started = std::time::Instant::now();
    let report = ambit_e2e::bench::soak::run(&settings)?;
    let path = ambit_e2e::bench::soak::write(&report)?;
    println!(
        "\nSoak ({}; agent {}; {:.0?}):\n",
        report.machine,
        report.agent_binary.display(),
        started.elapsed()
    );
    println!("{}", report.markdown());
    println!("JSON: {}", path.display());
    let missing = report.missing();
    if !missing.is_empty() {
        anyhow::bail!("soak figures not produced: {missing:?}");
    }
    Ok(())
}

fn testbed(
    settings: &ambit_e2e::bench::Settings,
    started: std::time::Instant,
) -> anyhow::Result<()> {
    let report = ambit_e2e::bench::run(settings)?;
    let path = ambit_e2e::bench::write(&report)?;
    println!(
        "\nTestbed benchmark ({}; agent {}; {:.0?}):\n",
        report.machine,
        report.agent_binary.display(),
        started.elapsed()
    );
    println!("{}", report.markdown());
    println!("JSON: {}", path.display());
    let missing = report.missing();
    if !missing.is_empty() {
        anyhow::bail!("figures not produced: {missing:?}");
    }
    Ok(())
}

fn control_plane(quick: bool) -> anyhow::Result<()> {
    let settings = if quick {
        ambit_e2e::bench::control_plane::ControlPlaneSettings::quick()
    } else {
        ambit_e2e::bench::control_plane::ControlPlaneSettings::full()
    };
    let report = ambit_e2e::bench::control_plane::run(&settings)?;
    let path = ambit_e2e::bench::control_plane::write(&report)?;
    println!(
        "\nData path under control-plane load ({}; agent {}):\n",
        report.machine,
        report.agent_binary.display()
    );
    println!("{}", report.markdown());
    println!("JSON: {}", path.display());
    let missing = report.missing();
    if !missing.is_empty() {
        anyhow::bail!("control-plane figures not produced: {missing:?}");
    }
    Ok(())
}

fn scale(quick: bool) -> anyhow::Result<()> {
    use ambit_e2e::bench::scale;
    let settings = if quick {
        scale::ScaleSettings::quick()
    } else {
        scale::ScaleSettings::full()
    };
    let started = std::time::Instant::now();
    let report = scale::run(&settings)?;
    let (json, png) = scale::write(&report)?;
    println!(
        "\nScale curves ({}; agent {}; {:.0?}):\n",
        report.machine,
        report.agent_binary.display(),
        started.elapsed()
    );
    println!("{}", report.markdown());
    println!("JSON: {}\nPlot: {}", json.display(), png.display());
    let missing = report.missing();
    if !missing.is_empty() {
        anyhow::bail!("scale figures not produced: {missing:?}");
    }
    scale::check_png(&png)?;
    Ok(())
}
