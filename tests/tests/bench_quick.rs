//! Privileged: the testbed benchmark still runs. Quick settings, and only the presence of
//! every figure is checked — never a speed (this machine is shared and noisy).

#[test]
fn quick_testbed_bench_produces_every_figure() -> anyhow::Result<()> {
    let report = ambit_e2e::bench::run(&ambit_e2e::bench::Settings::quick())?;
    eprintln!("{}", report.markdown());
    let missing = report.missing();
    assert!(missing.is_empty(), "figures not produced: {missing:?}");
    assert_eq!(report.aims.len(), 5, "every aim compared");
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
