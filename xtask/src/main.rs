//! `cargo xtask …`: the project's two commands (`demo`, `test`), the benchmark, and the
//! setup they all run first so that a fresh machine needs no manual step.

mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "ambit's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (nightly rust-src, bpf-linker, Debian packages).
    Setup,
    /// Run every test: unit tests, clippy, fmt, and the privileged end-to-end suite.
    Test {
        /// Allow running without root: the privileged end-to-end suite is skipped.
        #[arg(long)]
        unprivileged: bool,
    },
    /// Benchmarks: the HBONE loopback micro-benchmark, then the testbed benchmark (mesh
    /// against no mesh on two netns nodes; needs root), both against a baseline in the
    /// same run.
    Bench {
        /// A short run that only checks the benchmark still works.
        #[arg(long)]
        quick: bool,
    },
    /// Two nodes in network namespaces, one agent each: an mTLS call across nodes, what the
    /// wire sees, and a clean teardown.
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = setup::workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup => setup::run(setup::Need::All),
        Task::Test { unprivileged } => test(unprivileged),
        Task::Demo => demo(),
        Task::Bench { quick } => bench(quick),
    }
}

fn test(unprivileged: bool) -> anyhow::Result<()> {
    let privileged = setup::is_root();
    if !privileged && !unprivileged {
        bail!(
            "the end-to-end suite needs root (network namespaces, eBPF). Run as root, or pass \
             --unprivileged to run everything else and skip it"
        );
    }
    setup::run(if privileged {
        setup::Need::All
    } else {
        setup::Need::Build
    })?;
    let started = std::time::Instant::now();
    cargo_cmd(&["fmt", "--all", "--", "--check"])?;
    cargo_cmd(&[
        "clippy",
        "--workspace",
        "--exclude",
        "ambit-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    setup::ebpf_clippy()?;
    cargo_cmd(&[
        "test",
        "--workspace",
        "--exclude",
        "ambit-ebpf",
        "--exclude",
        "ambit-e2e",
    ])?;
    if privileged {
        // The end-to-end suite runs the real agent binary.
        cargo_cmd(&["build", "-p", "ambit-agent", "--bin", "ambit"])?;
        cargo_cmd(&["test", "-p", "ambit-e2e"])?;
    } else {
        eprintln!(
            "xtask: NOT ROOT — the privileged end-to-end suite (tests/) was SKIPPED (--unprivileged)"
        );
    }
    eprintln!("xtask: all checks passed in {:.0?}", started.elapsed());
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    setup::run(setup::Need::All)?;
    cargo_cmd(&["build", "--quiet", "-p", "ambit-agent", "--bin", "ambit"])?;
    cargo_cmd(&["run", "--quiet", "-p", "ambit-e2e", "--bin", "ambit-demo"])
}

fn bench(quick: bool) -> anyhow::Result<()> {
    let privileged = setup::is_root();
    setup::run(if privileged {
        setup::Need::All
    } else {
        setup::Need::Build
    })?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "bench",
            "-p",
            "ambit-agent",
            "--bench",
            "hbone",
            "--bench",
            "policy",
        ])
        .env("AMBIT_BENCH_QUICK", if quick { "1" } else { "" })
        .status()
        .context("running cargo bench")?;
    if !status.success() {
        bail!("benchmark failed ({status})");
    }
    if !privileged {
        eprintln!("xtask: NOT ROOT — the testbed benchmark (namespaces, eBPF) was SKIPPED");
        return Ok(());
    }
    // The figures are the agent's: measure the release build.
    cargo_cmd(&["build", "--release", "-p", "ambit-agent", "--bin", "ambit"])?;
    let agent = setup::workspace_root()?.join("target/release/ambit");
    let mut args = vec![
        "run",
        "--release",
        "--quiet",
        "-p",
        "ambit-e2e",
        "--bin",
        "ambit-bench",
    ];
    if quick {
        args.extend(["--", "--quick"]);
    }
    let status = Command::new(&cargo)
        .args(&args)
        .env("AMBIT_BIN", &agent)
        .status()
        .context("running the testbed benchmark")?;
    if !status.success() {
        bail!("testbed benchmark failed ({status})");
    }
    Ok(())
}

/// Runs cargo with the same toolchain that runs xtask, failing on a non-zero exit.
fn cargo_cmd(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
