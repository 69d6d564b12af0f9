//! The flags of `ambit run` and how they become [`AgentOptions`]. In the library (not the
//! binary) so that a unit test can walk every flag and check the config dump shows it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::{AgentOptions, KubernetesOptions, SourceOptions};
use crate::observability::LogControl;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// This node's name; the agent enrolls the opted-in pods scheduled on it. Also from
    /// NODE_NAME (the downward API in the DaemonSet).
    #[arg(long, env = "AMBIT_NODE")]
    pub node: Option<String>,
    /// Local mode: the mesh described by this file (docs/LOCAL-MODE.md); watched, changes
    /// apply live.
    #[arg(
        long,
        env = "AMBIT_CONFIG",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub config: Option<PathBuf>,
    /// Kubernetes mode: learn the mesh from the API server (in-cluster configuration,
    /// --kubeconfig, or KUBECONFIG). docs/KUBERNETES.md.
    #[arg(long)]
    pub kubernetes: bool,
    /// Kubeconfig to reach the API server from outside the cluster.
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the host's /proc, scanned to find pods' network namespaces.
    #[arg(long, env = "AMBIT_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Kubernetes mode: unix socket the ambit-cni plugin asks to enroll new pods.
    #[arg(long, env = "AMBIT_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// Kubernetes mode: file listing the opted-in namespaces, read by the ambit-cni plugin
    /// when the agent cannot be reached.
    #[arg(long, env = "AMBIT_NAMESPACES_FILE")]
    pub namespaces_file: Option<PathBuf>,
    /// Kubernetes mode: the node's CNI config directory (as mounted in the agent). When set,
    /// the agent chains ambit-cni again whenever the network plugin rewrites its config
    /// without it; needs --cni-socket, --namespaces-file and --cni-bin-dir.
    #[arg(long, env = "AMBIT_CNI_CONF_DIR", requires_all = ["cni_socket", "namespaces_file", "cni_bin_dir"])]
    pub cni_conf_dir: Option<PathBuf>,
    /// Kubernetes mode: the node's CNI bin directory (as mounted in the agent); the chain is
    /// repaired only while ambit-cni is installed there.
    #[arg(long, env = "AMBIT_CNI_BIN_DIR", requires = "cni_conf_dir")]
    pub cni_bin_dir: Option<PathBuf>,
    /// Kubernetes mode: the mesh's SPIFFE trust domain.
    #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Kubernetes mode: where mesh-wide Istio policies live.
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
    /// bpffs directory for ambit's pinned programs, links and maps.
    #[arg(long, env = "AMBIT_PIN_DIR", default_value = crate::capture::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Directory for the agent's own state (the local CA when none is given).
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/lib/ambit")]
    pub state_dir: PathBuf,
    /// CA certificate (PEM) signing workload certificates; with --ca-key.
    #[arg(long, env = "AMBIT_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// CA private key (PEM); with --ca-cert.
    #[arg(long, env = "AMBIT_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// A CA service to ask for workload certificates (`ambit ca`, or istiod):
    /// `https://host:15012`. Without it the agent signs with a CA key of its own (local
    /// mode). docs/CERTIFICATES.md.
    #[arg(long, env = "AMBIT_CA_ADDRESS", conflicts_with_all = ["ca_cert", "ca_key"], requires_all = ["ca_token_file", "ca_trust_file"])]
    pub ca_address: Option<String>,
    /// Projected service-account token sent to the CA (re-read for every request).
    #[arg(long, env = "AMBIT_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,
    /// PEM roots the CA's serving certificate must chain to.
    #[arg(long, env = "AMBIT_CA_TRUST_FILE")]
    pub ca_trust_file: Option<PathBuf>,
    /// Extra PEM roots for the mesh trust bundle (e.g. during a root migration).
    #[arg(long, env = "AMBIT_CA_EXTRA_BUNDLE_FILE")]
    pub ca_extra_bundle_file: Option<PathBuf>,
    /// Cluster ID sent to the CA as the `clusterid` header (istiod needs it).
    #[arg(long, env = "AMBIT_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Lifetime of workload certificates, in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    pub cert_ttl_secs: u64,
    /// How often the config file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub reload_interval_ms: u64,
    /// Inbound HBONE: a peer that has not finished its TLS handshake and HTTP/2 preface
    /// within this many milliseconds is reset.
    #[arg(long, default_value_t = 10_000)]
    pub tls_handshake_timeout_ms: u64,
    /// Inbound HBONE: a connection without open streams for this many seconds gets GOAWAY.
    #[arg(long, default_value_t = 600)]
    pub hbone_idle_timeout_secs: u64,
    /// Inbound HBONE: the largest CONNECT header block accepted (bytes); larger gets 431.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_header_list_size: u32,
    /// HBONE, both sides: send an HTTP/2 PING on every connection this often (seconds)...
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive_interval_secs: u64,
    /// ...and drop a connection whose peer leaves one unanswered this long, resetting its
    /// streams (seconds).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive_timeout_secs: u64,
    /// Close pooled HBONE connections idle for this many seconds.
    #[arg(long, default_value_t = 300)]
    pub pool_idle_secs: u64,
    /// Admin API (config dump, certs, log level, /quitquitquit); keep it on localhost.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = crate::observability::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics, /stats/prometheus).
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = crate::observability::DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Readiness probe (/healthz/ready).
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = crate::observability::DEFAULT_READINESS_ADDR)]
    pub readiness_addr: SocketAddr,
    /// On /quitquitquit or SIGTERM, how long open connections may finish before being closed.
    #[arg(long, default_value_t = 5000)]
    pub drain_deadline_ms: u64,
    /// Most verbose level of the eBPF programs' own log messages (error, warn, info, debug,
    /// trace); they appear in the agent's log. Fixed at load: debug logs every capture.
    #[arg(long, default_value = "warn")]
    pub ebpf_log_level: tracing::Level,
    /// Do not pool HBONE connections: every proxied connection gets its own TCP + TLS +
    /// HTTP/2 connection, closed when it ends (one stream per connection, no idle reuse).
    /// For measuring the cost of a full handshake per connection; not for production.
    #[arg(long)]
    pub no_pool: bool,
    /// Experimental: move the bytes of the local legs (app <-> agent inside a pod) through
    /// the kernel's sockmap (sk_msg redirect) instead of loopback TCP. Off by default: on
    /// this kernel a blocking recv() on a socket in a sockmap can fail with EAGAIN when
    /// woken without data (e.g. after the app's own half-close), which breaks
    /// applications that use blocking sockets.
    #[arg(long)]
    pub sockmap: bool,
    /// Threads that run the data path, each a single-threaded runtime that keeps a
    /// connection from accept to close (TOKIO_WORKER_THREADS is not read). Default: 2, or 1
    /// where the process may use only one CPU (see --cpu-limit-millis). More spreads many
    /// busy connections over more cores; the agent uses at most this many cores for
    /// proxying (the control plane has a thread of its own).
    #[arg(long, env = "AMBIT_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// The container's CPU limit in millicores, which lowers the default of
    /// --worker-threads to the cores it allows (rounded up). The DaemonSet passes
    /// `limits.cpu` here through the downward API: the agent cannot see its own quota, as
    /// it mounts the host's cgroup tree. Without a limit Kubernetes passes the node's
    /// allocatable CPUs, which leaves the default as it is.
    #[arg(long, env = "AMBIT_CPU_LIMIT_MILLIS", value_parser = clap::value_parser!(u64).range(1..))]
    pub cpu_limit_millis: Option<u64>,
}

impl RunArgs {
    /// The options these flags stand for; `log` is the live log filter, when logging is set
    /// up by the caller.
    pub fn into_options(self, log: Option<LogControl>) -> anyhow::Result<AgentOptions> {
        let args = self;
        let node = args
            .node
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .context("--node (or AMBIT_NODE / NODE_NAME) is required")?;
        let source = match args.config {
            Some(path) => SourceOptions::File {
                path,
                reload_interval: Duration::from_millis(args.reload_interval_ms),
            },
            None => SourceOptions::Kubernetes(KubernetesOptions {
                kubeconfig: args.kubeconfig,
                settings: crate::config::MeshSettings {
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
                        Some(Box::new(crate::cni::watch::ChainWatch {
                            chain: crate::cni::install::ChainOptions {
                                conf_dir: conf_dir.clone(),
                                agent_socket: socket.clone(),
                                namespaces_file: namespaces.clone(),
                            },
                            bin_dir: bin_dir.clone(),
                            interval: crate::cni::watch::DEFAULT_INTERVAL,
                        }))
                    }
                    _ => None,
                },
                cni_socket: args.cni_socket,
                namespaces_file: args.namespaces_file,
            }),
        };
        let remote_ca = match (args.ca_address, args.ca_token_file, args.ca_trust_file) {
            (Some(address), Some(token), Some(trust)) => {
                let mut config = crate::identity::RemoteCaConfig::new(address, token, trust);
                config.extra_bundle_file = args.ca_extra_bundle_file;
                config.cluster_id = args.cluster_id;
                Some(config)
            }
            _ => None,
        };
        let options = AgentOptions {
            node,
            source,
            remote_ca,
            pin_dir: args.pin_dir,
            state_dir: args.state_dir,
            ca_cert: args.ca_cert,
            ca_key: args.ca_key,
            cert_ttl: Duration::from_secs(args.cert_ttl_secs),
            tunnel: crate::tunnel::TunnelConfig {
                pool_idle_timeout: Duration::from_secs(args.pool_idle_secs),
                pooling: !args.no_pool,
                tls_handshake_timeout: Duration::from_millis(args.tls_handshake_timeout_ms),
                hbone_idle_timeout: Duration::from_secs(args.hbone_idle_timeout_secs),
                max_header_list_size: args.max_header_list_size,
                keepalive_interval: Duration::from_secs(args.keepalive_interval_secs),
                keepalive_timeout: Duration::from_secs(args.keepalive_timeout_secs),
                ..Default::default()
            },
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            readiness_addr: args.readiness_addr,
            drain_deadline: Duration::from_millis(args.drain_deadline_ms),
            ebpf_log_level: args.ebpf_log_level,
            sockmap: args.sockmap,
            worker_threads: args.worker_threads.map_or_else(
                || {
                    default_worker_threads(
                        std::thread::available_parallelism().map_or(1, usize::from),
                        args.cpu_limit_millis,
                    )
                },
                usize::from,
            ),
            cpu_limit_millis: args.cpu_limit_millis,
            log,
        };
        Ok(options)
    }
}

/// Two threads, like ztunnel's default: a node agent should not claim a thread per core of
/// a large node unasked; fewer where the process may use fewer CPUs. `cpus` is
/// `available_parallelism` (the affinity mask, and a cgroup CPU quota where the process's
/// own cgroup files are visible: not under the DaemonSet); `cpu_limit_millis` the
/// container's limit as the downward API gives it.
fn default_worker_threads(cpus: usize, cpu_limit_millis: Option<u64>) -> usize {
    let by_limit = cpu_limit_millis.map_or(usize::MAX, |m| {
        usize::try_from(m.div_ceil(1000)).unwrap_or(usize::MAX)
    });
    cpus.min(by_limit).clamp(1, 2)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};
    use serde_json::Value;

    use super::*;

    /// `ambit run`'s flags on their own, as the binary nests them.
    #[derive(Parser)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Mode {
        Both,
        File,
        Kubernetes,
    }

    /// Every flag of `ambit run`: a value no default has (`None`: a switch), the run it
    /// belongs to (local mode and Kubernetes mode exclude each other), where it must appear
    /// in the dump's `config`, and as what (`None`: present).
    /// Flag, value given, run, JSON pointer under `config`, expected JSON.
    type Sample = (
        &'static str,
        Option<&'static str>,
        Mode,
        &'static str,
        Option<&'static str>,
    );

    #[rustfmt::skip] // a table: one flag a line
    const SAMPLES: &[Sample] = &[
        ("node", Some("node-sample"), Mode::Both, "/node", Some(r#""node-sample""#)),
        ("pin-dir", Some("/s/pin"), Mode::Both, "/pinDir", Some(r#""/s/pin""#)),
        ("state-dir", Some("/s/state"), Mode::Both, "/stateDir", Some(r#""/s/state""#)),
        ("cert-ttl-secs", Some("4321"), Mode::Both, "/certTtl", Some(r#""4321s""#)),
        ("tls-handshake-timeout-ms", Some("7001"), Mode::Both, "/tunnel/tlsHandshakeTimeout", Some(r#""7001ms""#)),
        ("hbone-idle-timeout-secs", Some("6001"), Mode::Both, "/tunnel/hboneIdleTimeout", Some(r#""6001s""#)),
        ("max-header-list-size", Some("12345"), Mode::Both, "/tunnel/maxHeaderListSize", Some("12345")),
        ("keepalive-interval-secs", Some("11"), Mode::Both, "/tunnel/keepaliveInterval", Some(r#""11s""#)),
        ("keepalive-timeout-secs", Some("23"), Mode::Both, "/tunnel/keepaliveTimeout", Some(r#""23s""#)),
        ("pool-idle-secs", Some("3001"), Mode::Both, "/tunnel/poolIdleTimeout", Some(r#""3001s""#)),
        ("admin-addr", Some("127.0.0.2:1501"), Mode::Both, "/adminAddr", Some(r#""127.0.0.2:1501""#)),
        ("metrics-addr", Some("127.0.0.3:1502"), Mode::Both, "/metricsAddr", Some(r#""127.0.0.3:1502""#)),
        ("readiness-addr", Some("127.0.0.4:1503"), Mode::Both, "/readinessAddr", Some(r#""127.0.0.4:1503""#)),
        ("drain-deadline-ms", Some("2345"), Mode::Both, "/drainDeadline", Some(r#""2345ms""#)),
        ("ebpf-log-level", Some("debug"), Mode::Both, "/ebpfLogLevel", Some(r#""DEBUG""#)),
        ("no-pool", None, Mode::Both, "/tunnel/pooling", Some("false")),
        ("sockmap", None, Mode::Both, "/sockmap", Some("true")),
        ("worker-threads", Some("3"), Mode::Both, "/workerThreads", Some("3")),
        ("cpu-limit-millis", Some("1500"), Mode::Both, "/cpuLimitMillis", Some("1500")),
        ("config", Some("/s/mesh.yaml"), Mode::File, "/source/file/config", Some(r#""/s/mesh.yaml""#)),
        ("reload-interval-ms", Some("333"), Mode::File, "/source/file/reloadInterval", Some(r#""333ms""#)),
        ("ca-cert", Some("/s/ca.pem"), Mode::File, "/caCert", Some(r#""/s/ca.pem""#)),
        ("ca-key", Some("/s/ca-key.pem"), Mode::File, "/caKey", Some(r#""/s/ca-key.pem""#)),
        ("kubernetes", None, Mode::Kubernetes, "/source/kubernetes", None),
        ("kubeconfig", Some("/s/kubeconfig"), Mode::Kubernetes, "/source/kubernetes/kubeconfig", Some(r#""/s/kubeconfig""#)),
        ("proc-root", Some("/s/proc"), Mode::Kubernetes, "/source/kubernetes/procRoot", Some(r#""/s/proc""#)),
        ("cni-socket", Some("/s/cni.sock"), Mode::Kubernetes, "/source/kubernetes/cniSocket", Some(r#""/s/cni.sock""#)),
        ("namespaces-file", Some("/s/namespaces"), Mode::Kubernetes, "/source/kubernetes/namespacesFile", Some(r#""/s/namespaces""#)),
        ("cni-conf-dir", Some("/s/net.d"), Mode::Kubernetes, "/source/kubernetes/cniChain/chain/confDir", Some(r#""/s/net.d""#)),
        ("cni-bin-dir", Some("/s/cni-bin"), Mode::Kubernetes, "/source/kubernetes/cniChain/binDir", Some(r#""/s/cni-bin""#)),
        ("trust-domain", Some("sample.td"), Mode::Kubernetes, "/source/kubernetes/settings/trustDomain", Some(r#""sample.td""#)),
        ("root-namespace", Some("sample-root"), Mode::Kubernetes, "/source/kubernetes/settings/rootNamespace", Some(r#""sample-root""#)),
        ("ca-address", Some("https://ca.sample:15012"), Mode::Kubernetes, "/remoteCa/address", Some(r#""https://ca.sample:15012""#)),
        ("ca-token-file", Some("/s/token"), Mode::Kubernetes, "/remoteCa/tokenFile", Some(r#""/s/token""#)),
        ("ca-trust-file", Some("/s/trust.pem"), Mode::Kubernetes, "/remoteCa/trustFile", Some(r#""/s/trust.pem""#)),
        ("ca-extra-bundle-file", Some("/s/extra.pem"), Mode::Kubernetes, "/remoteCa/extraBundleFile", Some(r#""/s/extra.pem""#)),
        ("cluster-id", Some("sample-cluster"), Mode::Kubernetes, "/remoteCa/clusterId", Some(r#""sample-cluster""#)),
    ];

    /// Flags that are not agent options.
    const NOT_OPTIONS: &[&str] = &["help"];

    fn sample_args(mode: Mode) -> Vec<String> {
        let mut args = vec!["run".to_owned()];
        for (flag, value, m, _, _) in SAMPLES {
            if *m == Mode::Both || *m == mode {
                args.push(format!("--{flag}"));
                args.extend(value.map(str::to_owned));
            }
        }
        args
    }

    fn options(args: &[String]) -> AgentOptions {
        Run::try_parse_from(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .args
            .into_options(None)
            .expect("options")
    }

    /// The whole `/config_dump` of an agent with these options and no mesh yet.
    fn dump(options: &AgentOptions) -> Value {
        let state = super::super::empty_state(Default::default(), &options.node).expect("state");
        let source = super::super::SourceInfo {
            kind: "file",
            origin: "test".to_owned(),
            last_change_unix: 0,
        };
        super::super::view::config_dump(&state, source, &[], &[], options)
    }

    #[test]
    fn every_run_flag_shows_in_the_config_dump_with_its_value() {
        let command = Run::command();
        let flags: Vec<&str> = command
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|long| !NOT_OPTIONS.contains(long))
            .collect();
        assert!(flags.len() > 20, "the flags of `ambit run`: {flags:?}");
        for flag in &flags {
            assert!(
                SAMPLES.iter().any(|s| s.0 == *flag),
                "--{flag} is not checked here: make sure AgentOptions carries it (the dump \
                 and start-up log serialize AgentOptions), then add a sample above"
            );
        }
        for (flag, ..) in SAMPLES {
            assert!(
                flags.contains(flag),
                "--{flag} is no flag of `ambit run` any more"
            );
        }
        for mode in [Mode::File, Mode::Kubernetes] {
            let dump = dump(&options(&sample_args(mode)));
            let config = &dump["config"];
            for (flag, _, m, pointer, expected) in SAMPLES {
                if *m != Mode::Both && *m != mode {
                    continue;
                }
                let found = config.pointer(pointer).unwrap_or_else(|| {
                    panic!("--{flag}: nothing at config{pointer} in {config:#}")
                });
                if let Some(expected) = expected {
                    let expected: Value = serde_json::from_str(expected).expect("sample JSON");
                    assert_eq!(found, &expected, "--{flag} at config{pointer}");
                }
            }
        }
    }

    #[test]
    fn defaults_show_in_readable_units() {
        let args: Vec<String> = ["run", "--node", "n", "--config", "/m.yaml"]
            .map(str::to_owned)
            .to_vec();
        let config = dump(&options(&args))["config"].clone();
        assert_eq!(config["certTtl"], "86400s");
        assert_eq!(config["drainDeadline"], "5s");
        assert_eq!(config["source"]["file"]["reloadInterval"], "500ms");
        assert_eq!(config["tunnel"]["pooling"], true);
        assert_eq!(config["sockmap"], false);
        assert_eq!(config["remoteCa"], Value::Null);
        assert_eq!(
            config["adminAddr"],
            crate::observability::DEFAULT_ADMIN_ADDR
        );
    }

    #[test]
    fn no_secret_reaches_the_dump_or_the_start_up_log() {
        let dir = std::env::temp_dir().join(format!("ambit-dump-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let token_file = dir.join("token");
        let key_file = dir.join("ca-key.pem");
        const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.token-value-never-shown";
        const KEY: &str = "-----BEGIN PRIVATE KEY-----\nkey-value-never-shown\n";
        std::fs::write(&token_file, TOKEN).expect("token file");
        std::fs::write(&key_file, KEY).expect("key file");
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let runs = [
            vec![
                "run",
                "--node",
                "n",
                "--kubernetes",
                "--ca-address",
                "https://ca:15012",
            ]
            .into_iter()
            .map(str::to_owned)
            .chain(["--ca-token-file".to_owned(), path(&token_file)])
            .chain(["--ca-trust-file".to_owned(), path(&key_file)])
            .collect::<Vec<_>>(),
            vec![
                "run",
                "--node",
                "n",
                "--config",
                "/m.yaml",
                "--ca-cert",
                "/c.pem",
            ]
            .into_iter()
            .map(str::to_owned)
            .chain(["--ca-key".to_owned(), path(&key_file)])
            .collect(),
        ];
        let mut outcome = Ok(());
        for args in &runs {
            let options = options(args);
            let dump = dump(&options).to_string();
            let log = serde_json::to_string(&options).expect("options JSON");
            for text in [&dump, &log] {
                let leaked = [
                    "token-value-never-shown",
                    "key-value-never-shown",
                    "PRIVATE KEY",
                ]
                .into_iter()
                .find(|secret| text.contains(secret));
                if let Some(secret) = leaked {
                    outcome = Err(format!("{secret:?} leaked into {text}"));
                }
                if !text.contains(&path(&key_file)) {
                    outcome = Err(format!("the key's path is missing from {text}"));
                }
            }
        }
        std::fs::remove_dir_all(&dir).expect("remove temp dir");
        outcome.expect("no secrets, paths shown");
    }

    #[test]
    fn worker_threads_default_to_two_or_fewer_when_cpus_or_the_limit_allow_fewer() {
        // (CPUs the process may use, CPU limit in millicores, threads)
        for (cpus, limit, threads) in [
            (64, None, 2),
            (2, None, 2),
            (1, None, 1),
            (64, Some(500), 1),
            (64, Some(1000), 1),
            (64, Some(1001), 2),
            (64, Some(64_000), 2),
            (1, Some(4000), 1),
        ] {
            assert_eq!(
                default_worker_threads(cpus, limit),
                threads,
                "{cpus} CPUs, limit {limit:?}"
            );
        }
        // An explicit --worker-threads wins over the limit.
        let run = |extra: &[&str]| {
            let mut args = vec!["run", "--node", "n", "--config", "/m.yaml"];
            args.extend_from_slice(extra);
            Run::try_parse_from(args)
                .expect("flags")
                .args
                .into_options(None)
                .expect("options")
                .worker_threads
        };
        // (An AMBIT_WORKER_THREADS in the test's own environment would be an explicit
        // setting too.)
        if std::env::var_os("AMBIT_WORKER_THREADS").is_none() {
            assert_eq!(run(&["--cpu-limit-millis", "250"]), 1);
        }
        assert_eq!(
            run(&["--cpu-limit-millis", "250", "--worker-threads", "4"]),
            4
        );
        let zero = Run::try_parse_from([
            "run",
            "--node",
            "n",
            "--config",
            "/m.yaml",
            "--cpu-limit-millis",
            "0",
        ]);
        let error = zero.err().expect("a zero limit is refused").to_string();
        assert!(error.contains("--cpu-limit-millis"), "{error}");
    }
}
