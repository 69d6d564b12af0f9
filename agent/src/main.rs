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
    Run(Box<RunArgs>),
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

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// This node's name; the agent enrolls the opted-in pods scheduled on it. Also from
    /// NODE_NAME (the downward API in the DaemonSet).
    #[arg(long, env = "AMBIT_NODE")]
    node: Option<String>,
    /// Local mode: the mesh described by this file (docs/LOCAL-MODE.md); watched, changes
    /// apply live.
    #[arg(
        long,
        env = "AMBIT_CONFIG",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config: Option<PathBuf>,
    /// Kubernetes mode: learn the mesh from the API server (in-cluster configuration,
    /// --kubeconfig, or KUBECONFIG). docs/KUBERNETES.md.
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig to reach the API server from outside the cluster.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the host's /proc, scanned to find pods' network namespaces.
    #[arg(long, env = "AMBIT_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,
    /// Kubernetes mode: unix socket the ambit-cni plugin asks to enroll new pods.
    #[arg(long, env = "AMBIT_CNI_SOCKET")]
    cni_socket: Option<PathBuf>,
    /// Kubernetes mode: file listing the opted-in namespaces, read by the ambit-cni plugin
    /// when the agent cannot be reached.
    #[arg(long, env = "AMBIT_NAMESPACES_FILE")]
    namespaces_file: Option<PathBuf>,
    /// Kubernetes mode: the node's CNI config directory (as mounted in the agent). When set,
    /// the agent chains ambit-cni again whenever the network plugin rewrites its config
    /// without it; needs --cni-socket, --namespaces-file and --cni-bin-dir.
    #[arg(long, env = "AMBIT_CNI_CONF_DIR", requires_all = ["cni_socket", "namespaces_file", "cni_bin_dir"])]
    cni_conf_dir: Option<PathBuf>,
    /// Kubernetes mode: the node's CNI bin directory (as mounted in the agent); the chain is
    /// repaired only while ambit-cni is installed there.
    #[arg(long, env = "AMBIT_CNI_BIN_DIR", requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
    /// Kubernetes mode: the mesh's SPIFFE trust domain.
    #[arg(long, default_value = ambit_agent::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Kubernetes mode: where mesh-wide Istio policies live.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
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
    /// A CA service to ask for workload certificates (`ambit ca`, or istiod):
    /// `https://host:15012`. Without it the agent signs with a CA key of its own (local
    /// mode). docs/CERTIFICATES.md.
    #[arg(long, env = "AMBIT_CA_ADDRESS", conflicts_with_all = ["ca_cert", "ca_key"], requires_all = ["ca_token_file", "ca_trust_file"])]
    ca_address: Option<String>,
    /// Projected service-account token sent to the CA (re-read for every request).
    #[arg(long, env = "AMBIT_CA_TOKEN_FILE")]
    ca_token_file: Option<PathBuf>,
    /// PEM roots the CA's serving certificate must chain to.
    #[arg(long, env = "AMBIT_CA_TRUST_FILE")]
    ca_trust_file: Option<PathBuf>,
    /// Extra PEM roots for the mesh trust bundle (e.g. during a root migration).
    #[arg(long, env = "AMBIT_CA_EXTRA_BUNDLE_FILE")]
    ca_extra_bundle_file: Option<PathBuf>,
    /// Cluster ID sent to the CA as the `clusterid` header (istiod needs it).
    #[arg(long, env = "AMBIT_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// Lifetime of workload certificates, in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    cert_ttl_secs: u64,
    /// How often the config file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    reload_interval_ms: u64,
    /// Inbound HBONE: a peer that has not finished its TLS handshake and HTTP/2 preface
    /// within this many milliseconds is reset.
    #[arg(long, default_value_t = 10_000)]
    tls_handshake_timeout_ms: u64,
    /// Inbound HBONE: a connection without open streams for this many seconds gets GOAWAY.
    #[arg(long, default_value_t = 600)]
    hbone_idle_timeout_secs: u64,
    /// Inbound HBONE: the largest CONNECT header block accepted (bytes); larger gets 431.
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_list_size: u32,
    /// Close pooled HBONE connections idle for this many seconds.
    #[arg(long, default_value_t = 300)]
    pool_idle_secs: u64,
    /// Admin API (config dump, certs, log level, /quitquitquit); keep it on localhost.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = observability::DEFAULT_ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics, /stats/prometheus).
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = observability::DEFAULT_METRICS_ADDR)]
    metrics_addr: SocketAddr,
    /// Readiness probe (/healthz/ready).
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = observability::DEFAULT_READINESS_ADDR)]
    readiness_addr: SocketAddr,
    /// On /quitquitquit or SIGTERM, how long open connections may finish before being closed.
    #[arg(long, default_value_t = 5000)]
    drain_deadline_ms: u64,
    /// Most verbose level of the eBPF programs' own log messages (error, warn, info, debug,
    /// trace); they appear in the agent's log. Fixed at load: debug logs every capture.
    #[arg(long, default_value = "warn")]
    ebpf_log_level: tracing::Level,
    /// Do not pool HBONE connections: every proxied connection gets its own TCP + TLS +
    /// HTTP/2 connection, closed when it ends (one stream per connection, no idle reuse).
    /// For measuring the cost of a full handshake per connection; not for production.
    #[arg(long)]
    no_pool: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // kube-rs logs every failed retry of a watch; the agent says it once per streak.
    let filter = std::env::var("AMBIT_LOG").unwrap_or_else(|_| "info,kube_client=off".into());
    let log = observability::logging::init(cli.log_format, &filter);
    if matches!(
        cli.command,
        Command::Status(_) | Command::ConfigDump(_) | Command::Certs { .. }
    ) {
        // A short message and a meaningful exit status, not anyhow's chain and backtrace.
        let code = admin_command(&cli.command).unwrap_or_else(|e| {
            eprintln!("error: {e}");
            1
        });
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
        std::process::exit(code);
    }
    match cli.command {
        Command::Run(args) => {
            let args = *args;
            match ambit_agent::sys::raise_nofile_limit() {
                Ok(limit) => tracing::debug!(limit, "open-file limit"),
                Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
            }
            let node = args
                .node
                .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
                .context("--node (or AMBIT_NODE / NODE_NAME) is required")?;
            let source = match args.config {
                Some(path) => ambit_agent::app::SourceOptions::File {
                    path,
                    reload_interval: Duration::from_millis(args.reload_interval_ms),
                },
                None => ambit_agent::app::SourceOptions::Kubernetes(
                    ambit_agent::app::KubernetesOptions {
                        kubeconfig: args.kubeconfig,
                        settings: ambit_agent::config::MeshSettings {
                            trust_domain: args.trust_domain,
                            root_namespace: args.root_namespace,
                            ..Default::default()
                        },
                        proc_root: args.proc_root,
                        cni_chain: match (
                            &args.cni_conf_dir,
                            &args.cni_bin_dir,
                            &args.cni_socket,
                            &args.namespaces_file,
                        ) {
                            (Some(conf_dir), Some(bin_dir), Some(socket), Some(namespaces)) => {
                                Some(Box::new(ambit_agent::cni::watch::ChainWatch {
                                    chain: ambit_agent::cni::install::ChainOptions {
                                        conf_dir: conf_dir.clone(),
                                        agent_socket: socket.clone(),
                                        namespaces_file: namespaces.clone(),
                                    },
                                    bin_dir: bin_dir.clone(),
                                    interval: ambit_agent::cni::watch::DEFAULT_INTERVAL,
                                }))
                            }
                            _ => None,
                        },
                        cni_socket: args.cni_socket,
                        namespaces_file: args.namespaces_file,
                    },
                ),
            };
            let remote_ca = match (args.ca_address, args.ca_token_file, args.ca_trust_file) {
                (Some(address), Some(token), Some(trust)) => {
                    let mut config =
                        ambit_agent::identity::RemoteCaConfig::new(address, token, trust);
                    config.extra_bundle_file = args.ca_extra_bundle_file;
                    config.cluster_id = args.cluster_id;
                    Some(config)
                }
                _ => None,
            };
            let options = ambit_agent::app::AgentOptions {
                node,
                source,
                remote_ca,
                pin_dir: args.pin_dir,
                state_dir: args.state_dir,
                ca_cert: args.ca_cert,
                ca_key: args.ca_key,
                cert_ttl: Duration::from_secs(args.cert_ttl_secs),
                tunnel: ambit_agent::tunnel::TunnelConfig {
                    pool_idle_timeout: Duration::from_secs(args.pool_idle_secs),
                    pooling: !args.no_pool,
                    tls_handshake_timeout: Duration::from_millis(args.tls_handshake_timeout_ms),
                    hbone_idle_timeout: Duration::from_secs(args.hbone_idle_timeout_secs),
                    max_header_list_size: args.max_header_list_size,
                    ..Default::default()
                },
                admin_addr: args.admin_addr,
                metrics_addr: args.metrics_addr,
                readiness_addr: args.readiness_addr,
                drain_deadline: Duration::from_millis(args.drain_deadline_ms),
                ebpf_log_level: args.ebpf_log_level,
                log: Some(log),
            };
            tokio::runtime::Builder::new_multi_thread()
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
