//! The chained CNI plugin `ambit-cni` and its protocol with the agent.
//!
//! The container runtime runs the plugin after the node's own network plugin has set up a
//! new pod's network; the plugin tells the agent (one JSON request per connection over a
//! unix stream socket, one JSON response) so the pod is enrolled before its containers
//! start. When the agent cannot be reached the plugin falls back on a file the agent keeps
//! with the namespaces in the mesh: pods there fail to start (fail closed), all others start
//! as if the plugin were not there.
//!
//! - this module: wire types, the agent's server ([`serve`]), the plugin's client
//!   ([`request`]), the namespaces file;
//! - [`plugin`]: the CNI command logic (ADD/DEL/CHECK/VERSION);
//! - [`install`]: copying the binary and chaining it into the node's network config;
//! - [`watch`]: the agent chaining it again when the network plugin rewrites its config.

pub mod install;
pub mod plugin;
pub mod watch;

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, OpenOptionsExt as _, PermissionsExt,
};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixListener;
use tracing::{info, warn};

/// Where the agent listens for the plugin (a hostPath shared with the node).
pub const DEFAULT_SOCKET: &str = "/var/run/ambit/cni.sock";
/// Where the agent lists the namespaces in the mesh, one per line.
pub const DEFAULT_NAMESPACES_FILE: &str = "/var/run/ambit/mesh-namespaces";
/// Largest request or response either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CniProtoError {
    #[error("cannot connect to the ambit agent at {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to the ambit agent at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("the ambit agent at {} did not answer within {timeout:?}", path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("message larger than {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    #[error("invalid message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

/// What the plugin tells the agent about one pod sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniRequest {
    pub command: CniCommand,
    pub pod_namespace: String,
    pub pod_name: String,
    /// The sandbox's container ID (CNI_CONTAINERID).
    pub container_id: String,
    /// CNI_NETNS: the path of the pod's network namespace on the host; may be empty on DEL.
    pub netns: String,
    /// The pod's addresses from the main plugin's result (prefix lengths removed).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    pub ifname: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CniResult {
    /// ADD/CHECK: the pod is in the mesh and enrolled.
    Enrolled,
    /// ADD/CHECK: the pod is not in the mesh; nothing to do.
    NotInMesh,
    /// DEL: done (whether or not the pod was enrolled).
    Removed,
    /// The agent could not do what was asked; `message` says why. Fails an ADD or CHECK.
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResponse {
    pub result: CniResult,
    #[serde(default)]
    pub message: String,
}

impl CniResponse {
    pub fn enrolled() -> Self {
        Self::with(CniResult::Enrolled, "")
    }
    pub fn not_in_mesh() -> Self {
        Self::with(CniResult::NotInMesh, "")
    }
    pub fn removed() -> Self {
        Self::with(CniResult::Removed, "")
    }
    pub fn error(message: impl Into<String>) -> Self {
        Self::with(CniResult::Error, message)
    }
    fn with(result: CniResult, message: impl Into<String>) -> Self {
        Self {
            result,
            message: message.into(),
        }
    }
}

/// The agent's side: decides on each request from the plugin.
pub trait CniHandler: Send + Sync {
    fn handle(&self, req: CniRequest) -> BoxFuture<'_, CniResponse>;
}

/// How long a plugin connection may take at each step.
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// To receive the whole request (the plugin writes it at once).
    pub read_timeout: Duration,
    /// For the handler to decide; past it the plugin gets an error answer.
    pub handler_timeout: Duration,
    /// To hand the response over.
    pub write_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(5),
            handler_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// Binds the agent's socket at `path`: parent directory created with mode 0700 if missing,
/// socket file mode 0600, a stale socket from an earlier run replaced. The socket is bound
/// under a temporary name, restricted, then renamed into place, so no client ever sees it
/// with looser permissions. Must run inside a tokio runtime.
pub fn bind(path: &Path) -> Result<UnixListener, CniProtoError> {
    let socket_err = |source| CniProtoError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(socket_err)?;
    if let Ok(meta) = fs::symlink_metadata(path)
        && !meta.file_type().is_socket()
    {
        return Err(CniProtoError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| socket_err(io::Error::other("socket path has no file name")))?;
    let staging = parent.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&staging);
    let listener = std::os::unix::net::UnixListener::bind(&staging).map_err(socket_err)?;
    let placed = fs::set_permissions(&staging, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&staging, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&staging);
        return Err(socket_err(e));
    }
    listener.set_nonblocking(true).map_err(socket_err)?;
    UnixListener::from_std(listener).map_err(socket_err)
}

/// Serves plugin requests until the task is dropped, one task per connection.
pub async fn serve(listener: UnixListener, handler: Arc<dyn CniHandler>) {
    serve_with(listener, handler, ServeLimits::default()).await
}

pub async fn serve_with(listener: UnixListener, handler: Arc<dyn CniHandler>, limits: ServeLimits) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, handler.clone(), limits));
            }
            Err(e) => {
                // Typically out of descriptors: wait for some to be released.
                warn!(error = %e, "CNI socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(
    mut stream: tokio::net::UnixStream,
    handler: Arc<dyn CniHandler>,
    limits: ServeLimits,
) {
    let mut body = Vec::new();
    let mut limited = (&mut stream).take(MAX_MESSAGE_BYTES as u64 + 1);
    let read = tokio::time::timeout(limits.read_timeout, limited.read_to_end(&mut body)).await;
    let response = match read {
        Err(_) => {
            warn!(timeout = ?limits.read_timeout, "CNI request not received in time; connection dropped");
            return;
        }
        Ok(Err(e)) => {
            warn!(error = %e, "reading a CNI request failed");
            return;
        }
        Ok(Ok(_)) if body.len() > MAX_MESSAGE_BYTES => {
            warn!(limit = MAX_MESSAGE_BYTES, "CNI request too large; refused");
            CniResponse::error(format!("request larger than {MAX_MESSAGE_BYTES} bytes"))
        }
        Ok(Ok(_)) => match serde_json::from_slice::<CniRequest>(&body) {
            Err(e) => {
                warn!(error = %e, "invalid CNI request; refused");
                CniResponse::error(format!("invalid request: {e}"))
            }
            Ok(request) => {
                let pod = format!("{}/{}", request.pod_namespace, request.pod_name);
                let command = request.command;
                let response =
                    tokio::time::timeout(limits.handler_timeout, handler.handle(request))
                        .await
                        .unwrap_or_else(|_| {
                            CniResponse::error(format!(
                                "the agent did not finish within {:?}",
                                limits.handler_timeout
                            ))
                        });
                info!(%pod, ?command, result = ?response.result, message = %response.message, "CNI request");
                response
            }
        },
    };
    let write = async {
        let bytes = serde_json::to_vec(&response).map_err(io::Error::other)?;
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(limits.write_timeout, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "writing a CNI response failed"),
        Err(_) => warn!("CNI response not taken in time; connection dropped"),
    }
}

/// The plugin's side: sends `req` to the agent at `socket` and waits for the answer, all
/// within `timeout`. Blocking (the plugin is a short-lived process without a runtime).
pub fn request(
    socket: &Path,
    req: &CniRequest,
    timeout: Duration,
) -> Result<CniResponse, CniProtoError> {
    let deadline = Instant::now() + timeout;
    let path = socket.to_path_buf();
    let connect_err = |source| CniProtoError::Connect {
        path: path.clone(),
        source,
    };
    // std's UnixStream has no connect timeout; a full backlog would block forever.
    let address = socket2::SockAddr::unix(socket).map_err(connect_err)?;
    let raw = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(connect_err)?;
    raw.connect_timeout(&address, timeout)
        .map_err(connect_err)?;
    let mut stream = UnixStream::from(std::os::fd::OwnedFd::from(raw));

    let io_err = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            CniProtoError::Timeout {
                path: path.clone(),
                timeout,
            }
        } else {
            CniProtoError::Io {
                path: path.clone(),
                source,
            }
        }
    };
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(io::Error::from(io::ErrorKind::TimedOut))
    };
    let body = serde_json::to_vec(req)?;
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(CniProtoError::TooLarge);
    }
    stream
        .set_write_timeout(Some(remaining().map_err(io_err)?))
        .map_err(io_err)?;
    stream.write_all(&body).map_err(io_err)?;
    // The end of the request is the end of our half of the stream.
    stream.shutdown(std::net::Shutdown::Write).map_err(io_err)?;

    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        stream
            .set_read_timeout(Some(remaining().map_err(io_err)?))
            .map_err(io_err)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                if answer.len() > MAX_MESSAGE_BYTES {
                    return Err(CniProtoError::TooLarge);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(serde_json::from_slice(&answer)?)
}

/// Writes the namespaces in the mesh to `path` (sorted, one per line) atomically: a
/// temporary file in the same directory, synced, then renamed over the old one, so the
/// plugin never reads half a list. Names must be Kubernetes namespace names (DNS labels).
pub fn write_namespaces_file<I, S>(path: &Path, names: I) -> io::Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut sorted = BTreeSet::new();
    for name in names {
        let name = name.as_ref();
        if !is_namespace_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a namespace name"),
            ));
        }
        sorted.insert(name.to_string());
    }
    let mut text = String::new();
    for name in &sorted {
        text.push_str(name);
        text.push('\n');
    }
    write_atomically(path, text.as_bytes(), 0o644)
}

/// The namespaces listed in the file (blank lines and `#` comments ignored).
pub fn read_namespaces_file(path: &Path) -> io::Result<BTreeSet<String>> {
    let text = fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// A DNS-1123 label, the form of every namespace name.
fn is_namespace_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Replaces `path` with `contents` in one rename. The temporary name ends in `.tmp` so no
/// CNI runtime mistakes it for a network config.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let staging = parent.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&staging)?;
        // The mode given to open() is filtered by the umask; the file must have exactly it.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&staging, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&staging);
    }
    result
}

#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    /// A directory under the system temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "ambit-{tag}-{}-{:x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::TempDir;
    use super::*;
    use std::sync::Mutex;

    fn sample_request() -> CniRequest {
        CniRequest {
            command: CniCommand::Add,
            pod_namespace: "shop".into(),
            pod_name: "cart-0".into(),
            container_id: "abc123".into(),
            netns: "/var/run/netns/cni-1234".into(),
            ips: vec![
                "10.244.1.7".parse().expect("ip"),
                "fd00::7".parse().expect("ip"),
            ],
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn wire_format_is_the_documented_json() {
        let json = serde_json::to_value(sample_request()).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "command": "add", "podNamespace": "shop", "podName": "cart-0",
                "containerId": "abc123", "netns": "/var/run/netns/cni-1234",
                "ips": ["10.244.1.7", "fd00::7"], "ifname": "eth0"
            })
        );
        let answer: CniResponse =
            serde_json::from_str(r#"{"result":"not-in-mesh","message":"x"}"#).expect("parse");
        assert_eq!(answer.result, CniResult::NotInMesh);
        assert_eq!(answer.message, "x");
        let answer: CniResponse = serde_json::from_str(r#"{"result":"removed"}"#).expect("parse");
        assert_eq!(answer, CniResponse::removed());
        assert_eq!(
            serde_json::to_string(&CniResponse::error("no")).expect("json"),
            r#"{"result":"error","message":"no"}"#
        );
    }

    /// Records requests; answers by namespace; never answers for namespace "stuck".
    #[derive(Default)]
    struct Recorder(Mutex<Vec<CniRequest>>);

    impl CniHandler for Recorder {
        fn handle(&self, req: CniRequest) -> BoxFuture<'_, CniResponse> {
            Box::pin(async move {
                let namespace = req.pod_namespace.clone();
                self.0.lock().expect("lock").push(req);
                match namespace.as_str() {
                    "stuck" => futures::future::pending().await,
                    "shop" => CniResponse::enrolled(),
                    _ => CniResponse::not_in_mesh(),
                }
            })
        }
    }

    async fn served(limits: ServeLimits) -> (TempDir, PathBuf, Arc<Recorder>) {
        let dir = TempDir::new("cni-serve");
        let socket = dir.path().join("run/cni.sock");
        let listener = bind(&socket).expect("bind");
        let recorder = Arc::new(Recorder::default());
        tokio::spawn(serve_with(listener, recorder.clone(), limits));
        (dir, socket, recorder)
    }

    async fn call(socket: &Path, req: CniRequest) -> Result<CniResponse, CniProtoError> {
        let socket = socket.to_path_buf();
        tokio::task::spawn_blocking(move || request(&socket, &req, Duration::from_secs(10)))
            .await
            .expect("join")
    }

    /// Sends raw bytes and returns the raw answer (EOF-terminated).
    async fn raw(socket: &Path, bytes: Vec<u8>) -> Vec<u8> {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect");
        stream.write_all(&bytes).await.expect("write");
        stream.shutdown().await.expect("shutdown");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("answer in time")
            .expect("read");
        answer
    }

    #[tokio::test]
    async fn request_round_trip_reaches_the_handler() {
        let (_dir, socket, recorder) = served(ServeLimits::default()).await;
        let answer = call(&socket, sample_request()).await.expect("request");
        assert_eq!(answer, CniResponse::enrolled());
        let mut other = sample_request();
        other.pod_namespace = "elsewhere".into();
        other.command = CniCommand::Check;
        let answer = call(&socket, other.clone()).await.expect("request");
        assert_eq!(answer, CniResponse::not_in_mesh());
        assert_eq!(
            *recorder.0.lock().expect("lock"),
            vec![sample_request(), other]
        );
    }

    #[tokio::test]
    async fn bad_and_oversized_requests_get_an_error_answer() {
        let (_dir, socket, recorder) = served(ServeLimits::default()).await;
        let answer: CniResponse =
            serde_json::from_slice(&raw(&socket, b"{not json".to_vec()).await).expect("json");
        assert_eq!(answer.result, CniResult::Error);
        assert!(
            answer.message.starts_with("invalid request: "),
            "{answer:?}"
        );
        let answer: CniResponse =
            serde_json::from_slice(&raw(&socket, vec![b' '; MAX_MESSAGE_BYTES + 1]).await)
                .expect("json");
        assert_eq!(
            answer,
            CniResponse::error(format!("request larger than {MAX_MESSAGE_BYTES} bytes"))
        );
        assert!(recorder.0.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_read_deadline() {
        let (_dir, socket, _recorder) = served(ServeLimits {
            read_timeout: Duration::from_millis(50),
            ..ServeLimits::default()
        })
        .await;
        // Connects and sends half a request without ending it.
        let mut stream = tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connect");
        stream.write_all(b"{\"command\":").await.expect("write");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("server closed the connection");
        assert_eq!(read.expect("clean EOF"), 0);
        assert!(answer.is_empty());
    }

    #[tokio::test]
    async fn a_handler_past_its_deadline_yields_an_error_answer() {
        let (_dir, socket, recorder) = served(ServeLimits {
            handler_timeout: Duration::from_millis(50),
            ..ServeLimits::default()
        })
        .await;
        let mut stuck = sample_request();
        stuck.pod_namespace = "stuck".into();
        let answer = call(&socket, stuck).await.expect("request");
        assert_eq!(
            answer,
            CniResponse::error("the agent did not finish within 50ms")
        );
        assert_eq!(recorder.0.lock().expect("lock").len(), 1);
    }

    #[test]
    fn client_reports_an_absent_agent_as_a_connect_error() {
        let dir = TempDir::new("cni-absent");
        let err = request(
            &dir.path().join("none.sock"),
            &sample_request(),
            Duration::from_secs(1),
        )
        .expect_err("nobody listens");
        match err {
            CniProtoError::Connect { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    #[test]
    fn client_gives_up_on_an_agent_that_never_answers() {
        let dir = TempDir::new("cni-mute");
        let path = dir.path().join("mute.sock");
        // Bound and listening, never accepting: the connection completes in the backlog.
        let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let err =
            request(&path, &sample_request(), Duration::from_millis(100)).expect_err("no answer");
        assert!(
            matches!(err, CniProtoError::Timeout { timeout, .. } if timeout == Duration::from_millis(100)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn bind_restricts_the_socket_and_replaces_a_stale_one() {
        let dir = TempDir::new("cni-bind");
        let socket = dir.path().join("fresh/cni.sock");
        let first = bind(&socket).expect("bind");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&socket), 0o600);
        assert_eq!(mode(socket.parent().expect("parent")), 0o700);
        // The old listener's file stays behind, as after a crash: a new bind replaces it.
        drop(first);
        assert!(
            fs::symlink_metadata(&socket)
                .expect("stale")
                .file_type()
                .is_socket()
        );
        let listener = bind(&socket).expect("rebind over a stale socket");
        let accepted = tokio::spawn(async move { listener.accept().await.map(drop) });
        tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connect");
        accepted.await.expect("join").expect("accept");
        assert_eq!(mode(&socket), 0o600);
        // No staging file is left next to it.
        let names: Vec<_> = fs::read_dir(socket.parent().expect("parent"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("cni.sock")]);
    }

    #[tokio::test]
    async fn bind_refuses_to_replace_a_regular_file() {
        let dir = TempDir::new("cni-bind-file");
        let path = dir.path().join("cni.sock");
        fs::write(&path, "important").expect("write");
        let err = bind(&path).expect_err("not a socket");
        assert!(matches!(err, CniProtoError::NotASocket { .. }), "{err:?}");
        assert_eq!(fs::read_to_string(&path).expect("kept"), "important");
    }

    #[test]
    fn namespaces_file_round_trip() {
        let dir = TempDir::new("cni-nsfile");
        let path = dir.path().join("run/mesh-namespaces");
        write_namespaces_file(&path, ["shop", "default", "shop"]).expect("write");
        assert_eq!(fs::read_to_string(&path).expect("read"), "default\nshop\n");
        assert_eq!(
            read_namespaces_file(&path).expect("read"),
            BTreeSet::from(["default".to_string(), "shop".to_string()])
        );
        assert_eq!(
            fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
            0o644
        );
        // Rewritten in place, nothing left beside it.
        write_namespaces_file(&path, Vec::<String>::new()).expect("write empty");
        assert!(read_namespaces_file(&path).expect("read").is_empty());
        assert_eq!(fs::read_dir(dir.path().join("run")).expect("ls").count(), 1);
        // Comments and blank lines are ignored when reading.
        fs::write(&path, "# mesh\n\n  a \nb\n").expect("write");
        assert_eq!(
            read_namespaces_file(&path).expect("read"),
            BTreeSet::from(["a".to_string(), "b".to_string()])
        );
    }

    #[test]
    fn namespaces_file_refuses_bad_names_and_keeps_the_old_list() {
        let dir = TempDir::new("cni-nsfile-bad");
        let path = dir.path().join("mesh-namespaces");
        write_namespaces_file(&path, ["good"]).expect("write");
        for bad in ["", "a\nb", "Upper", "-lead", "trail-", &"x".repeat(64)] {
            let err = write_namespaces_file(&path, ["ok", bad]).expect_err(bad);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert_eq!(fs::read_to_string(&path).expect("read"), "good\n");
    }
}
