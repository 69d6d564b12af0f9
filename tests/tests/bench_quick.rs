//! Privileged: the testbed benchmark still runs. Quick settings, and only the presence of
//! every figure is checked — never a speed (this machine is shared and noisy).

#[test]
fn quick_testbed_bench_produces_every_figure() -> anyhow::Result<()> {
    let report = ambit_e2e::bench::run(&ambit_e2e::bench::Settings::quick())?;
    eprintln!("{}", report.markdown());
    let missing = report.missing();
    assert!(missing.is_empty(), "figures not produced: {missing:?}");
    assert_eq!(report.aims.len(), 8, "every aim compared");
    Ok(())
}

#[test]
fn quick_kubernetes_bench_produces_every_figure() -> anyhow::Result<()> {
    let report = ambit_e2e::bench::kube::run(&ambit_e2e::bench::kube::KubeSettings::quick())?;
    eprintln!("{}", report.markdown());
    let missing = report.missing();
    assert!(missing.is_empty(), "figures not produced: {missing:?}");
    Ok(())
}

#[test]
fn quick_control_plane_bench_produces_every_figure() -> anyhow::Result<()> {
    let settings = ambit_e2e::bench::control_plane::ControlPlaneSettings::quick();
    let report = ambit_e2e::bench::control_plane::run(&settings)?;
    eprintln!("{}", report.markdown());
    let missing = report.missing();
    assert!(missing.is_empty(), "figures not produced: {missing:?}");
    assert_eq!(report.rows.len(), 4, "p50 and p99 of both latencies");
    assert_eq!(report.phases.len(), 3, "quiet, enrolling pods, scraping");
    Ok(())
}

#[test]
fn quick_scale_curves_produce_every_figure_and_the_plot() -> anyhow::Result<()> {
    use ambit_e2e::bench::scale;
    let settings = scale::ScaleSettings::quick();
    let report = scale::run(&settings)?;
    eprintln!("{}", report.markdown());
    let missing = report.missing();
    assert!(missing.is_empty(), "figures not produced: {missing:?}");
    let held: Vec<usize> = report.held.iter().map(|p| p.connections).collect();
    assert_eq!(held, settings.connections, "every held-connections point");
    assert_eq!(report.connect.len(), settings.clients.len());
    assert_eq!(report.bulk.len(), settings.streams.len());
    let (json, png) = scale::write(&report)?;
    let parsed: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    assert_eq!(
        parsed["held"].as_array().map(Vec::len),
        Some(settings.connections.len())
    );
    let (width, height) = scale::check_png(&png)?;
    assert_eq!((width, height), (1600, 1200));
    Ok(())
}

#[test]
fn quick_soak_keeps_every_connection_and_produces_every_figure() -> anyhow::Result<()> {
    let report = ambit_e2e::bench::soak::run(&ambit_e2e::bench::soak::SoakSettings::quick())?;
    eprintln!("{}", report.markdown());
    let missing = report.missing();
    assert!(missing.is_empty(), "figures not produced: {missing:?}");
    assert_eq!(
        (report.new_errors.total(), report.held_errors.total()),
        (0, 0),
        "failed connections: new {:?}, held {:?}",
        report.new_errors,
        report.held_errors
    );
    assert_eq!(report.held_verified, report.settings.held);
    assert_eq!(report.new_ok, report.new_attempted);
    Ok(())
}
