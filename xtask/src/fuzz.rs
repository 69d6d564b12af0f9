//! `cargo xtask fuzz`: the cargo-fuzz targets in `agent/fuzz`, one after the other, each for
//! a fixed time. A crash fails the run and names the input libFuzzer saved.
//!
//! This is the coverage-guided search (nightly, instrumented build: ~18 min cold). The
//! targets' bodies live in `ambit_agent::fuzzing`, and `cargo test` (so `cargo xtask test`)
//! runs them too as a stable smoke run (`agent/src/fuzzing/smoke.rs`): every seed, every
//! regression input (`agent/fuzz/regressions/<target>/`) and any local corpus, then ~3 s of
//! random and mutated inputs per target, with no instrumentation and no extra build. A crash
//! found here, once fixed, goes under `regressions/<target>/` so both runs replay it.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};

/// Every target with the seed directories (under `agent/fuzz/seeds`) it starts from.
pub const TARGETS: &[(&str, &[&str])] = &[
    ("config_parse", &["yaml"]),
    ("policy_compile", &["yaml"]),
    ("spiffe_id", &["spiffe_id"]),
    ("hbone_connect", &[]),
    ("cgroup_path", &["cgroup_path"]),
];

/// How much libFuzzer's output a run echoes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Everything libFuzzer prints.
    Full,
    /// One summary line per target (`--quiet`).
    Summary,
}

/// Runs `targets` (every one when empty) for `seconds` each.
pub fn run(root: &Path, seconds: u64, targets: &[String], output: Output) -> anyhow::Result<()> {
    for name in targets {
        if !TARGETS.iter().any(|(t, _)| t == name) {
            let known: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
            bail!("no fuzz target {name:?}; the targets are {known:?}");
        }
    }
    ensure_cargo_fuzz()?;
    let started = Instant::now();
    // One build of every target first, so the timed runs measure fuzzing only.
    cargo_fuzz(root, &["build"], &[])?;
    eprintln!("xtask: fuzz targets built in {:.0?}", started.elapsed());
    for (name, seeds) in TARGETS {
        if !targets.is_empty() && !targets.iter().any(|t| t == name) {
            continue;
        }
        run_target(root, name, seeds, seconds, output)?;
    }
    Ok(())
}

fn run_target(
    root: &Path,
    name: &str,
    seeds: &[&str],
    seconds: u64,
    output: Output,
) -> anyhow::Result<()> {
    let fuzz_dir = root.join("agent").join("fuzz");
    let corpus = fuzz_dir.join("corpus").join(name);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let artifacts = fuzz_dir.join("artifacts").join(name);
    let before = list_files(&artifacts);
    // libFuzzer writes new inputs to the first directory only: the seeds stay as committed.
    let mut dirs = vec![corpus.into_os_string()];
    dirs.extend(
        seeds
            .iter()
            .map(|s| fuzz_dir.join("seeds").join(s).into_os_string()),
    );
    // Fixed crashes, replayed first thing (libFuzzer refuses a corpus directory that does
    // not exist, and most targets have none).
    let regressions = fuzz_dir.join("regressions").join(name);
    if regressions.is_dir() {
        dirs.push(regressions.into_os_string());
    }
    let dirs: Vec<&str> = dirs
        .iter()
        .map(|d| d.to_str().context("non-UTF-8 path"))
        .collect::<anyhow::Result<_>>()?;
    let max_time = format!("-max_total_time={seconds}");
    eprintln!("xtask: fuzzing {name} for {seconds} s");
    let mut args = vec![name];
    args.extend(&dirs);
    let summary = cargo_fuzz_run(root, &args, &[&max_time, "-print_final_stats=1"], output);
    let crashes: Vec<PathBuf> = list_files(&artifacts)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    if !crashes.is_empty() {
        for crash in &crashes {
            eprintln!("xtask: fuzz target {name} failed on {}", crash.display());
        }
        bail!(
            "fuzz target {name} found {} failing input(s); reproduce with \
             `cd agent && cargo +nightly fuzz run -s none -a {name} <file>`",
            crashes.len()
        );
    }
    let summary = summary?;
    println!("fuzz {name}: {summary}");
    Ok(())
}

/// Files in `dir` (none when it does not exist).
fn list_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// `cargo +nightly fuzz <subcommand> … [-- <libfuzzer args>]` from `agent/`.
///
/// No sanitizer: the targets reach only safe Rust (the one `unsafe` module, `sys`, is not on
/// their paths), where AddressSanitizer finds nothing but halves the speed and doubles the
/// build. Debug assertions stay on, so overflows and `debug_assert!`s count as crashes.
fn fuzz_command(root: &Path, subcommand: &str, args: &[&str], libfuzzer: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("agent"))
        .args(["+nightly", "fuzz", subcommand, "--sanitizer", "none"])
        .arg("--debug-assertions")
        .args(args);
    if !libfuzzer.is_empty() {
        cmd.arg("--").args(libfuzzer);
    }
    // The outer `cargo xtask` sets these for the stable toolchain; nightly must pick its own.
    cmd.env_remove("RUSTC")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn cargo_fuzz(root: &Path, args: &[&str], libfuzzer: &[&str]) -> anyhow::Result<()> {
    let (subcommand, rest) = args.split_first().context("no cargo fuzz subcommand")?;
    let status = fuzz_command(root, subcommand, rest, libfuzzer)
        .status()
        .context("running cargo +nightly fuzz")?;
    if !status.success() {
        bail!("cargo fuzz {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `cargo fuzz run`, returning libFuzzer's closing figures (runs, coverage, corpus).
fn cargo_fuzz_run(
    root: &Path,
    args: &[&str],
    libfuzzer: &[&str],
    output: Output,
) -> anyhow::Result<String> {
    let mut child = fuzz_command(root, "run", args, libfuzzer)
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo +nightly fuzz run")?;
    let stderr = child.stderr.take().context("cargo fuzz stderr")?;
    let mut done = String::new();
    let mut runs = String::new();
    let mut tail = Vec::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line?;
        if output == Output::Full {
            eprintln!("{line}");
        } else {
            // Kept for the failure report.
            tail.push(line.clone());
            if tail.len() > 60 {
                tail.remove(0);
            }
        }
        if line.split_whitespace().nth(1) == Some("DONE") {
            done = line.clone();
        } else if line.starts_with("Done ") {
            runs = line.clone();
        }
    }
    let status = child.wait()?;
    if !status.success() {
        for line in &tail {
            eprintln!("{line}");
        }
        bail!("cargo fuzz run {} failed ({status})", args.join(" "));
    }
    Ok(summarise(&done, &runs))
}

/// `#123456\tDONE   cov: 812 ft: 2301 corp: 140/9Kb lim: 4096 exec/s: 2057 rss: 80Mb`
/// and `Done 123456 runs in 61 second(s)` as one line of the figures that matter.
fn summarise(done: &str, runs: &str) -> String {
    let tokens: Vec<&str> = done.split_whitespace().skip(2).collect();
    let figures: Vec<String> = tokens
        .chunks(2)
        .filter(|pair| matches!(pair[0], "cov:" | "ft:" | "corp:" | "exec/s:"))
        .map(|pair| pair.join(" "))
        .collect();
    let runs = runs.trim_start_matches("Done ").trim();
    format!("{runs}; {}", figures.join(" "))
}

/// cargo-fuzz, installed once (`cargo install` finds it already there afterwards).
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (once)");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::summarise;

    #[test]
    fn summarises_libfuzzer_closing_lines() {
        let done =
            "#1234567\tDONE   cov: 812 ft: 2301 corp: 140/9Kb lim: 4096 exec/s: 20575 rss: 80Mb";
        let runs = "Done 1234567 runs in 61 second(s)";
        assert_eq!(
            summarise(done, runs),
            "1234567 runs in 61 second(s); cov: 812 ft: 2301 corp: 140/9Kb exec/s: 20575"
        );
    }
}
