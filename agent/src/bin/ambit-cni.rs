//! `ambit-cni`: run by the container runtime (CNI_COMMAND set) it is the chained CNI plugin;
//! run by the DaemonSet it installs or removes itself on the node.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use ambit_agent::cni::install::{InstallOptions, install, uninstall};
use ambit_agent::cni::plugin::{self, CniEnv, CniError, SocketAgentClient, code};
use ambit_agent::cni::{DEFAULT_NAMESPACES_FILE, DEFAULT_SOCKET, MAX_MESSAGE_BYTES};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ambit-cni",
    about = "ambit's chained CNI plugin and its installer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copies this binary into the CNI bin directory and chains it into the node's primary
    /// network config.
    Install {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        conf_dir: PathBuf,
        /// The agent's socket, as a path on the node.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The agent's list of mesh namespaces, as a path on the node.
        #[arg(long, default_value = DEFAULT_NAMESPACES_FILE)]
        namespaces_file: PathBuf,
    },
    /// Removes the plugin from the node's network configs and its binary.
    Uninstall {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        conf_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return run_plugin();
    }
    match admin(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambit-cni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime's contract: the result (or a CNI error JSON) on stdout, exit 0 on success.
fn run_plugin() -> ExitCode {
    let env = CniEnv::from_env();
    let mut stdin = Vec::new();
    // The network config is small; a runaway writer must not make the plugin hoard memory.
    let read = std::io::stdin()
        .take(16 * MAX_MESSAGE_BYTES as u64)
        .read_to_end(&mut stdin);
    let result = match read {
        Ok(_) => plugin::run(&env, &stdin, &SocketAgentClient),
        Err(e) => Err(CniError::new(
            code::IO_FAILURE,
            format!("reading the network config from stdin: {e}"),
        )),
    };
    let (text, status) = match result {
        Ok(output) => (output, ExitCode::SUCCESS),
        Err(e) => (e.to_json(), ExitCode::FAILURE),
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    status
}

fn admin(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Install {
            bin_dir,
            conf_dir,
            socket,
            namespaces_file,
        } => {
            let source_exe = std::env::current_exe().context("locating this executable")?;
            let installed = install(&InstallOptions {
                bin_dir,
                conf_dir,
                source_exe,
                agent_socket: socket,
                namespaces_file,
            })?;
            eprintln!(
                "ambit-cni: installed {}; {} {}{}",
                installed.binary.display(),
                if installed.config_changed {
                    "chained into"
                } else {
                    "already chained in"
                },
                installed.config.display(),
                installed
                    .converted_from
                    .map(|old| format!(" (converted from {})", old.display()))
                    .unwrap_or_default()
            );
        }
        Command::Uninstall { bin_dir, conf_dir } => {
            let rewritten = uninstall(&bin_dir, &conf_dir)?;
            for path in rewritten {
                eprintln!("ambit-cni: removed from {}", path.display());
            }
        }
    }
    Ok(())
}
