//! Idempotent installation of everything the build and tests need. Each step checks first and
//! does nothing when its part is present, so running it before every task costs little.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// bpf-linker release known to build against the nightly's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests, demo and bench use: `ip` (iproute2), a packet capture
/// (tcpdump), a bulk-throughput tool (iperf3), the font of the bench's plot (DejaVu Sans).
const DEBIAN_PACKAGES: &[&str] = &["iproute2", "tcpdump", "iperf3", "fonts-dejavu-core"];
/// The manifest validator (PyPI), pinned to the Kubernetes version k8s-openapi is built for
/// (`v1_35`): it bundles that version's API schemas, so validation runs offline.
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.35.0";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The Rust toolchains and bpf-linker, nothing else: what building the image needs.
    Toolchain,
    /// Toolchain parts and the manifest validator: enough to build and run unprivileged checks.
    Build,
    /// Also the Debian packages of the privileged tests (needs root).
    All,
}

pub fn run(need: Need) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    ensure_rust_components()?;
    ensure_nightly()?;
    ensure_bpf_linker()?;
    if need != Need::Toolchain {
        ensure_manifest_validator()?;
    }
    if need == Need::All {
        ensure_debian_packages()?;
    }
    eprintln!("xtask: setup complete in {:.1?}", started.elapsed());
    Ok(())
}

pub fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

fn tools_dir() -> anyhow::Result<PathBuf> {
    Ok(workspace_root()?.join(".tools"))
}

pub fn is_root() -> bool {
    output("id", &["-u"]).is_ok_and(|uid| uid.trim() == "0")
}

/// clippy and rustfmt for the stable toolchain that builds the workspace.
fn ensure_rust_components() -> anyhow::Result<()> {
    let installed = output("rustup", &["component", "list", "--installed"])?;
    for component in ["clippy", "rustfmt"] {
        if !installed.lines().any(|l| l.starts_with(component)) {
            run_cmd("rustup", &["component", "add", component])?;
        }
    }
    Ok(())
}

/// The nightly toolchain with rust-src: the eBPF crate is built with `-Z build-std=core`.
fn ensure_nightly() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run_cmd(
            "rustup",
            &[
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ],
        )?;
        return Ok(());
    }
    let components = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run_cmd(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    Ok(())
}

/// bpf-linker built against the nightly's own libLLVM (bpf-linker's default LLVM does not
/// match the toolchains here), installed into `.tools/`.
fn ensure_bpf_linker() -> anyhow::Result<()> {
    let tools = tools_dir()?;
    let linker = tools.join("bin").join("bpf-linker");
    if linker.exists()
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    let llvm = NightlyLlvm::detect()?;
    let prefix = tools.join("llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    for (link, target) in [
        (lib.join("libLLVM.so"), &llvm.linker_script),
        (
            lib.join(llvm.shared_object.file_name().context("libLLVM name")?),
            &llvm.shared_object,
        ),
    ] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link)
            .with_context(|| format!("symlink {} -> {}", link.display(), target.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} (a few minutes, once)",
        llvm.major
    );
    let feature = format!("llvm-{}", llvm.major);
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            &feature,
            "--root",
        ])
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status})");
    }
    Ok(())
}

/// Where the nightly keeps its libLLVM, derived from `rustc -vV` and the sysroot.
struct NightlyLlvm {
    major: String,
    /// `libLLVM-<major>-rust-<version>-nightly.so`, a linker script.
    linker_script: PathBuf,
    /// `libLLVM.so.<major>.<minor>-rust-<version>-nightly`, the real library.
    shared_object: PathBuf,
}

impl NightlyLlvm {
    fn detect() -> anyhow::Result<Self> {
        let version = output("rustc", &["+nightly", "-vV"])?;
        let major = version
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .and_then(|v| v.split('.').next())
            .context("no `LLVM version` in `rustc +nightly -vV`")?
            .to_string();
        let sysroot = PathBuf::from(output("rustc", &["+nightly", "--print", "sysroot"])?.trim());
        let lib = sysroot.join("lib");
        let mut linker_script = None;
        let mut shared_object = None;
        for entry in
            std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))?
        {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.starts_with(&format!("libLLVM-{major}-")) && name.ends_with(".so") {
                linker_script = Some(path.clone());
            } else if name.starts_with(&format!("libLLVM.so.{major}.")) {
                shared_object = Some(path.clone());
            }
        }
        Ok(Self {
            linker_script: linker_script
                .with_context(|| format!("no libLLVM-{major}-*.so in {}", lib.display()))?,
            shared_object: shared_object
                .with_context(|| format!("no libLLVM.so.{major}.* in {}", lib.display()))?,
            major,
        })
    }
}

fn ensure_debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("Debian packages {missing:?} are missing and installing them needs root");
    }
    run_cmd("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {missing:?} failed ({status})");
    }
    Ok(())
}

/// `kubernetes-validate` into `.tools/python` (`pip --target`: no virtualenv, nothing
/// installed system-wide, and Debian's externally-managed Python is not touched). The
/// deploy tests run it as `PYTHONPATH=.tools/python python3 -m kubernetes_validate`.
fn ensure_manifest_validator() -> anyhow::Result<()> {
    let target = python_tools_dir()?;
    let (name, version) = KUBERNETES_VALIDATE
        .split_once("==")
        .context("KUBERNETES_VALIDATE is NAME==VERSION")?;
    let marker = target.join(format!("{}-{version}.dist-info", name.replace('-', "_")));
    if marker.is_dir() {
        return Ok(());
    }
    if Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        if !is_root() {
            bail!(
                "python3 with pip is missing (needed to validate the manifests in deploy/) and \
                 installing it needs root"
            );
        }
        run_cmd("apt-get", &["update", "-q"])?;
        let status = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "python3",
                "python3-pip",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get install python3 python3-pip failed ({status})");
        }
    }
    // A half-finished earlier install must not mix with this one.
    if target.exists() {
        std::fs::remove_dir_all(&target)
            .with_context(|| format!("removing {}", target.display()))?;
    }
    eprintln!(
        "xtask: installing {KUBERNETES_VALIDATE} into {}",
        target.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--root-user-action=ignore",
            "--target",
        ])
        .arg(&target)
        .arg(KUBERNETES_VALIDATE)
        .status()
        .context("running python3 -m pip")?;
    if !status.success() {
        bail!("pip install {KUBERNETES_VALIDATE} failed ({status})");
    }
    Ok(())
}

/// Where setup puts the Python tools (the manifest validator).
pub fn python_tools_dir() -> anyhow::Result<PathBuf> {
    Ok(tools_dir()?.join("python"))
}

fn dpkg_installed(pkg: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", pkg])
        .is_ok_and(|s| s.contains("install ok installed"))
}

/// clippy for the eBPF crate, on its own target (it is not a host crate).
pub fn ebpf_clippy() -> anyhow::Result<()> {
    eprintln!("xtask: clippy for ambit-ebpf (bpfel-unknown-none)");
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "clippy",
            "-p",
            "ambit-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(workspace_root()?.join("target").join("ebpf-clippy"))
        .args(["--", "-D", "warnings"])
        // The outer `cargo xtask` sets these for the stable toolchain; nightly must pick its own.
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("running cargo +nightly clippy")?;
    if !status.success() {
        bail!("clippy found problems in ambit-ebpf ({status})");
    }
    Ok(())
}

pub(crate) fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("xtask: {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}
