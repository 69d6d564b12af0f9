use std::path::PathBuf;
use std::time::Duration;

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
    /// Run the agent for one node (local mode: the mesh is described by --config).
    Run(RunArgs),
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

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// This node's name; the agent enrolls the opted-in workloads whose `node` matches.
    #[arg(long, env = "AMBIT_NODE")]
    node: String,
    /// Local-mode file (docs/LOCAL-MODE.md); watched, changes apply live.
    #[arg(long, env = "AMBIT_CONFIG")]
    config: PathBuf,
    /// bpffs directory for ambit's pinned programs, links and maps.
    #[arg(long, env = "AMBIT_PIN_DIR", default_value = ambit_agent::capture::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Directory for the agent's own state (the local CA when none is given).
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/lib/ambit")]
    state_dir: PathBuf,
    /// CA certificate (PEM) signing workload certificates; with --ca-key.
    #[arg(long, env = "AMBIT_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// CA private key (PEM); with --ca-cert.
    #[arg(long, env = "AMBIT_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Lifetime of workload certificates, in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    cert_ttl_secs: u64,
    /// How often the config file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    reload_interval_ms: u64,
    /// Close pooled HBONE connections idle for this many seconds.
    #[arg(long, default_value_t = 300)]
    pool_idle_secs: u64,
    /// Do not pool HBONE connections: every proxied connection gets its own TCP + TLS +
    /// HTTP/2 connection, closed when it ends (one stream per connection, no idle reuse).
    /// For measuring the cost of a full handshake per connection; not for production.
    #[arg(long)]
    no_pool: bool,
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
        Command::Run(args) => {
            match ambit_agent::sys::raise_nofile_limit() {
                Ok(limit) => tracing::debug!(limit, "open-file limit"),
                Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
            }
            let options = ambit_agent::app::AgentOptions {
                node: args.node,
                config: args.config,
                pin_dir: args.pin_dir,
                state_dir: args.state_dir,
                ca_cert: args.ca_cert,
                ca_key: args.ca_key,
                cert_ttl: Duration::from_secs(args.cert_ttl_secs),
                reload_interval: Duration::from_millis(args.reload_interval_ms),
                tunnel: ambit_agent::tunnel::TunnelConfig {
                    pool_idle_timeout: Duration::from_secs(args.pool_idle_secs),
                    pooling: !args.no_pool,
                    ..Default::default()
                },
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(ambit_agent::app::run(options))
        }
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
