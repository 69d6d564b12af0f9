//! `ambit policy check`: evaluate one hypothetical connection against a file
//! of Istio policies. The logic lives here, not in `main.rs`, so it can be
//! tested without spawning processes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use super::{Connection, PolicyError, PolicySet, Workload};
use crate::identity::SpiffeId;

/// Source address used when `--from` is a principal and `--from-ip` is absent.
pub const DEFAULT_SOURCE_IP: &str = "10.0.0.1";
/// Destination address used when `--to-ip` is absent.
pub const DEFAULT_DESTINATION_IP: &str = "10.0.0.2";

/// Arguments of `ambit policy check`.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Exit status: 0 = ALLOW, 1 = DENY, 2 = usage or configuration error.\n\n\
--config takes plain Istio YAML (PeerAuthentication and AuthorizationPolicy, \
multi-document; other kinds are skipped) or an `ambit run` local-mode file. With a \
local-mode file the destination workload is looked up there (by --to namespace/name, \
else by --to-ip) and its labels, its first IP and the file's rootNamespace and \
defaultNamespace are used, so the answer is the one `ambit run` gives; --label, \
--to-ip, --root-namespace and --default-namespace override them."
)]
pub struct CheckArgs {
    /// Istio policy YAML file (multi-document, `---` separated), or a
    /// local-mode file (with an `AmbitLocalConfig` document).
    #[arg(long)]
    pub config: PathBuf,
    /// Source: a principal (`spiffe://td/ns/x/sa/y` or `td/ns/x/sa/y`) for an
    /// mTLS connection, or an IP address for a plaintext one.
    #[arg(long)]
    pub from: String,
    /// Source IP when `--from` is a principal.
    #[arg(long, default_value = DEFAULT_SOURCE_IP)]
    pub from_ip: IpAddr,
    /// Destination: `namespace/workload-name` or just `namespace`. With a
    /// local-mode file the workload is looked up by name; otherwise the name
    /// is only shown and selectors match the `--label`s.
    #[arg(long)]
    pub to: String,
    /// Destination (workload target) port.
    #[arg(long)]
    pub port: u16,
    /// Destination workload label `key=value`; repeatable. Added to (and
    /// overriding) the workload's labels from a local-mode file.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Destination IP [default: the workload's first IP from a local-mode
    /// file, else 10.0.0.2].
    #[arg(long)]
    pub to_ip: Option<IpAddr>,
    /// Namespace for policies without metadata.namespace [default: the
    /// local-mode file's defaultNamespace, else `default`].
    #[arg(long)]
    pub default_namespace: Option<String>,
    /// Istio root namespace: its policies apply mesh-wide [default: the
    /// local-mode file's rootNamespace, else `istio-system`].
    #[arg(long)]
    pub root_namespace: Option<String>,
}

/// The result of a check: what to print and how to exit.
#[derive(Debug, Clone)]
pub struct CheckOutcome {
    pub allowed: bool,
    /// Policy warnings, one per line (for stderr).
    pub warnings: Vec<String>,
    /// The decision, deciding policy and rule (for stdout).
    pub text: String,
}

impl CheckOutcome {
    /// 0 for ALLOW, 1 for DENY.
    pub fn exit_code(&self) -> i32 {
        if self.allowed { 0 } else { 1 }
    }
}

/// Usage and configuration errors (exit status 2); each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("reading {path}: {source}", path = path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}", path = path.display())]
    Policy {
        path: PathBuf,
        // Boxed: PolicyError is large and this enum is returned everywhere.
        #[source]
        source: Box<PolicyError>,
    },
    #[error("{path}: {source}", path = path.display())]
    Config {
        path: PathBuf,
        // Boxed for the same reason as `Policy`.
        #[source]
        source: Box<crate::config::ConfigError>,
    },
    #[error("{0}")]
    Usage(String),
}

/// How `--from` was understood.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Plaintext(IpAddr),
    /// Principal as matched by policies, and a note when it is not a valid
    /// SPIFFE ID (it is still matched verbatim, like Istio does).
    Principal(String, Option<String>),
}

fn parse_from(from: &str) -> Result<Source, CheckError> {
    let from = from.trim();
    if from.is_empty() {
        return Err(CheckError::Usage("--from is empty".to_owned()));
    }
    if let Ok(ip) = from.parse::<IpAddr>() {
        return Ok(Source::Plaintext(ip));
    }
    // Istio writes principals without the scheme; normalise to the SPIFFE
    // form the tunnel reports so output matches what the agent would see.
    let full = if from.starts_with("spiffe://") {
        from.to_owned()
    } else {
        format!("spiffe://{from}")
    };
    Ok(match full.parse::<SpiffeId>() {
        Ok(id) => Source::Principal(id.to_string(), None),
        Err(e) => Source::Principal(from.to_owned(), Some(e.to_string())),
    })
}

fn parse_to(to: &str) -> Result<(&str, Option<&str>), CheckError> {
    let bad = || CheckError::Usage(format!("--to {to:?}: expected namespace or namespace/name"));
    match to.split_once('/') {
        None if !to.is_empty() => Ok((to, None)),
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns, Some(name)))
        }
        _ => Err(bad()),
    }
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, CheckError> {
    labels
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(CheckError::Usage(format!(
                "--label {kv:?}: expected key=value"
            ))),
        })
        .collect()
}

/// Node name given to the local-mode parser: no workload runs on it, so the
/// checks that only concern the agent's own node (netns paths) do not apply.
const NO_NODE: &str = "";

/// What the file says about the destination, when it is a local-mode file.
struct LocalMode {
    labels: BTreeMap<String, String>,
    ip: Option<IpAddr>,
    root_namespace: String,
    default_namespace: String,
}

/// Splits a local-mode file: its `AmbitLocalConfig` defaults and the other
/// documents. `None` when the file has no such document (plain Istio YAML).
fn local_mode_defaults(input: &str) -> Option<(String, String)> {
    use serde::Deserialize;
    for de in serde_yaml::Deserializer::from_str(input) {
        let Ok(doc) = serde_yaml::Value::deserialize(de) else {
            return None;
        };
        if doc.get("kind").and_then(serde_yaml::Value::as_str)
            == Some(crate::config::LOCAL_CONFIG_KIND)
        {
            let text = |key: &str, default: &str| {
                doc.get(key)
                    .and_then(serde_yaml::Value::as_str)
                    .unwrap_or(default)
                    .to_owned()
            };
            return Some((
                text("rootNamespace", "istio-system"),
                text("defaultNamespace", "default"),
            ));
        }
    }
    None
}

/// Loads the policies and evaluates one connection.
pub fn check(args: &CheckArgs) -> Result<CheckOutcome, CheckError> {
    let source = parse_from(&args.from)?;
    let (namespace, name) = parse_to(&args.to)?;
    let flag_labels = parse_labels(&args.labels)?;

    let input = std::fs::read_to_string(&args.config).map_err(|source| CheckError::Read {
        path: args.config.clone(),
        source,
    })?;

    let mut warnings: Vec<String> = Vec::new();
    let local = match local_mode_defaults(&input) {
        None => None,
        Some((file_root, file_default)) => {
            // The same validation `ambit run` applies; a file it refuses is refused here.
            let (state, _) =
                crate::config::parse(&input, NO_NODE).map_err(|source| CheckError::Config {
                    path: args.config.clone(),
                    source: Box::new(source),
                })?;
            let workload = match (name, args.to_ip) {
                (Some(name), _) => {
                    Some(state.workload_by_name(namespace, name).ok_or_else(|| {
                        CheckError::Usage(format!(
                            "--to {namespace}/{name}: no such workload in {}",
                            args.config.display()
                        ))
                    })?)
                }
                (None, Some(ip)) => state.workload_by_ip(ip),
                (None, None) => None,
            };
            if let Some(w) = workload {
                if w.namespace != namespace {
                    return Err(CheckError::Usage(format!(
                        "--to-ip {}: that is workload {}/{}, not in namespace {namespace}",
                        args.to_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                        w.namespace,
                        w.name
                    )));
                }
            } else {
                warnings.push(format!(
                    "warning: no workload of {} matches --to {} (give namespace/name or --to-ip); \
                     only --label selects policies",
                    args.config.display(),
                    args.to
                ));
            }
            Some(LocalMode {
                labels: workload.map(|w| w.labels.clone()).unwrap_or_default(),
                ip: workload.and_then(|w| w.ips.first().copied()),
                root_namespace: file_root,
                default_namespace: file_default,
            })
        }
    };

    let root_namespace = args
        .root_namespace
        .clone()
        .or_else(|| local.as_ref().map(|l| l.root_namespace.clone()))
        .unwrap_or_else(|| "istio-system".to_owned());
    let default_namespace = args
        .default_namespace
        .clone()
        .or_else(|| local.as_ref().map(|l| l.default_namespace.clone()))
        .unwrap_or_else(|| "default".to_owned());
    let mut labels = local.as_ref().map(|l| l.labels.clone()).unwrap_or_default();
    labels.extend(flag_labels);
    let destination_ip = args
        .to_ip
        .or_else(|| local.as_ref().and_then(|l| l.ip))
        .unwrap_or_else(|| IpAddr::from([10, 0, 0, 2]));

    // The local-mode document is not a policy; PolicySet skips other kinds.
    let (set, policy_warnings) = PolicySet::from_yaml(&input, &default_namespace, &root_namespace)
        .map_err(|source| CheckError::Policy {
            path: args.config.clone(),
            source: Box::new(source),
        })?;
    warnings.splice(
        0..0,
        policy_warnings.iter().map(|w| format!("warning: {w}")),
    );
    let (principal, source_ip) = match &source {
        Source::Plaintext(ip) => (None, *ip),
        Source::Principal(p, note) => {
            if let Some(note) = note {
                warnings.push(format!("warning: --from is matched verbatim: {note}"));
            }
            (Some(p.as_str()), args.from_ip)
        }
    };

    let workload = Workload {
        namespace,
        labels: &labels,
    };
    let conn = Connection {
        source_principal: principal,
        source_ip,
        destination_ip,
        destination_port: args.port,
    };
    let decision = set.evaluate(&workload, &conn);

    // Writing to a String cannot fail; the results are ignored on purpose.
    let mut text = String::new();
    let _ = writeln!(text, "{}", set.explain(&workload, &conn));
    let target = match name {
        Some(name) => format!("{namespace}/{name}"),
        None => namespace.to_owned(),
    };
    let _ = writeln!(
        text,
        "decision: {} ({})",
        if decision.allowed { "ALLOW" } else { "DENY" },
        decision.reason
    );
    let _ = writeln!(text, "workload: {target} labels={labels:?}");
    match &decision.policy {
        Some(p) => {
            let _ = writeln!(text, "policy: {p}");
        }
        None => {
            let _ = writeln!(text, "policy: none");
        }
    }
    if let Some(rule) = decision.rule {
        let _ = writeln!(text, "rule: {rule}");
    }
    for p in &decision.audited {
        let _ = writeln!(text, "audited by: {p}");
    }
    Ok(CheckOutcome {
        allowed: decision.allowed,
        warnings,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(file: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures/seed-config/"
        ))
        .join(file)
    }

    fn args(config: PathBuf, from: &str, to: &str, labels: &[&str]) -> CheckArgs {
        CheckArgs {
            config,
            from: from.to_owned(),
            from_ip: DEFAULT_SOURCE_IP.parse().expect("ip"),
            to: to.to_owned(),
            port: 8080,
            labels: labels.iter().map(|s| (*s).to_owned()).collect(),
            to_ip: None,
            default_namespace: None,
            root_namespace: None,
        }
    }

    #[test]
    fn zero_trust_denies_plaintext_naming_policy() {
        let out = check(&args(
            fixture("22-zero-trust.yaml"),
            "10.1.2.3",
            "default/web",
            &[],
        ))
        .expect("check runs");
        assert!(!out.allowed);
        assert_eq!(out.exit_code(), 1);
        assert!(
            out.text.contains("policy: default/zero-trust"),
            "{}",
            out.text
        );
        assert!(out.text.contains("mtls_required"), "{}", out.text);
        // The rule-less DENY policy is warned about.
        assert!(
            out.warnings.iter().any(|w| w.contains("deny-all")),
            "{:?}",
            out.warnings
        );
    }

    #[test]
    fn zero_trust_allows_mtls_naming_peer_authentication() {
        let out = check(&args(
            fixture("22-zero-trust.yaml"),
            "cluster.local/ns/frontend/sa/web-app",
            "default/web",
            &[],
        ))
        .expect("check runs");
        assert!(out.allowed, "{}", out.text);
        assert_eq!(out.exit_code(), 0);
        assert!(
            out.text.contains("mtls=STRICT (from default/zero-trust)"),
            "{}",
            out.text
        );
        assert!(
            out.text
                .contains("spiffe://cluster.local/ns/frontend/sa/web-app"),
            "{}",
            out.text
        );
    }

    #[test]
    fn strict_authentication_allows_mtls_and_denies_plaintext() {
        let allowed = check(&args(
            fixture("10-strict-authentication.yaml"),
            "spiffe://cluster.local/ns/a/sa/b",
            "default",
            &[],
        ))
        .expect("check runs");
        assert!(allowed.allowed, "{}", allowed.text);
        assert!(
            allowed.text.contains("default/strict-authentication"),
            "{}",
            allowed.text
        );

        let denied = check(&args(
            fixture("10-strict-authentication.yaml"),
            "192.168.0.9",
            "default",
            &[],
        ))
        .expect("check runs");
        assert!(!denied.allowed);
        assert!(
            denied
                .text
                .contains("policy: default/strict-authentication"),
            "{}",
            denied.text
        );
    }

    #[test]
    fn identity_allow_fixture_is_fail_closed_on_l7_fields() {
        // The rule also requires GET /api/users/profile, which L4 cannot see:
        // the ALLOW never matches, so even the named principal is denied.
        let out = check(&args(
            fixture("13-identity-based-authorization.yaml"),
            "cluster.local/ns/frontend/sa/web-app",
            "default/user-service",
            &["app=user-service"],
        ))
        .expect("check runs");
        assert!(!out.allowed, "{}", out.text);
        assert!(out.text.contains("no_allow_policy_matched"), "{}", out.text);
    }

    /// A local-mode file like `ambit run` reads: the workload's labels, IP
    /// and the file's rootNamespace decide, as they do for the agent.
    const LOCAL: &str = "
apiVersion: ambit.dev/v1alpha1
kind: AmbitLocalConfig
rootNamespace: mesh-root
defaultNamespace: shop
namespaces:
  - {name: shop, labels: {ambit.dev/mesh: enabled}}
workloads:
  - {name: checkout-v1, namespace: shop, serviceAccount: checkout, labels: {app: checkout}, ips: [10.11.2.2], node: node2, netns: /run/netns/c}
  - {name: cart, namespace: shop, labels: {app: cart}, ips: [10.11.2.9], node: node2, netns: /run/netns/k}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh-root}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: checkout-from-frontend}
spec:
  selector: {matchLabels: {app: checkout}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
";

    /// A scratch directory removed when dropped, so a failing test leaves nothing behind.
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ambit-cli-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            Self(dir)
        }

        fn file(&self, name: &str, content: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, content).expect("write");
            path
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn local_mode_file_uses_the_workload_and_root_namespace() {
        let scratch = ScratchDir::new("local");
        let path = scratch.file("local.yaml", LOCAL);
        // The workload's label `app: checkout` brings in the ALLOW policy
        // (whose namespace is the file's defaultNamespace): another identity is denied.
        let other = check(&args(
            path.clone(),
            "cluster.local/ns/shop/sa/cart",
            "shop/checkout-v1",
            &[],
        ))
        .expect("check runs");
        assert!(!other.allowed, "{}", other.text);
        assert!(
            other.text.contains("policy: shop/checkout-from-frontend"),
            "{}",
            other.text
        );
        assert!(other.text.contains("-> 10.11.2.2:8080"), "{}", other.text);
        let frontend = check(&args(
            path.clone(),
            "cluster.local/ns/shop/sa/frontend",
            "shop/checkout-v1",
            &[],
        ))
        .expect("check runs");
        assert!(frontend.allowed, "{}", frontend.text);
        // The mesh-wide STRICT lives in the file's rootNamespace, not istio-system.
        let plaintext =
            check(&args(path.clone(), "10.11.2.9", "shop/cart", &[])).expect("check runs");
        assert!(!plaintext.allowed, "{}", plaintext.text);
        assert!(
            plaintext.text.contains("policy: mesh-root/default"),
            "{}",
            plaintext.text
        );
        // By IP instead of name.
        let mut by_ip = args(path.clone(), "cluster.local/ns/shop/sa/cart", "shop", &[]);
        by_ip.to_ip = Some("10.11.2.2".parse().expect("ip"));
        let by_ip = check(&by_ip).expect("check runs");
        assert!(!by_ip.allowed, "{}", by_ip.text);
        assert!(by_ip.text.contains("app\": \"checkout"), "{}", by_ip.text);
    }

    #[test]
    fn flags_override_the_local_mode_file() {
        let scratch = ScratchDir::new("override");
        let path = scratch.file("local.yaml", LOCAL);
        // --label replaces the workload's label: the ALLOW policy no longer selects it.
        let relabelled = check(&args(
            path.clone(),
            "cluster.local/ns/shop/sa/cart",
            "shop/checkout-v1",
            &["app=other"],
        ))
        .expect("check runs");
        assert!(relabelled.allowed, "{}", relabelled.text);
        // --root-namespace moves the mesh-wide STRICT out of reach.
        let mut rooted = args(path.clone(), "10.11.2.9", "shop/cart", &[]);
        rooted.root_namespace = Some("istio-system".to_owned());
        let rooted = check(&rooted).expect("check runs");
        assert!(rooted.allowed, "{}", rooted.text);
        // A workload the file does not declare is a usage error, not a silent guess.
        let err = check(&args(path.clone(), "10.11.2.9", "shop/nope", &[]))
            .expect_err("unknown workload");
        assert!(matches!(err, CheckError::Usage(_)), "{err}");
        assert!(err.to_string().contains("shop/nope"), "{err}");
    }

    #[test]
    fn malformed_file_error_names_file() {
        let scratch = ScratchDir::new("broken");
        let path = scratch.file(
            "broken.yaml",
            "kind: PeerAuthentication\nmetadata: [unclosed\n",
        );
        let err = check(&args(path.clone(), "10.0.0.9", "default", &[])).expect_err("must fail");
        let msg = err.to_string();
        assert!(matches!(err, CheckError::Policy { .. }), "{msg}");
        assert!(msg.contains("broken.yaml"), "{msg}");
        assert!(msg.contains("invalid YAML"), "{msg}");
    }

    #[test]
    fn missing_file_error_names_file() {
        let err = check(&args(
            fixture("no-such-file.yaml"),
            "10.0.0.9",
            "default",
            &[],
        ))
        .expect_err("must fail");
        assert!(err.to_string().contains("no-such-file.yaml"), "{err}");
    }

    #[test]
    fn bad_usage_is_reported() {
        let cfg = fixture("10-strict-authentication.yaml");
        assert!(matches!(
            check(&args(cfg.clone(), "10.0.0.9", "a/b/c", &[])),
            Err(CheckError::Usage(_))
        ));
        assert!(matches!(
            check(&args(cfg, "10.0.0.9", "default", &["novalue"])),
            Err(CheckError::Usage(_))
        ));
    }
}
