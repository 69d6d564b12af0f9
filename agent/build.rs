//! Builds the eBPF programs in `ebpf/` with aya-build and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`. bpf-linker comes from the project's tools directory, installed
//! by `cargo xtask setup`. Also generates the gRPC code of the CA service from `proto/`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    compile_protos(&manifest_dir)?;
    pack_relative_relocations();
    let workspace = manifest_dir
        .parent()
        .context("agent crate has no parent directory")?;
    let tools_bin = workspace.join(".tools").join("bin");
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("common").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        tools_bin.join("bpf-linker").display()
    );

    if !tools_bin.join("bpf-linker").exists() && !on_path("bpf-linker") {
        bail!(
            "bpf-linker not found in {} or on PATH: run `cargo xtask setup` first",
            tools_bin.display()
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![tools_bin];
    dirs.extend(std::env::split_paths(&path));
    let new_path = std::env::join_paths(dirs)?;
    // SAFETY: build scripts are single-threaded at this point; nothing else reads the
    // environment concurrently. aya-build spawns cargo with our environment, so this is the
    // only way to put the project-local bpf-linker on its PATH.
    unsafe { std::env::set_var("PATH", new_path) };

    let ebpf_dir = workspace.join("ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 workspace path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ambit-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}

/// The agent is a position-independent executable: the dynamic loader patches every
/// absolute address in it at start, reading one 24-byte entry per address from `.rela.dyn`
/// (45,000 entries, 1 MiB, all of it resident for the process's life). Packed relative
/// relocations (DT_RELR) describe the same addresses in a few KiB. Needs glibc ≥ 2.36 at run
/// time (Debian bookworm, the image's base); the linker records that as a symbol version, so
/// an older glibc refuses the binary at load instead of misrunning it. Only for `ambit`:
/// `ambit-cni` is copied onto the node and run by the host's container runtime with the
/// host's glibc (Ubuntu 22.04 has 2.35).
fn pack_relative_relocations() {
    let target_var = |name: &str| std::env::var(name).unwrap_or_default();
    if target_var("CARGO_CFG_TARGET_OS") == "linux" && target_var("CARGO_CFG_TARGET_ENV") == "gnu" {
        println!("cargo:rustc-link-arg-bin=ambit=-Wl,-z,pack-relative-relocs");
    }
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| Path::new(&dir).join(binary).exists()))
        .unwrap_or(false)
}

/// Istio's certificate service (`proto/istio/v1/auth/ca.proto`), client and server.
/// protox parses the .proto in-process (well-known types included), so a fresh machine
/// needs no protoc; tonic-prost-build turns the descriptors into Rust in OUT_DIR.
fn compile_protos(manifest_dir: &Path) -> anyhow::Result<()> {
    let proto_dir = manifest_dir.join("proto");
    let file = "istio/v1/auth/ca.proto";
    println!("cargo:rerun-if-changed={}", proto_dir.join(file).display());
    let descriptors =
        protox::compile([file], [&proto_dir]).context("parsing the CA service .proto")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .compile_fds(descriptors)
        .context("generating the CA service code")?;
    Ok(())
}
