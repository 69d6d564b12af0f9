use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_agent::observability::{self, LogFormat, client};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// ambit: a sidecar-free, eBPF-steered service-mesh agent.
#[derive(Parser, Debug)]
#[command(name = "ambit", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, env = "AMBIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Where a running agent's admin API is.
#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// The agent's admin address (its --admin-addr).
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = observability::DEFAULT_ADMIN_ADDR)]
    admin_addr: SocketAddr,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent for one node: local mode (--config FILE) or Kubernetes mode
    /// (--kubernetes).
    Run(Box<ambit_agent::app::RunArgs>),
    /// Print this binary's version and, when one answers, the running agent's.
    Version(AdminArgs),
    /// Show a running agent's readiness, enrolled pods and attached programs.
    ///
    /// Exit status: 0 = ready, 1 = not ready or unreachable.
    Status(AdminArgs),
    /// Print a running agent's configuration as JSON (workloads, services, policies and their
    /// warnings, certificate summary, effective flags).
    ConfigDump(AdminArgs),
    /// Show the workload certificates a running agent holds (never keys).
    Certs {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the certificate chains (PEM) too.
        #[arg(long)]
        pem: bool,
    },
    /// Detach every ambit eBPF program and remove its pins: plain networking for all pods.
    Uninstall {
        /// bpffs directory holding ambit's pins.
        #[arg(long, default_value = ambit_agent::capture::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Run the certificate authority (Istio's certificate service with node authorization,
    /// gRPC over TLS on :15012) as its own Deployment.
    Ca(ambit_agent::ca::CaArgs),
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
    let cli = Cli::parse();
    // kube-rs logs every failed retry of a watch; the agent says it once per streak.
    let filter = std::env::var("AMBIT_LOG").unwrap_or_else(|_| "info,kube_client=off".into());
    // Lives to the end of main: dropping it writes out the queued log lines.
    let (log, log_guard) = observability::logging::init(cli.log_format, &filter);
    if matches!(
        cli.command,
        Command::Status(_) | Command::ConfigDump(_) | Command::Certs { .. }
    ) {
        // A short message and a meaningful exit status, not anyhow's chain and backtrace.
        let code = admin_command(&cli.command).unwrap_or_else(|e| {
            eprintln!("error: {e}");
            1
        });
        drop(log_guard);
        std::process::exit(code);
    }
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
        drop(log_guard);
        std::process::exit(code);
    }
    match cli.command {
        Command::Run(args) => {
            let args = *args;
            if let Err(e) = ambit_agent::sys::tune_malloc() {
                tracing::warn!(error = %e, "malloc keeps its default thresholds");
            }
            match ambit_agent::sys::raise_nofile_limit() {
                Ok(limit) => tracing::debug!(limit, "open-file limit"),
                Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
            }
            let options = args.into_options(Some(log))?;
            // The control plane's runtime, on this thread; connections run on the data
            // path's own threads (`options.worker_threads` of them, tunnel::Shards).
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(ambit_agent::app::run(options))
        }
        Command::Version(admin) => {
            println!("ambit {}", env!("CARGO_PKG_VERSION"));
            // The agent's version is extra information: not finding one is no error.
            match client::get_json(admin.admin_addr, "/status") {
                Ok(status) => println!(
                    "agent at {}: {}",
                    admin.admin_addr,
                    status["version"].as_str().unwrap_or("unknown")
                ),
                Err(_) => println!("agent at {}: not reachable", admin.admin_addr),
            }
            Ok(())
        }
        // Handled above, before any fallible work.
        Command::Status(_) | Command::ConfigDump(_) | Command::Certs { .. } => Ok(()),
        Command::Uninstall { pin_dir } => {
            ambit_agent::capture::remove_pins(&pin_dir)
                .with_context(|| format!("removing {}", pin_dir.display()))?;
            println!("removed {}; ambit programs detached", pin_dir.display());
            Ok(())
        }
        // Handled above, before any fallible work.
        Command::Policy { .. } => Ok(()),
        Command::Ca(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(ambit_agent::ca::run(args)),
    }
}

/// The commands that query a running agent; their exit status: 0, or 1 for "not ready".
fn admin_command(command: &Command) -> Result<i32, observability::ObservabilityError> {
    match command {
        Command::Status(admin) => {
            let status = client::get_json(admin.admin_addr, "/status")?;
            let readiness: observability::Readiness = serde_json::from_value(status.clone())?;
            println!(
                "ready:             {}",
                if readiness.ready { "yes" } else { "no" }
            );
            for problem in &readiness.problems {
                println!("  not ready because: {problem}");
            }
            println!("enrolled pods:     {}", readiness.enrolled_pods);
            println!(
                "programs attached: {}",
                if readiness.programs_attached.is_empty() {
                    "none".to_owned()
                } else {
                    readiness.programs_attached.join(", ")
                }
            );
            println!(
                "version:           {}",
                status["version"].as_str().unwrap_or("unknown")
            );
            if status["draining"].as_bool() == Some(true) {
                println!("draining:          yes");
            }
            Ok(if readiness.ready { 0 } else { 1 })
        }
        Command::ConfigDump(admin) => {
            print!("{}", client::get(admin.admin_addr, "/config_dump")?);
            Ok(0)
        }
        Command::Certs { admin, pem } => {
            let certs = client::get_json(admin.admin_addr, "/certs")?;
            let list = certs["certificates"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if list.is_empty() {
                println!("no certificates (no local workload has needed one yet)");
            }
            for c in list {
                let time = |key: &str| {
                    c[key]
                        .as_u64()
                        .map(|secs| {
                            let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
                            let left = t.duration_since(std::time::SystemTime::now()).map_or_else(
                                |_| "expired".to_owned(),
                                |d| format!("in {}s", d.as_secs()),
                            );
                            format!("{secs} ({left})")
                        })
                        .unwrap_or_default()
                };
                println!("{}", c["identity"].as_str().unwrap_or("?"));
                println!("  serial:     {}", c["serial"].as_str().unwrap_or("?"));
                println!("  not before: {}", c["notBefore"].as_u64().unwrap_or(0));
                println!("  not after:  {}", time("notAfter"));
                if *pem {
                    print!("{}", c["chainPem"].as_str().unwrap_or(""));
                }
            }
            Ok(0)
        }
        _ => Ok(0),
    }
}
