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
    /// Inspect Istio policies offline.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Decide one connection against a file of Istio policies.
    ///
    /// Exit status: 0 = ALLOW, 1 = DENY, 2 = usage or configuration error.
    Check(ambit_agent::policy::cli::CheckArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AMBIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if let Command::Policy {
        command: PolicyCommand::Check(args),
    } = &cli.command
    {
        // Exit codes are part of the interface (scripts test ALLOW/DENY), so
        // errors bypass anyhow's exit status 1.
        let code = match ambit_agent::policy::cli::check(args) {
            Ok(outcome) => {
                for w in &outcome.warnings {
                    eprintln!("{w}");
                }
                print!("{}", outcome.text);
                outcome.exit_code()
            }
            Err(e) => {
                eprintln!("error: {e}");
                2
            }
        };
        std::process::exit(code);
    }
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
        // Handled above, before any fallible work.
        Command::Policy { .. } => Ok(()),
    }
}
