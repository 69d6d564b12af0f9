//! Observability: the Prometheus registry's agent-level metrics, the admin, metrics and
//! readiness HTTP servers, log setup with a runtime-adjustable level, and the small HTTP
//! client the CLI uses to talk to a running agent.
//!
//! Components own their metrics (`tunnel::Metrics`, `policy::metrics`, `identity::metrics`);
//! this module serves them and adds what belongs to the agent as a whole.

pub mod admin;
pub mod client;
pub mod logging;
pub mod metrics;
pub(crate) mod readable;

use std::net::SocketAddr;

use serde::Serialize;

pub use admin::{Admin, Listeners, Port, Reply};
pub use logging::{LogControl, LogFormat};
pub use metrics::AgentMetrics;

/// Default listen addresses (the ports Istio's node agents use).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";

#[derive(Debug, thiserror::Error)]
pub enum ObservabilityError {
    #[error("listening on {addr}: {source} (pick another address with the matching --*-addr flag)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot reach the agent's admin API at {addr}: {source}. Is the agent running \
         (`ambit run`)? If it listens elsewhere, pass --admin-addr (default {DEFAULT_ADMIN_ADDR})"
    )]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the agent at {addr} sent a malformed HTTP response")]
    BadResponse { addr: SocketAddr },
    #[error("the agent answered {path} with {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("invalid log level {spec:?}: {message}")]
    LogLevel { spec: String, message: String },
    #[error("the agent's answer is not the expected JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Whether the agent can serve traffic, and why not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub enrolled_pods: usize,
    pub programs_attached: Vec<String>,
    /// Empty when ready.
    pub problems: Vec<String>,
}

/// What the admin server asks the running agent; the app implements it.
pub trait AgentView: Send + Sync {
    fn readiness(&self) -> Readiness;
    /// Workloads, services, policies with warnings, certificate summary, effective config.
    fn config_dump(&self) -> serde_json::Value;
    /// Per identity: serial, validity, chain PEM (never keys).
    fn certs(&self) -> serde_json::Value;
    /// Brings metrics that are read from components (rather than pushed) up to date.
    fn refresh_metrics(&self);
    /// The threads that run connections, as started (not as configured).
    fn worker_threads(&self) -> Option<usize> {
        None
    }
}

/// PEM for a DER certificate (RFC 7468: base64 in 64-column lines).
pub fn pem_certificate(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_encodes_base64_with_padding() {
        assert!(pem_certificate(b"foobar").contains("\nZm9vYmFy\n"));
        assert!(pem_certificate(b"fooba").contains("\nZm9vYmE=\n"));
        assert!(pem_certificate(b"foob").contains("\nZm9vYg==\n"));
        let long = pem_certificate(&[0u8; 100]);
        assert!(long.lines().all(|l| l.len() <= 64), "{long}");
    }
}
