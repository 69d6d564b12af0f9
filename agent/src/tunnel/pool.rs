//! Pooled HBONE client connections: one key per (source identity, destination identity,
//! destination address); up to `max_streams` streams share a connection; when none has room
//! exactly one handshake runs while other callers wait for it; idle connections close after
//! a timeout, and beyond [`IDLE_KEPT_PER_KEY`] at the reaper's next pass.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::TunnelError;
use super::keepalive::Keepalive;
use crate::identity::SpiffeId;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    pub destination: SpiffeId,
    pub address: SocketAddr,
}

/// How long a connection nobody holds any more may take to send what its last streams
/// queued (their last DATA, END_STREAM) and its GOAWAY before it is dropped: a peer that
/// stops reading cannot keep it.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The task that drives one HTTP/2 client connection. When the [`Driver`] drops (with the
/// connection's last holder), h2 closes the connection itself once no stream or handle is
/// left, after writing what the streams queued and a GOAWAY; aborting the task instead
/// would throw those frames away, and with them a client's last bytes and its FIN.
pub struct Driver {
    task: JoinHandle<()>,
    /// Never sent on: its drop starts the close grace.
    _closing: oneshot::Sender<()>,
}

impl Driver {
    /// Drives `connection`, pinging the peer through `ping_pong` as `keepalive` says: a
    /// silent peer's connection is dropped, which fails its streams (their proxies reset
    /// their clients); the pool skips a finished driver's connection from then on.
    pub fn spawn<C>(
        connection: C,
        ping_pong: Option<h2::PingPong>,
        keepalive: Keepalive,
        address: SocketAddr,
    ) -> Self
    where
        C: Future<Output = Result<(), h2::Error>> + Send + 'static,
    {
        let (closing, closed) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                // The connection first: after a stall a PONG already in the socket is read
                // before the keepalive can expire.
                biased;
                ended = &mut connection => ended,
                silent = keepalive.expire(ping_pong) => {
                    warn!(%address, unanswered_for = ?silent, "HBONE peer left a keepalive PING unanswered; connection dropped, its streams reset");
                    return;
                }
                _ = closed => match tokio::time::timeout(CLOSE_GRACE, &mut connection).await {
                    Ok(ended) => ended,
                    Err(_) => {
                        debug!(%address, grace = ?CLOSE_GRACE, "HBONE connection did not finish closing in time; dropped");
                        return;
                    }
                },
            };
            if let Err(e) = ended {
                debug!(%address, error = %e, "HBONE connection ended");
            }
        });
        Self {
            task,
            _closing: closing,
        }
    }

    fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// A live HTTP/2 client connection and its driver task; dropping the last holder lets the
/// driver close it ([`Driver`]).
pub struct PooledConnection {
    pub send: SendRequest<Bytes>,
    driver: Driver,
    active_streams: AtomicUsize,
    /// Milliseconds since the pool's epoch when the last stream ended.
    idle_since_ms: AtomicU64,
    /// The peer sent GOAWAY: no new stream goes here; the connection lives on for the
    /// streams it carries and closes after them.
    retired: AtomicBool,
}

/// A claim on one stream slot of a pooled connection; the slot frees on drop.
pub struct StreamLease {
    conn: Arc<PooledConnection>,
    epoch: Instant,
}

impl StreamLease {
    /// A lease on a connection of its own, outside any pool: the connection closes when the
    /// lease drops.
    pub fn unpooled(send: SendRequest<Bytes>, driver: Driver) -> Self {
        Self {
            conn: Arc::new(PooledConnection {
                send,
                driver,
                active_streams: AtomicUsize::new(1),
                idle_since_ms: AtomicU64::new(0),
                retired: AtomicBool::new(false),
            }),
            epoch: Instant::now(),
        }
    }

    pub fn send_request(&self) -> SendRequest<Bytes> {
        self.conn.send.clone()
    }

    /// The peer is draining this connection (GOAWAY): later leases skip it.
    pub fn retire(&self) {
        self.conn.retired.store(true, Ordering::Release);
    }
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        if self.conn.active_streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn
                .idle_since_ms
                .store(millis_since(self.epoch), Ordering::Release);
        }
    }
}

#[derive(Default)]
struct KeyEntry {
    /// Held while a handshake for this key runs: later callers queue behind it and then
    /// find room on the new connection instead of racing their own handshakes.
    connecting: tokio::sync::Mutex<()>,
    connections: Mutex<Vec<Arc<PooledConnection>>>,
}

impl KeyEntry {
    fn try_lease(&self, max_streams: usize, epoch: Instant) -> Option<StreamLease> {
        let mut conns = self.connections.lock().ok()?;
        // A retired connection leaves the pool; its leases keep it until its streams end.
        conns.retain(|c| !c.driver.is_finished() && !c.retired.load(Ordering::Acquire));
        for conn in conns.iter() {
            let mut active = conn.active_streams.load(Ordering::Acquire);
            while active < max_streams {
                match conn.active_streams.compare_exchange(
                    active,
                    active + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        return Some(StreamLease {
                            conn: conn.clone(),
                            epoch,
                        });
                    }
                    Err(now) => active = now,
                }
            }
        }
        None
    }
}

/// Idle connections kept per key (and shard) until the idle timeout; the others close at
/// the reaper's next pass. After a burst, a key can have a hundred connections, each holding
/// h2's stream and queue slabs grown to the burst's size (~170 KiB apiece, measured in the
/// soak) and a socket, which new streams can do without: they pack onto the first
/// connections that have room.
const IDLE_KEPT_PER_KEY: usize = 1;

/// The reaper's longest period: how late surplus idle connections close at most.
const MAX_REAP_PERIOD: Duration = Duration::from_secs(5);

/// Which data-path shard ([`super::shards`]) a pooled connection belongs to: its driver
/// task runs there, so a stream from another shard would wake that shard's thread for
/// every frame. Each shard pools its own connections; off the shards it is 0.
type ShardIndex = usize;

pub struct Pool {
    entries: Mutex<HashMap<(ShardIndex, PoolKey), Arc<KeyEntry>>>,
    max_streams: usize,
    idle_timeout: Duration,
    epoch: Instant,
    reaper: Mutex<Option<JoinHandle<()>>>,
}

impl Pool {
    pub fn new(max_streams: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            max_streams: max_streams.max(1),
            idle_timeout,
            epoch: Instant::now(),
            reaper: Mutex::new(None),
        })
    }

    /// A stream slot for `key`, connecting with `connect` only when no pooled connection
    /// has room.
    pub async fn lease<F, Fut>(
        self: &Arc<Self>,
        key: &PoolKey,
        connect: F,
    ) -> Result<StreamLease, TunnelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(SendRequest<Bytes>, Driver), TunnelError>>,
    {
        self.ensure_reaper();
        let entry = {
            let mut entries = self.entries.lock().map_err(poisoned)?;
            let shard = super::shards::current_shard().unwrap_or(0);
            entries.entry((shard, key.clone())).or_default().clone()
        };
        if let Some(lease) = entry.try_lease(self.max_streams, self.epoch) {
            return Ok(lease);
        }
        let _connecting = entry.connecting.lock().await;
        if let Some(lease) = entry.try_lease(self.max_streams, self.epoch) {
            return Ok(lease);
        }
        let (send, driver) = connect().await?;
        let conn = Arc::new(PooledConnection {
            send,
            driver,
            active_streams: AtomicUsize::new(1),
            idle_since_ms: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        });
        entry
            .connections
            .lock()
            .map_err(poisoned)?
            .push(conn.clone());
        debug!(destination = %key.destination, address = %key.address, "new pooled HBONE connection");
        Ok(StreamLease {
            conn,
            epoch: self.epoch,
        })
    }

    /// Open pooled connections, over all keys.
    pub fn connection_count(&self) -> usize {
        let Ok(entries) = self.entries.lock() else {
            return 0;
        };
        entries
            .values()
            .map(|e| {
                e.connections
                    .lock()
                    .map(|c| c.iter().filter(|c| !c.driver.is_finished()).count())
                    .unwrap_or(0)
            })
            .sum()
    }

    fn ensure_reaper(self: &Arc<Self>) {
        let Ok(mut reaper) = self.reaper.lock() else {
            return;
        };
        if reaper.is_some() {
            return;
        }
        let weak = Arc::downgrade(self);
        let period = (self.idle_timeout / 4).clamp(Duration::from_millis(10), MAX_REAP_PERIOD);
        *reaper = Some(tokio::spawn(reap_idle(weak, period)));
    }

    fn reap_once(&self) {
        let now_ms = millis_since(self.epoch);
        let idle_ms = self.idle_timeout.as_millis() as u64;
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        for entry in entries.values() {
            if let Ok(mut conns) = entry.connections.lock() {
                // Under the lock a lease cannot take a stream slot meanwhile, so a connection
                // seen idle here closes with no stream on it.
                let mut idle_kept = 0;
                conns.retain(|c| {
                    if c.driver.is_finished() {
                        return false;
                    }
                    if c.active_streams.load(Ordering::Acquire) > 0 {
                        return true;
                    }
                    let idle_for = now_ms.saturating_sub(c.idle_since_ms.load(Ordering::Acquire));
                    let keep = idle_for < idle_ms && idle_kept < IDLE_KEPT_PER_KEY;
                    idle_kept += usize::from(keep);
                    keep
                });
            }
        }
        // An entry a lease still holds stays even while empty: its handshake is running, and
        // the connection it makes must land where the next lease for the key looks.
        entries.retain(|_, e| {
            Arc::strong_count(e) > 1 || e.connections.lock().map(|c| !c.is_empty()).unwrap_or(false)
        });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(mut reaper) = self.reaper.lock()
            && let Some(task) = reaper.take()
        {
            task.abort();
        }
    }
}

async fn reap_idle(pool: Weak<Pool>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.reap_once();
    }
}

fn millis_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> TunnelError {
    TunnelError::Io(std::io::Error::other("connection pool lock poisoned"))
}
