//! The CA's metrics and its small HTTP endpoint (/metrics, /healthz/ready).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::authz::RefusalReason;

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Issued,
    Denied(RefusalReason),
    /// The CA failed to sign an authorized request.
    Error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `issued`, `denied` or `error`.
    pub result: &'static str,
    /// A [`RefusalReason`] name for denials, `signing_failed` for errors, empty when issued.
    pub reason: &'static str,
}

impl From<Outcome> for RequestLabels {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Issued => Self {
                result: "issued",
                reason: "",
            },
            Outcome::Denied(reason) => Self {
                result: "denied",
                reason: reason.as_str(),
            },
            Outcome::Error => Self {
                result: "error",
                reason: "signing_failed",
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct CaMetrics {
    requests: Family<RequestLabels, Counter>,
    issuance: Histogram,
}

impl CaMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            // 0.5 ms … ~4 s: signing alone is well under a millisecond, the TokenReview
            // round trip to the API server dominates.
            issuance: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        };
        registry.register(
            "ambit_ca_requests",
            "Certificate requests by result (issued, denied, error) and reason",
            m.requests.clone(),
        );
        registry.register(
            "ambit_ca_issuance_duration_seconds",
            "Time from receiving a certificate request to answering it with a certificate",
            m.issuance.clone(),
        );
        m
    }

    pub fn record(&self, outcome: Outcome, elapsed: Duration) {
        self.requests.get_or_create(&outcome.into()).inc();
        if outcome == Outcome::Issued {
            self.issuance.observe(elapsed.as_secs_f64());
        }
    }

    pub fn count(&self, outcome: Outcome) -> u64 {
        self.requests.get_or_create(&outcome.into()).get()
    }
}

/// Serves /metrics and /healthz/ready until the runtime stops. `ready` is asked per probe.
pub fn spawn_http(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
) {
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let response = respond(request.uri().path(), &registry, ready.as_ref());
                    async move { Ok::<_, Infallible>(response) }
                });
                let serve = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = serve.await {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    });
}

fn respond(
    path: &str,
    registry: &Registry,
    ready: &(dyn Fn() -> Result<(), String> + Send + Sync),
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" | "/stats/prometheus" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::observability::metrics::encode(registry),
        ),
        "/healthz/ready" => match ready() {
            Ok(()) => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_result_and_reason() {
        let mut registry = Registry::default();
        let m = CaMetrics::new(&mut registry);
        m.record(Outcome::Issued, Duration::from_millis(2));
        m.record(
            Outcome::Denied(RefusalReason::IdentityNotOnNode),
            Duration::from_millis(1),
        );
        m.record(
            Outcome::Denied(RefusalReason::IdentityNotOnNode),
            Duration::from_millis(1),
        );
        let text = crate::observability::metrics::encode(&registry);
        assert!(
            text.contains(r#"ambit_ca_requests_total{result="issued",reason=""} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"ambit_ca_requests_total{result="denied",reason="identity_not_on_node"} 2"#
            ),
            "{text}"
        );
        // Only issuances are timed.
        assert!(
            text.contains("ambit_ca_issuance_duration_seconds_count 1"),
            "{text}"
        );
        let ok = || Ok(());
        assert_eq!(respond("/healthz/ready", &registry, &ok).status(), 200);
        let not = || Err("pods not listed yet".to_owned());
        assert_eq!(respond("/healthz/ready", &registry, &not).status(), 503);
        assert_eq!(respond("/nope", &registry, &ok).status(), 404);
    }
}
