use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// ambit: a sidecar-free, eBPF-steered service-mesh agent.
#[derive(Parser, Debug)]
#[command(name = "ambit", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the version and build information.
    Version,
    /// Detach every ambit eBPF program and remove its pins: plain networking for all pods.
    Uninstall {
        /// bpffs directory holding ambit's pins.
        #[arg(long, default_value = ambit_agent::capture::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AMBIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("ambit {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Uninstall { pin_dir } => {
            ambit_agent::capture::remove_pins(&pin_dir)
                .with_context(|| format!("removing {}", pin_dir.display()))?;
            println!("removed {}; ambit programs detached", pin_dir.display());
            Ok(())
        }
    }
}
