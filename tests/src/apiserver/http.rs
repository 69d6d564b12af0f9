//! The HTTP side of the fake API server: routing of /api and /apis paths, list with
//! pagination, watch streams, PATCH, create/replace/delete, TokenReview and the error
//! Status bodies a real API server sends (kube-rs parses them into `Error::Api`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use serde_json::{Value, json};

use super::store::{ChangeType, Error, Filter, merge_patch};
use super::{ADMIN_TOKEN, API_AUDIENCE, Kind, PatchRecord, RequestRecord, Shared, Verb, lock};

type Body = BoxBody<Bytes, Infallible>;

/// Request bodies larger than this are refused (413); nothing a test sends comes close.
const MAX_BODY: usize = 4 << 20;
/// A watch without timeoutSeconds ends after this long (a real server picks 30–60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Binds with SO_REUSEADDR so a restarted server gets its port back while the previous
/// incarnation's connections sit in TIME_WAIT.
pub(super) fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr), Error> {
    let bind_err = |source| Error::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .map_err(bind_err)?;
    socket.set_reuse_address(true).map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(128).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    let listener: std::net::TcpListener = socket.into();
    let local = listener.local_addr().map_err(bind_err)?;
    Ok((listener, local))
}

/// The server thread: accepts until shutdown, then drops its runtime, which cuts every
/// connection (open watches included).
pub(super) fn run(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fake API server: building its tokio runtime: {e}");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("fake API server: registering the listener: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let shared = shared.clone();
                            async move { Ok::<_, Infallible>(handle(shared, req).await) }
                        });
                        // A client hanging up mid-request is routine; nothing to report.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        }
    });
    runtime.shutdown_timeout(Duration::ZERO);
}

enum Route {
    Version,
    /// /api, /apis, /apis/<group>, /api/v1, /apis/<group>/<version>: plain (not aggregated)
    /// discovery, which kube's `Discovery` uses.
    Discovery(Vec<String>),
    TokenReviews,
    Resource {
        kind: Kind,
        version: String,
        namespace: Option<String>,
        name: Option<String>,
        subresource: Option<String>,
    },
    Unknown,
}

fn parse_route(path: &str) -> Route {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Route::Version,
        ["api"] | ["apis"] | ["apis", _] | ["api", _] | ["apis", _, _] => {
            return Route::Discovery(segments.iter().map(|s| s.to_string()).collect());
        }
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Route::Unknown,
    };
    if (group, version, rest) == ("authentication.k8s.io", "v1", &["tokenreviews"][..]) {
        return Route::TokenReviews;
    }
    let namespaced =
        |plural: &str| Kind::by_path(group, plural).is_some_and(|k| k.info().namespaced);
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, ..] if namespaced(plural) => (Some(ns.to_string()), &rest[2..]),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return Route::Unknown,
    };
    let Some(kind) = Kind::by_path(group, plural) else {
        return Route::Unknown;
    };
    // A namespaced object is only addressed inside its namespace; a cluster-scoped kind
    // never has one.
    if !kind.info().namespaced && namespace.is_some()
        || kind.info().namespaced && namespace.is_none() && name.is_some()
    {
        return Route::Unknown;
    }
    Route::Resource {
        kind,
        version: version.to_string(),
        namespace,
        name,
        subresource,
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A metav1.Status body, the shape kube-rs decodes into `kube::Error::Api`.
fn status_body(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(details) = details {
        status["details"] = details;
    }
    status
}

fn status_response(code: u16, reason: &str, message: &str) -> Response<Body> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &status_body(code, reason, message, None))
}

fn not_found() -> Response<Body> {
    status_response(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn error_response(error: &Error) -> Response<Body> {
    let message = error.to_string();
    let (code, reason, details) = match error {
        Error::NotFound { kind, name } => {
            (404, "NotFound", Some(json!({"name": name, "kind": kind})))
        }
        Error::AlreadyExists { kind, name } => (
            409,
            "AlreadyExists",
            Some(json!({"name": name, "kind": kind})),
        ),
        Error::Conflict { kind, name } => {
            (409, "Conflict", Some(json!({"name": name, "kind": kind})))
        }
        Error::Invalid(_) => (422, "Invalid", None),
        Error::BadSelector(_) | Error::Json(_) => (400, "BadRequest", None),
        Error::ContinueExpired => (410, "Expired", None),
        Error::Bind { .. } | Error::Kubeconfig { .. } => (500, "InternalError", None),
    };
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &status_body(code, reason, &message, details))
}

fn as_version(mut obj: Value, kind: Kind, version: &str) -> Value {
    obj["apiVersion"] = Value::String(kind.info().api_version(version));
    obj
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(status_response(
            413,
            "RequestEntityTooLarge",
            &format!("reading the request body: {e}"),
        )),
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let route = parse_route(req.uri().path());
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (req.method(), &route) {
        (&Method::GET, Route::Resource { name: None, .. }) if watch => Some(Verb::Watch),
        (&Method::GET, Route::Resource { name: None, .. }) => Some(Verb::List),
        (&Method::GET, _) => Some(Verb::Get),
        (&Method::POST, Route::TokenReviews | Route::Resource { name: None, .. }) => {
            Some(Verb::Create)
        }
        (&Method::PUT, Route::Resource { name: Some(_), .. }) => Some(Verb::Update),
        (&Method::PATCH, Route::Resource { name: Some(_), .. }) => Some(Verb::Patch),
        (&Method::DELETE, Route::Resource { name: Some(_), .. }) => Some(Verb::Delete),
        _ => None,
    };
    let resource = match &route {
        Route::Version => "version",
        Route::Discovery(_) => "discovery",
        Route::TokenReviews => "tokenreviews",
        Route::Resource { kind, .. } => kind.info().plural,
        Route::Unknown => "unknown",
    };
    shared.count(RequestRecord {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: query.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        resource: resource.to_string(),
        verb,
    });

    if shared.unavailable.load(Ordering::SeqCst) {
        return status_response(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    let expected = format!("Bearer {ADMIN_TOKEN}");
    if req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        != Some(expected.as_bytes())
    {
        return status_response(401, "Unauthorized", "Unauthorized");
    }
    let Some(verb) = verb else {
        return match route {
            Route::Unknown => not_found(),
            _ => status_response(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ),
        };
    };

    match route {
        Route::Unknown => not_found(),
        Route::Discovery(segments) => discovery(&shared, &segments),
        Route::Version => json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0", "platform": "linux/amd64"}),
        ),
        Route::TokenReviews => match read_body(req).await {
            Ok(body) => token_review(&shared, &body),
            Err(response) => response,
        },
        Route::Resource {
            kind,
            version,
            namespace,
            name,
            subresource,
        } => {
            if !shared.served_versions(kind).contains(&version) {
                return not_found();
            }
            let target = Target {
                kind,
                version,
                namespace,
                name: name.unwrap_or_default(),
                metadata_only: req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("as=PartialObjectMetadata")),
            };
            match (verb, subresource.as_deref()) {
                (Verb::List, _) => list(&shared, &target, &query),
                (Verb::Watch, _) => watch_response(&shared, target, &query),
                (Verb::Patch, None | Some("status")) => {
                    let content_type = req
                        .headers()
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.split(';').next())
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    match read_body(req).await {
                        Ok(body) => {
                            patch(&shared, &target, subresource, &content_type, &query, &body)
                        }
                        Err(response) => response,
                    }
                }
                (Verb::Get, None | Some("status")) => {
                    let ns = target.namespace.as_deref().unwrap_or("");
                    match lock(&shared.store).get(kind, ns, &target.name) {
                        Some(obj) => json_response(StatusCode::OK, &target.shape(obj.clone())),
                        None => error_response(&Error::NotFound {
                            kind: kind.info().plural,
                            name: target.name,
                        }),
                    }
                }
                (Verb::Create, None) | (Verb::Update, None) => match read_body(req).await {
                    Ok(body) => create_or_replace(&shared, &target, verb, &body),
                    Err(response) => response,
                },
                (Verb::Delete, None) => {
                    let ns = target.namespace.as_deref().unwrap_or("");
                    let deleted = lock(&shared.store).delete(kind, ns, &target.name);
                    shared.notify();
                    match deleted {
                        Ok(obj) => {
                            json_response(StatusCode::OK, &as_version(obj, kind, &target.version))
                        }
                        Err(e) => error_response(&e),
                    }
                }
                _ => not_found(),
            }
        }
    }
}

/// The kind, version and (for object requests) name a request addresses.
struct Target {
    kind: Kind,
    version: String,
    namespace: Option<String>,
    name: String,
    /// The client asked for PartialObjectMetadata (kube's `metadata_watcher`,
    /// `list_metadata`): objects are served as metadata only, as a real server does.
    metadata_only: bool,
}

impl Target {
    /// An object the way this request sees it: in the requested version, or as
    /// PartialObjectMetadata.
    fn shape(&self, obj: Value) -> Value {
        if self.metadata_only {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]})
        } else {
            as_version(obj, self.kind, &self.version)
        }
    }
}

fn list(shared: &Shared, target: &Target, query: &HashMap<String, String>) -> Response<Body> {
    let filter = match Filter::new(
        target.namespace.clone(),
        query.get("labelSelector").map(String::as_str),
        query.get("fieldSelector").map(String::as_str),
    ) {
        Ok(filter) => filter,
        Err(e) => return error_response(&e),
    };
    let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut store = lock(&shared.store);
    let (rv, items) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match store.take_page(token) {
            Ok(page) => page,
            Err(e) => return error_response(&e),
        },
        None => {
            let current = store.resource_version();
            // This store keeps no snapshots: an exact read of any other version is as
            // expired as one a real server's watch cache no longer holds.
            if query.get("resourceVersionMatch").map(String::as_str) == Some("Exact")
                && query.get("resourceVersion") != Some(&current.to_string())
            {
                return status_response(410, "Expired", "too old resource version");
            }
            let items = store
                .list(target.kind, &filter)
                .into_iter()
                .map(|o| target.shape(o))
                .collect();
            (current, items)
        }
    };
    let mut items: Vec<Value> = items;
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if limit > 0 && items.len() > limit {
        let rest = items.split_off(limit);
        metadata["remainingItemCount"] = json!(rest.len());
        metadata["continue"] = json!(store.save_page(rv, rest));
    }
    drop(store);
    let info = target.kind.info();
    let (api_version, list_kind) = if target.metadata_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        )
    } else {
        (
            info.api_version(&target.version),
            format!("{}List", info.kind),
        )
    };
    json_response(
        StatusCode::OK,
        &json!({
            "apiVersion": api_version,
            "kind": list_kind,
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn watch_response(
    shared: &Arc<Shared>,
    target: Target,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let filter = match Filter::new(
        target.namespace.clone(),
        query.get("labelSelector").map(String::as_str),
        query.get("fieldSelector").map(String::as_str),
    ) {
        Ok(filter) => filter,
        Err(e) => return error_response(&e),
    };
    let flag = |name: &str| query.get(name).map(String::as_str) == Some("true");
    let rv = query
        .get("resourceVersion")
        .map(String::as_str)
        .unwrap_or("");
    // "" (most recent) and "0" (any) start with synthetic ADDED events of the current
    // state, as does a streaming list (sendInitialEvents).
    let start = if rv.is_empty() || rv == "0" || flag("sendInitialEvents") {
        None
    } else {
        match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return status_response(
                    400,
                    "BadRequest",
                    &format!("invalid resource version {rv:?}"),
                );
            }
        }
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let options = WatchOptions {
        filter,
        start,
        bookmarks: flag("allowWatchBookmarks"),
        send_initial_events: flag("sendInitialEvents"),
        timeout,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(run_watch(shared.clone(), target, options, tx));
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok(Frame::data(bytes)), rx))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

struct WatchOptions {
    filter: Filter,
    /// None: begin with the current state; Some(rv): the changes after rv.
    start: Option<u64>,
    bookmarks: bool,
    send_initial_events: bool,
    timeout: Duration,
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

async fn run_watch(
    shared: Arc<Shared>,
    target: Target,
    options: WatchOptions,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let info = target.kind.info();
    let api_version = info.api_version(&target.version);
    let bookmark = |rv: u64, initial_end: bool| {
        let mut object = json!({"kind": info.kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
        if initial_end {
            object["metadata"]["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        event_line("BOOKMARK", &object)
    };
    // Counts this stream as open until the task ends, however it ends.
    struct OpenWatch<'a>(&'a Shared);
    impl Drop for OpenWatch<'_> {
        fn drop(&mut self) {
            self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
        }
    }
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let _open = OpenWatch(&shared);
    let mut changed = shared.changed.subscribe();
    let mut end = shared.end_epoch.subscribe();
    end.borrow_and_update();
    changed.borrow_and_update();
    let deadline = tokio::time::sleep(options.timeout);
    tokio::pin!(deadline);

    let mut cursor = match options.start {
        Some(rv) => rv,
        None => {
            let (rv, items) = {
                let store = lock(&shared.store);
                (
                    store.resource_version(),
                    store.list(target.kind, &options.filter),
                )
            };
            for item in items {
                if tx
                    .send(event_line("ADDED", &target.shape(item)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if options.send_initial_events
                && options.bookmarks
                && tx.send(bookmark(rv, true)).await.is_err()
            {
                return;
            }
            rv
        }
    };
    loop {
        changed.borrow_and_update();
        let changes = {
            let store = lock(&shared.store);
            store
                .changes_since(target.kind, cursor)
                .map(|changes| (changes, store.resource_version()))
        };
        let (changes, now) = match changes {
            Ok(found) => found,
            Err(gone) => {
                // What a real API server sends for a watch from a compacted resourceVersion:
                // HTTP 200, then one ERROR event carrying a 410 Expired Status.
                let message = format!(
                    "too old resource version: {} ({})",
                    gone.requested, gone.oldest
                );
                let _ = tx
                    .send(event_line(
                        "ERROR",
                        &status_body(410, "Expired", &message, None),
                    ))
                    .await;
                return;
            }
        };
        let mut last_sent = cursor;
        for change in changes {
            let now_matches = options.filter.matches(&change.object);
            let was_matching = change
                .previous
                .as_ref()
                .is_some_and(|p| options.filter.matches(p));
            let event = match (change.change, was_matching, now_matches) {
                (ChangeType::Added, _, true) => "ADDED",
                (ChangeType::Deleted, _, true) => "DELETED",
                (ChangeType::Modified, true, true) => "MODIFIED",
                // Moving into or out of the selection looks like creation or deletion.
                (ChangeType::Modified, false, true) => "ADDED",
                (ChangeType::Modified, true, false) => "DELETED",
                _ => continue,
            };
            let object = target.shape(change.object);
            if tx.send(event_line(event, &object)).await.is_err() {
                return;
            }
            last_sent = change.rv;
        }
        // Changes this watch did not show still move its resourceVersion on, so a client
        // resuming later does not replay (or lose) them.
        if options.bookmarks && now > last_sent && tx.send(bookmark(now, false)).await.is_err() {
            return;
        }
        cursor = now;
        tokio::select! {
            // Ending wins over new changes, so a test that ended the watches knows no
            // later change went out on them.
            biased;
            _ = end.changed() => return,
            _ = &mut deadline => return,
            _ = tx.closed() => return,
            _ = changed.changed() => {}
        }
    }
}

fn keep_from(new: &mut Value, old: &Value, field: &str) {
    match (new.as_object_mut(), old.get(field)) {
        (Some(new), Some(value)) => {
            new.insert(field.to_string(), value.clone());
        }
        (Some(new), None) => {
            new.remove(field);
        }
        (None, _) => {}
    }
}

fn patch(
    shared: &Shared,
    target: &Target,
    subresource: Option<String>,
    content_type: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Response<Body> {
    let field_manager = query.get("fieldManager").cloned();
    let parsed: Result<Value, Response<Body>> = match content_type {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            serde_json::from_slice(body)
                .map_err(|e| status_response(400, "BadRequest", &format!("invalid patch: {e}")))
        }
        "application/apply-patch+yaml" if field_manager.is_none() => Err(status_response(
            422,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        )),
        "application/apply-patch+yaml" => serde_yaml::from_slice(body)
            .map_err(|e| status_response(400, "BadRequest", &format!("invalid apply patch: {e}"))),
        other => Err(status_response(
            415,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types: application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml (got {other:?})"
            ),
        )),
    };
    let mut record = PatchRecord {
        kind: target.kind,
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        subresource: subresource.clone(),
        content_type: content_type.to_string(),
        field_manager,
        body: parsed.as_ref().map_or(Value::Null, Clone::clone),
        status: 0,
    };
    let response = match parsed {
        Ok(patch_body) => apply_patch(shared, target, subresource.as_deref(), &patch_body),
        Err(response) => response,
    };
    record.status = response.status().as_u16();
    lock(&shared.patches).push(record);
    response
}

/// Merge patch semantics for all three accepted types: maps merge, null removes, lists are
/// replaced. That is exact for the labels and annotations the agent writes; it is not
/// strategic merge of lists nor server-side apply's field ownership.
fn apply_patch(
    shared: &Shared,
    target: &Target,
    subresource: Option<&str>,
    patch_body: &Value,
) -> Response<Body> {
    let ns = target.namespace.as_deref().unwrap_or("");
    let result = {
        let mut store = lock(&shared.store);
        let Some(old) = store.get(target.kind, ns, &target.name).cloned() else {
            return error_response(&Error::NotFound {
                kind: target.kind.info().plural,
                name: target.name.clone(),
            });
        };
        let mut new = old.clone();
        merge_patch(&mut new, patch_body);
        if super::store::name_of(&new) != target.name || super::store::namespace_of(&new) != ns {
            return status_response(
                400,
                "BadRequest",
                "the patch changes the object's name or namespace",
            );
        }
        keep_from(&mut new, &old, "apiVersion");
        // The main resource ignores status; the status subresource ignores spec but, as
        // for pods/status, accepts metadata labels and annotations.
        match subresource {
            Some(_) => keep_from(&mut new, &old, "spec"),
            None => keep_from(&mut new, &old, "status"),
        }
        store.update(target.kind, new)
    };
    shared.notify();
    match result {
        Ok(obj) => json_response(
            StatusCode::OK,
            &as_version(obj, target.kind, &target.version),
        ),
        Err(e) => error_response(&e),
    }
}

fn create_or_replace(shared: &Shared, target: &Target, verb: Verb, body: &[u8]) -> Response<Body> {
    let mut obj: Value = match serde_json::from_slice(body) {
        Ok(obj) => obj,
        Err(e) => return error_response(&Error::Json(e)),
    };
    if let Some(ns) = &target.namespace {
        match super::store::namespace_of(&obj) {
            "" => obj["metadata"]["namespace"] = json!(ns),
            given if given != ns => {
                return status_response(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                );
            }
            _ => {}
        }
    }
    if verb == Verb::Update && super::store::name_of(&obj) != target.name {
        return status_response(
            400,
            "BadRequest",
            "the name of the object does not match the name on the URL",
        );
    }
    let result = if verb == Verb::Create {
        lock(&shared.store).create(target.kind, obj)
    } else {
        lock(&shared.store).update(target.kind, obj)
    };
    shared.notify();
    match result {
        Ok(obj) => {
            let code = if verb == Verb::Create {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            json_response(code, &as_version(obj, target.kind, &target.version))
        }
        Err(e) => error_response(&e),
    }
}

/// Answers a TokenReview the way kube-apiserver does for service-account tokens: an
/// unknown, expired or wrong-audience token is `authenticated: false` with an error (the
/// request itself succeeds with 201).
fn token_review(shared: &Shared, body: &[u8]) -> Response<Body> {
    let review: TokenReview = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(e) => return error_response(&Error::Json(e)),
    };
    let token = review.spec.token.clone().unwrap_or_default();
    let requested = review.spec.audiences.clone().unwrap_or_default();
    let wanted = if requested.is_empty() {
        vec![API_AUDIENCE.to_string()]
    } else {
        requested
    };
    let identity = lock(&shared.tokens).get(&token).cloned();
    let refused = |error: String| TokenReviewStatus {
        authenticated: Some(false),
        error: Some(error),
        user: Some(UserInfo::default()),
        audiences: None,
    };
    let status = match identity {
        None => refused("[invalid bearer token, token lookup failed]".into()),
        Some(identity) if identity.expired => {
            refused("[invalid bearer token, service account token has expired]".into())
        }
        Some(identity) => {
            let matched: Vec<String> = wanted
                .iter()
                .filter(|a| identity.audiences.contains(a))
                .cloned()
                .collect();
            if matched.is_empty() {
                refused(format!(
                    "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                    identity.audiences, wanted
                ))
            } else {
                TokenReviewStatus {
                    authenticated: Some(true),
                    error: None,
                    audiences: Some(matched),
                    user: Some(UserInfo {
                        username: Some(identity.username),
                        uid: Some(identity.uid),
                        groups: Some(identity.groups),
                        extra: Some(identity.extra),
                    }),
                }
            }
        }
    };
    let answer = TokenReview {
        metadata: Default::default(),
        spec: review.spec,
        status: Some(status),
    };
    match serde_json::to_value(&answer) {
        Ok(value) => json_response(StatusCode::CREATED, &value),
        Err(e) => error_response(&Error::Json(e)),
    }
}

/// The groups and versions served now (the Istio CRDs only while installed), preferred
/// version first.
fn served_groups(shared: &Shared) -> Vec<(&'static str, Vec<String>)> {
    let mut groups: Vec<(&'static str, Vec<String>)> =
        vec![("authentication.k8s.io", vec!["v1".into()])];
    for kind in Kind::ALL {
        let versions = shared.served_versions(kind);
        if versions.is_empty() {
            continue;
        }
        match groups.iter_mut().find(|(g, _)| *g == kind.info().group) {
            Some((_, known)) => {
                for v in versions {
                    if !known.contains(&v) {
                        known.push(v);
                    }
                }
            }
            None => groups.push((kind.info().group, versions)),
        }
    }
    groups
}

fn group_json(group: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
}

fn discovery(shared: &Shared, segments: &[String]) -> Response<Body> {
    let groups = served_groups(shared);
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (group, version) = match segments.as_slice() {
        ["api"] => {
            return json_response(
                StatusCode::OK,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            );
        }
        ["apis"] => {
            let list: Vec<Value> = groups
                .iter()
                .filter(|(g, _)| !g.is_empty())
                .map(|(g, vs)| group_json(g, vs))
                .collect();
            return json_response(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}),
            );
        }
        ["apis", group] => {
            return match groups.iter().find(|(g, _)| g == group) {
                Some((g, vs)) if !g.is_empty() => {
                    let mut body = group_json(g, vs);
                    body["kind"] = json!("APIGroup");
                    body["apiVersion"] = json!("v1");
                    json_response(StatusCode::OK, &body)
                }
                _ => not_found(),
            };
        }
        ["api", version] => ("", *version),
        ["apis", group, version] => (*group, *version),
        _ => return not_found(),
    };
    if !groups
        .iter()
        .any(|(g, vs)| *g == group && vs.iter().any(|v| v == version))
    {
        return not_found();
    }
    let mut resources = Vec::new();
    if group == "authentication.k8s.io" {
        resources.push(
            json!({"name": "tokenreviews", "singularName": "tokenreview",
            "namespaced": false, "kind": "TokenReview", "verbs": ["create"]}),
        );
    }
    let verbs = [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    for kind in Kind::ALL.into_iter().filter(|k| k.info().group == group) {
        let info = kind.info();
        resources.push(
            json!({"name": info.plural, "singularName": info.kind.to_lowercase(),
            "namespaced": info.namespaced, "kind": info.kind, "verbs": verbs}),
        );
        resources.push(
            json!({"name": format!("{}/status", info.plural), "singularName": "",
            "namespaced": info.namespaced, "kind": info.kind, "verbs": ["get", "patch", "update"]}),
        );
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json_response(
        StatusCode::OK,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    )
}
