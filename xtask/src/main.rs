//! `cargo xtask …`: the project's two commands (`demo`, `test`), the benchmark, fuzzing, and
//! the setup they all run first so that a fresh machine needs no manual step.

mod cluster;
mod fuzz;
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
    /// Install what the build and tests need (nightly rust-src, bpf-linker, the manifest
    /// validator, Debian packages).
    Setup {
        /// Only the Rust toolchains and bpf-linker (what deploy/Dockerfile's build stage needs).
        #[arg(long)]
        toolchain_only: bool,
    },
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
        /// Run the testbed part this many times and report each aim's min, median and max
        /// (single runs on a shared VM move by ±15-25 %).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
    },
    /// Run the cargo-fuzz targets in agent/fuzz one after the other (nightly); fails on a
    /// crash and names the saved input.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (repeatable): config_parse, policy_compile, spiffe_id,
        /// hbone_connect, cgroup_path.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// One summary line per target instead of libFuzzer's whole output.
        #[arg(long)]
        quiet: bool,
    },
    /// Two nodes in network namespaces, one agent each: an mTLS call across nodes, what the
    /// wire sees, and a clean teardown.
    Demo,
    /// Build the container image (deploy/Dockerfile); needs docker.
    Image {
        /// Image reference to tag (default ghcr.io/ambit-mesh/ambit:<version>).
        #[arg(long)]
        tag: Option<String>,
    },
    /// End to end in kind (needs docker, kind, kubectl): 1 control plane + 2 workers, the
    /// image, deploy/, and the mesh checks, one PASS/FAIL line each. Not part of `test`.
    Kind {
        /// Leave the cluster running afterwards.
        #[arg(long)]
        keep: bool,
        /// kind cluster name.
        #[arg(long, default_value = "ambit-e2e")]
        name: String,
        /// kind node image (e.g. kindest/node:v1.35.0); kind's default otherwise.
        #[arg(long)]
        node_image: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = setup::workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup { toolchain_only } => setup::run(if toolchain_only {
            setup::Need::Toolchain
        } else {
            setup::Need::All
        }),
        Task::Test { unprivileged } => test(unprivileged),
        Task::Demo => demo(),
        Task::Bench { quick, repeat } => bench(quick, repeat),
        Task::Image { tag } => cluster::image(tag.as_deref()).map(drop),
        Task::Kind {
            keep,
            name,
            node_image,
        } => cluster::kind(cluster::KindOptions {
            name,
            keep,
            node_image,
        }),
        Task::Fuzz {
            seconds,
            targets,
            quiet,
        } => {
            setup::run(setup::Need::Build)?;
            let output = if quiet {
                fuzz::Output::Summary
            } else {
                fuzz::Output::Full
            };
            fuzz::run(&root, seconds, &targets, output)
        }
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
    let mut totals = TestTotals::default();
    cargo_test(
        &[
            "test",
            "--workspace",
            "--exclude",
            "ambit-ebpf",
            "--exclude",
            "ambit-e2e",
        ],
        &mut totals,
    )?;
    if privileged {
        // The end-to-end suite runs the real agent and CNI plugin binaries.
        cargo_cmd(&["build", "-p", "ambit-agent", "--bins"])?;
        cargo_test(&["test", "-p", "ambit-e2e"], &mut totals)?;
    } else {
        // The manifest checks need no root: run them on their own (they ask the binaries
        // which flags exist).
        cargo_cmd(&["build", "-p", "ambit-agent", "--bins"])?;
        cargo_test(
            &["test", "-p", "ambit-e2e", "--test", "deploy"],
            &mut totals,
        )?;
        eprintln!(
            "xtask: NOT ROOT — the privileged end-to-end suite (tests/) was SKIPPED (--unprivileged); \
             the deploy/ manifest checks ran"
        );
    }
    eprintln!("xtask: all checks passed in {:.0?}", started.elapsed());
    // One closing line over every test binary (cargo's last own line is often a doc-test
    // run with nothing in it).
    println!("tests: {} passed, {} failed", totals.passed, totals.failed);
    Ok(())
}

#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
}

/// `cargo test …`, echoing its output and adding up its `test result:` lines.
fn cargo_test(args: &[&str], totals: &mut TestTotals) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(&cargo)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            totals.passed += count_before(rest, " passed");
            totals.failed += count_before(rest, " failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The number right before `label` in a `test result:` line (`ok. 5 passed; 0 failed; …`).
fn count_before(text: &str, label: &str) -> u64 {
    text.find(label)
        .and_then(|end| text[..end].rsplit([' ', '.']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn demo() -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    setup::run(setup::Need::All)?;
    cargo_cmd(&["build", "--quiet", "-p", "ambit-agent", "--bin", "ambit"])?;
    cargo_cmd(&["run", "--quiet", "-p", "ambit-e2e", "--bin", "ambit-demo"])
}

fn bench(quick: bool, repeat: u32) -> anyhow::Result<()> {
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
    let repeat = repeat.to_string();
    args.extend(["--", "--repeat", &repeat]);
    if quick {
        args.push("--quick");
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

#[cfg(test)]
mod tests {
    use super::count_before;

    #[test]
    fn reads_counts_from_a_cargo_result_line() {
        let line =
            "ok. 98 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 36.25s";
        assert_eq!(count_before(line, " passed"), 98);
        assert_eq!(count_before(line, " failed"), 2);
        assert_eq!(count_before("FAILED. 0 passed; 1 failed;", " failed"), 1);
        assert_eq!(count_before("no numbers here", " passed"), 0);
    }
}
