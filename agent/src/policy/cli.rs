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
multi-document); other kinds are skipped. Agent local-mode configuration files \
are not supported yet."
)]
pub struct CheckArgs {
    /// Istio policy YAML file (multi-document, `---` separated).
    #[arg(long)]
    pub config: PathBuf,
    /// Source: a principal (`spiffe://td/ns/x/sa/y` or `td/ns/x/sa/y`) for an
    /// mTLS connection, or an IP address for a plaintext one.
    #[arg(long)]
    pub from: String,
    /// Source IP when `--from` is a principal.
    #[arg(long, default_value = DEFAULT_SOURCE_IP)]
    pub from_ip: IpAddr,
    /// Destination: `namespace/workload-name` or just `namespace`. The name is
    /// only shown; selectors match the `--label`s.
    #[arg(long)]
    pub to: String,
    /// Destination (workload target) port.
    #[arg(long)]
    pub port: u16,
    /// Destination workload label `key=value`; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Destination IP.
    #[arg(long, default_value = DEFAULT_DESTINATION_IP)]
    pub to_ip: IpAddr,
    /// Namespace for policies without metadata.namespace.
    #[arg(long, default_value = "default")]
    pub default_namespace: String,
    /// Istio root namespace: its policies apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
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

/// Loads the policies and evaluates one connection.
pub fn check(args: &CheckArgs) -> Result<CheckOutcome, CheckError> {
    let source = parse_from(&args.from)?;
    let (namespace, name) = parse_to(&args.to)?;
    let labels = parse_labels(&args.labels)?;

    let input = std::fs::read_to_string(&args.config).map_err(|source| CheckError::Read {
        path: args.config.clone(),
        source,
    })?;
    let (set, policy_warnings) =
        PolicySet::from_yaml(&input, &args.default_namespace, &args.root_namespace).map_err(
            |source| CheckError::Policy {
                path: args.config.clone(),
                source: Box::new(source),
            },
        )?;

    let mut warnings: Vec<String> = policy_warnings
        .iter()
        .map(|w| format!("warning: {w}"))
        .collect();
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
        destination_ip: args.to_ip,
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
            to_ip: DEFAULT_DESTINATION_IP.parse().expect("ip"),
            default_namespace: "default".to_owned(),
            root_namespace: "istio-system".to_owned(),
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

    #[test]
    fn malformed_file_error_names_file() {
        let dir = std::env::temp_dir().join(format!("ambit-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("broken.yaml");
        std::fs::write(&path, "kind: PeerAuthentication\nmetadata: [unclosed\n").expect("write");
        let err = check(&args(path.clone(), "10.0.0.9", "default", &[])).expect_err("must fail");
        let msg = err.to_string();
        assert!(matches!(err, CheckError::Policy { .. }), "{msg}");
        assert!(msg.contains("broken.yaml"), "{msg}");
        assert!(msg.contains("invalid YAML"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
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
