//! The agent's HTTP endpoints. One [`Admin`] answers on three listeners:
//! - admin (`--admin-addr`, localhost by default: it can stop the agent): `/config_dump`,
//!   `/certs`, `/logging`, `/quitquitquit`, `/status`, plus everything below;
//! - metrics (`--metrics-addr`): `/metrics`, `/stats/prometheus`;
//! - readiness (`--readiness-addr`): `/healthz/ready`.
//!
//! Routing is a plain function of (port, method, path) so tests call it without sockets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{AgentView, LogControl, ObservabilityError};

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which listener a request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    Admin,
    Metrics,
    Readiness,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    fn new(status: StatusCode, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }

    fn json(value: &serde_json::Value) -> Self {
        let body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into());
        Self::new(StatusCode::OK, JSON, body + "\n")
    }
}

pub struct Admin {
    view: Arc<dyn AgentView>,
    registry: Registry,
    logs: Option<LogControl>,
    /// Set to true by `/quitquitquit`; the app drains when it turns.
    drain: watch::Sender<bool>,
}

impl Admin {
    pub fn new(
        view: Arc<dyn AgentView>,
        registry: Registry,
        logs: Option<LogControl>,
        drain: watch::Sender<bool>,
    ) -> Self {
        Self {
            view,
            registry,
            logs,
            drain,
        }
    }

    /// Answers one request. `query` is the raw query string, if any.
    pub fn respond(&self, port: Port, method: &Method, path: &str, query: Option<&str>) -> Reply {
        debug!(?port, %method, path, "admin request");
        let admin = port == Port::Admin;
        match (path, method) {
            ("/metrics" | "/stats/prometheus", &Method::GET) if port != Port::Readiness => {
                self.view.refresh_metrics();
                Reply::new(
                    StatusCode::OK,
                    OPENMETRICS,
                    super::metrics::encode(&self.registry),
                )
            }
            ("/healthz/ready", &Method::GET) if port != Port::Metrics => {
                let readiness = self.view.readiness();
                if readiness.ready {
                    Reply::new(StatusCode::OK, TEXT, "ready\n")
                } else {
                    let why = readiness.problems.join("; ");
                    Reply::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        TEXT,
                        format!("not ready: {why}\n"),
                    )
                }
            }
            ("/status", &Method::GET) if admin => {
                let mut value =
                    serde_json::to_value(self.view.readiness()).unwrap_or(serde_json::Value::Null);
                if let Some(map) = value.as_object_mut() {
                    map.insert("version".into(), env!("CARGO_PKG_VERSION").into());
                    map.insert("draining".into(), (*self.drain.borrow()).into());
                    if let Some(threads) = self.view.worker_threads() {
                        map.insert("worker_threads".into(), threads.into());
                    }
                }
                Reply::json(&value)
            }
            ("/config_dump", &Method::GET) if admin => Reply::json(&self.view.config_dump()),
            ("/certs", &Method::GET) if admin => Reply::json(&self.view.certs()),
            ("/logging", _) if admin => self.logging(method, query),
            ("/quitquitquit", &Method::POST) if admin => {
                info!("drain requested through /quitquitquit");
                self.drain.send_replace(true);
                Reply::new(StatusCode::OK, TEXT, "draining\n")
            }
            ("/quitquitquit", _) if admin => Reply::new(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "use POST /quitquitquit\n",
            ),
            ("/", &Method::GET) if admin => Reply::new(
                StatusCode::OK,
                TEXT,
                "/config_dump /certs /logging /quitquitquit /status /metrics /stats/prometheus /healthz/ready\n",
            ),
            _ => Reply::new(StatusCode::NOT_FOUND, TEXT, "not found\n"),
        }
    }

    fn logging(&self, method: &Method, query: Option<&str>) -> Reply {
        let Some(logs) = &self.logs else {
            return Reply::new(
                StatusCode::NOT_IMPLEMENTED,
                TEXT,
                "log control is not available in this process\n",
            );
        };
        if method == Method::POST {
            let Some(level) = query.and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("level="))
                    .map(percent_decode)
            }) else {
                return Reply::new(
                    StatusCode::BAD_REQUEST,
                    TEXT,
                    "POST /logging?level=<filter>, e.g. level=debug or level=ambit_agent::tunnel=debug\n",
                );
            };
            if let Err(e) = logs.set_level(&level) {
                return Reply::new(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n"));
            }
            info!(level = %level, "log level changed");
        } else if method != Method::GET {
            return Reply::new(
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "GET or POST /logging\n",
            );
        }
        Reply::new(
            StatusCode::OK,
            TEXT,
            format!("log level: {}\n", logs.level()),
        )
    }

    fn handle(&self, port: Port, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = self.respond(
            port,
            request.method(),
            request.uri().path(),
            request.uri().query(),
        );
        let mut response = Response::new(Full::new(Bytes::from(reply.body)));
        *response.status_mut() = reply.status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(reply.content_type),
        );
        response
    }
}

/// `%XX` and `+` in a query value (filters contain `=` and `:`, which clients escape).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The three bound listeners; bound before serving so the addresses (port 0 resolved) can be
/// logged and a bind error stops the agent at start.
pub struct Listeners {
    pub admin: TcpListener,
    pub metrics: TcpListener,
    pub readiness: TcpListener,
}

impl Listeners {
    pub async fn bind(
        admin: SocketAddr,
        metrics: SocketAddr,
        readiness: SocketAddr,
    ) -> Result<Self, ObservabilityError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ObservabilityError::Bind { addr, source })
        };
        Ok(Self {
            admin: bind(admin).await?,
            metrics: bind(metrics).await?,
            readiness: bind(readiness).await?,
        })
    }

    /// Bound addresses: (admin, metrics, readiness).
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr, SocketAddr)> {
        Ok((
            self.admin.local_addr()?,
            self.metrics.local_addr()?,
            self.readiness.local_addr()?,
        ))
    }

    /// Serves all three until the runtime stops.
    pub fn spawn(self, admin: Arc<Admin>) {
        tokio::spawn(serve(self.admin, admin.clone(), Port::Admin));
        tokio::spawn(serve(self.metrics, admin.clone(), Port::Metrics));
        tokio::spawn(serve(self.readiness, admin, Port::Readiness));
    }
}

async fn serve(listener: TcpListener, admin: Arc<Admin>, port: Port) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically EMFILE: keep serving once descriptors free up.
                warn!(?port, error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = admin.handle(port, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observability::Readiness;

    struct View {
        ready: bool,
    }

    impl AgentView for View {
        fn readiness(&self) -> Readiness {
            Readiness {
                ready: self.ready,
                enrolled_pods: 2,
                programs_attached: vec!["ambit_connect4".into()],
                problems: if self.ready {
                    vec![]
                } else {
                    vec!["no certificate for spiffe://cluster.local/ns/a/sa/b".into()]
                },
            }
        }
        fn config_dump(&self) -> serde_json::Value {
            serde_json::json!({"workloads": []})
        }
        fn certs(&self) -> serde_json::Value {
            serde_json::json!({"certificates": []})
        }
        fn refresh_metrics(&self) {}
    }

    fn admin(ready: bool) -> (Admin, watch::Receiver<bool>) {
        let mut registry = Registry::default();
        let agent = crate::observability::AgentMetrics::new(&mut registry);
        agent.set_enrolled_pods(2);
        let (tx, rx) = watch::channel(false);
        (Admin::new(Arc::new(View { ready }), registry, None, tx), rx)
    }

    #[test]
    fn readiness_is_503_with_the_reason_until_ready() {
        let (a, _) = admin(false);
        let r = a.respond(Port::Readiness, &Method::GET, "/healthz/ready", None);
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.body.contains("no certificate"), "{}", r.body);
        let (a, _) = admin(true);
        let r = a.respond(Port::Readiness, &Method::GET, "/healthz/ready", None);
        assert_eq!(r.status, StatusCode::OK);
    }

    #[test]
    fn metrics_on_both_paths_but_admin_endpoints_only_on_admin_port() {
        let (a, _) = admin(true);
        for path in ["/metrics", "/stats/prometheus"] {
            let r = a.respond(Port::Metrics, &Method::GET, path, None);
            assert_eq!(r.status, StatusCode::OK);
            assert!(r.body.contains("ambit_enrolled_pods 2"), "{}", r.body);
        }
        for path in ["/config_dump", "/certs", "/quitquitquit", "/logging"] {
            let r = a.respond(Port::Metrics, &Method::GET, path, None);
            assert_eq!(
                r.status,
                StatusCode::NOT_FOUND,
                "{path} on the metrics port"
            );
            let r = a.respond(Port::Readiness, &Method::POST, path, None);
            assert_eq!(
                r.status,
                StatusCode::NOT_FOUND,
                "{path} on the readiness port"
            );
        }
        let r = a.respond(Port::Admin, &Method::GET, "/config_dump", None);
        assert_eq!(r.content_type, JSON);
        assert!(r.body.contains("\"workloads\""));
        let status = a.respond(Port::Admin, &Method::GET, "/status", None);
        let v: serde_json::Value = serde_json::from_str(&status.body).expect("json");
        assert_eq!(v["ready"], true);
        assert_eq!(v["enrolled_pods"], 2);
    }

    #[test]
    fn quitquitquit_needs_post_and_signals_the_drain() {
        let (a, rx) = admin(true);
        let r = a.respond(Port::Admin, &Method::GET, "/quitquitquit", None);
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(!*rx.borrow());
        let r = a.respond(Port::Admin, &Method::POST, "/quitquitquit", None);
        assert_eq!(r.status, StatusCode::OK);
        assert!(*rx.borrow());
    }

    #[test]
    fn logging_without_control_says_so_and_query_values_decode() {
        let (a, _) = admin(true);
        let r = a.respond(Port::Admin, &Method::POST, "/logging", Some("level=debug"));
        assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
        assert_eq!(
            percent_decode("ambit_agent%3A%3Atunnel%3Ddebug"),
            "ambit_agent::tunnel=debug"
        );
    }
}
