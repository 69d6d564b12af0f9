//! The data path's threads: one single-threaded tokio runtime per thread (a "shard"), each
//! with its own epoll and timers. A connection stays on the shard it is handed to from
//! accept to close, with every task it spawns (its HTTP/2 driver, its streams) and the
//! pooled HBONE connections it dials. With one multi-threaded runtime the tasks of one
//! connection woke each other across threads (a futex wake and a steal per hand-off); on
//! this layout a hand-off between them is a queue push on the same thread, and the cores
//! are still all used: different connections run on different shards.
//!
//! The control plane (enrollment, config, certificates, admin) runs on its own runtime on
//! the main thread: blocking or slow control work never holds a shard's thread. A
//! connection still reads what the control plane publishes (the mesh state, certificates).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tracing::warn;

use super::accept::Listener;

thread_local! {
    /// The index of the shard this thread runs, if it runs one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The shard the calling thread runs; `None` off the shards (control plane, tests).
pub fn current_shard() -> Option<usize> {
    CURRENT.with(Cell::get)
}

struct Shard {
    handle: Handle,
    /// Connections handed to this shard and not yet finished.
    live: Arc<AtomicUsize>,
    /// Times the shard's thread woke from waiting for events.
    #[cfg(test)]
    wakes: Arc<AtomicUsize>,
}

/// How often an otherwise idle shard wakes (see [`keep_timer_deadline_near`]).
const TIMER_TICK: Duration = Duration::from_secs(1);

/// Runs forever on a shard: a timer that fires every [`TIMER_TICK`]. Tokio writes the
/// runtime's eventfd whenever a timer is registered with a deadline earlier than the one
/// the driver last waited for, or with no timer pending at all, even on a current-thread
/// runtime whose own thread, busy registering it, is not waiting (tokio-rs/tokio#5207,
/// fix not released). Every connection registers timers (dial, handshake and stream
/// deadlines): each was a `write` and, later, an `epoll_wait` woken for nothing. With this
/// tick pending, the deadline the driver waits for is never more than a second away, so
/// per-connection deadlines (10 s and more by default) register without a wake-up. Costs
/// about three wake-ups a second on an idle shard (tokio's wheel wakes at the tick's slot
/// and at the tick, and re-arming it after it fired takes the same eventfd path once).
async fn keep_timer_deadline_near() {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// Where connections and listeners run.
pub struct Shards {
    shards: Vec<Shard>,
    /// Round-robin placement of listeners.
    next_listener: AtomicUsize,
    /// Connections closed because they could not be registered on their shard.
    register_failures: AtomicU64,
}

impl Shards {
    /// Starts `count` shard threads, each running its runtime until the process exits.
    pub fn start(count: usize) -> io::Result<Self> {
        let mut shards = Vec::with_capacity(count);
        for index in 0..count {
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder.enable_all();
            #[cfg(test)]
            let wakes = Arc::new(AtomicUsize::new(0));
            #[cfg(test)]
            {
                let wakes = wakes.clone();
                builder.on_thread_unpark(move || {
                    wakes.fetch_add(1, Ordering::Relaxed);
                });
            }
            let runtime = builder.build()?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name(format!("ambit-shard-{index}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(index)));
                    runtime.block_on(keep_timer_deadline_near());
                })?;
            shards.push(Shard {
                handle,
                live: Arc::new(AtomicUsize::new(0)),
                #[cfg(test)]
                wakes,
            });
        }
        Ok(Self {
            shards,
            next_listener: AtomicUsize::new(0),
            register_failures: AtomicU64::new(0),
        })
    }

    /// No threads of its own: everything runs on the caller's runtime (tests, tools).
    pub fn inline() -> Self {
        Self {
            shards: Vec::new(),
            next_listener: AtomicUsize::new(0),
            register_failures: AtomicU64::new(0),
        }
    }

    /// Threads that run connections (0 when inline).
    pub fn count(&self) -> usize {
        self.shards.len()
    }

    /// Connections each shard runs now, by shard index.
    #[cfg(test)]
    fn live_connections(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|s| s.live.load(Ordering::Relaxed))
            .collect()
    }

    /// Registers `listener` with the next shard (round-robin) and runs `serve` on it there.
    /// Fails only if the listener cannot be registered, before anything runs.
    pub fn spawn_listener<F, Fut>(
        &self,
        listener: std::net::TcpListener,
        serve: F,
    ) -> io::Result<AbortHandle>
    where
        F: FnOnce(Listener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.shards.is_empty() {
            return Ok(tokio::spawn(serve(Listener::from_std(listener)?)).abort_handle());
        }
        let index = self.next_listener.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        let handle = &self.shards[index].handle;
        // Entering the shard's runtime makes the listener register with its epoll, from
        // this thread.
        let listener = {
            let _entered = handle.enter();
            Listener::from_std(listener)?
        };
        Ok(handle.spawn(serve(listener)).abort_handle())
    }

    /// Runs `handle_connection` for an accepted connection on the shard with the fewest live
    /// connections; on a tie the current shard. The socket is registered with that shard's
    /// event loop only (one `epoll_ctl`), from this thread. If registering fails the socket
    /// is closed: the sockets toward applications come armed to reset (their listeners'
    /// options), so their applications see a reset; an HBONE peer sees its handshake end.
    pub fn spawn_connection<F, Fut>(&self, stream: std::net::TcpStream, handle_connection: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(target) = self.least_busy() else {
            match TcpStream::from_std(stream) {
                Ok(stream) => drop(tokio::spawn(handle_connection(stream))),
                Err(e) => self.register_failed(None, &e),
            }
            return;
        };
        let shard = &self.shards[target];
        let registered = {
            let _entered = shard.handle.enter();
            TcpStream::from_std(stream)
        };
        let stream = match registered {
            Ok(stream) => stream,
            Err(e) => return self.register_failed(Some(target), &e),
        };
        let live = LiveConnection::new(&shard.live);
        // From the shard's own thread this is a local queue push, as `tokio::spawn` is.
        shard.handle.spawn(async move {
            handle_connection(stream).await;
            drop(live);
        });
    }

    fn register_failed(&self, shard: Option<usize>, error: &io::Error) {
        let failures = self.register_failures.fetch_add(1, Ordering::Relaxed) + 1;
        // Logged at 1, 2, 4, 8, ... failures: a persistent cause does not flood.
        if failures.is_power_of_two() {
            warn!(?shard, %error, failures, "could not register a connection with its shard's event loop; closed it");
        }
    }

    fn least_busy(&self) -> Option<usize> {
        let here = current_shard();
        let mut best: Option<(usize, usize)> = None;
        for (index, shard) in self.shards.iter().enumerate() {
            let live = shard.live.load(Ordering::Relaxed);
            let better = match best {
                None => true,
                Some((_, best_live)) => {
                    live < best_live || (live == best_live && Some(index) == here)
                }
            };
            if better {
                best = Some((index, live));
            }
        }
        best.map(|(index, _)| index)
    }
}

/// One live connection on a shard, until dropped.
struct LiveConnection(Arc<AtomicUsize>);

impl LiveConnection {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        Self(live.clone())
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::sync::mpsc;

    use super::*;

    const IN_TIME: Duration = Duration::from_secs(10);

    /// Echoes byte by byte, reporting the shard it runs on before each echo.
    async fn echo(mut stream: TcpStream, report: mpsc::UnboundedSender<Option<usize>>) {
        let mut byte = [0u8; 1];
        while stream.read_exact(&mut byte).await.is_ok() {
            let _ = report.send(current_shard());
            if stream.write_all(&byte).await.is_err() {
                return;
            }
        }
    }

    async fn round_trip(
        client: &mut TcpStream,
        reports: &mut mpsc::UnboundedReceiver<Option<usize>>,
        byte: u8,
    ) -> usize {
        client.write_all(&[byte]).await.expect("write");
        let mut echo = [0u8; 1];
        tokio::time::timeout(IN_TIME, client.read_exact(&mut echo))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(echo, [byte]);
        reports
            .recv()
            .await
            .expect("report")
            .expect("handled on a shard thread")
    }

    /// The listener runs on shard 1 (round-robin: a first listener takes shard 0). The
    /// client side runs on the test's own runtime.
    #[tokio::test]
    async fn connections_go_to_the_least_busy_shard_and_keep_working_there() {
        let shards = Arc::new(Shards::start(2).expect("shards"));
        let bind = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            l
        };
        let idle = shards
            .spawn_listener(bind(), |_listener| std::future::pending())
            .expect("first listener");
        let std_listener = bind();
        let addr = std_listener.local_addr().expect("addr");
        let (report_tx, mut reports) = mpsc::unbounded_channel();
        let listener_shards = shards.clone();
        let accepting = shards
            .spawn_listener(std_listener, move |listener| async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let report = report_tx.clone();
                    listener_shards.spawn_connection(stream, move |s| echo(s, report));
                }
            })
            .expect("listener registers");

        // A tie: the connection stays on the accepting shard.
        let mut first = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(round_trip(&mut first, &mut reports, 1).await, 1);
        assert_eq!(shards.live_connections(), [0, 1]);
        // Shard 1 is busier: the next one, accepted there, runs on shard 0.
        let mut second = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(round_trip(&mut second, &mut reports, 2).await, 0);
        assert_eq!(shards.live_connections(), [1, 1]);

        // The second connection's socket is registered with shard 0's own event loop: it
        // keeps working while shard 1, where it was accepted, is blocked.
        let (unblock, blocked) = std::sync::mpsc::channel::<()>();
        let (is_blocked, mut shard1_blocked) = mpsc::unbounded_channel();
        shards.shards[1].handle.spawn(async move {
            let _ = is_blocked.send(());
            // Blocks shard 1's thread on purpose.
            let _ = blocked.recv_timeout(IN_TIME * 3);
        });
        shard1_blocked.recv().await.expect("shard 1 blocked");
        assert_eq!(round_trip(&mut second, &mut reports, 3).await, 0);
        unblock.send(()).expect("unblock shard 1");
        assert_eq!(round_trip(&mut first, &mut reports, 4).await, 1);

        // A closed connection no longer counts.
        drop(first);
        drop(second);
        let deadline = tokio::time::Instant::now() + IN_TIME;
        while shards.live_connections() != [0, 0] {
            assert!(
                tokio::time::Instant::now() < deadline,
                "live counts never fell"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        idle.abort();
        accepting.abort();
    }

    /// A shard woken by a message registers a 10 s deadline and cancels it (as every
    /// connection does) and waits again: with the timer tick pending, one wake-up per
    /// message. Without it tokio's timer wrote the shard's eventfd at each registration and
    /// the shard woke a second time for nothing: two per message (checked: 100 for 50).
    #[tokio::test]
    async fn registering_a_connection_deadline_does_not_wake_the_shard() {
        const ROUNDS: usize = 50;
        let shards = Shards::start(1).expect("shards");
        let shard = &shards.shards[0];
        let (tx, mut rx) = mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
        shard.handle.spawn(async move {
            while let Some(done) = rx.recv().await {
                let mut deadline = Box::pin(tokio::time::sleep(Duration::from_secs(10)));
                // Polling registers the deadline with the shard's timer; dropping it
                // cancels it, as a connection that finishes in time does.
                assert!(futures::poll!(deadline.as_mut()).is_pending());
                drop(deadline);
                let _ = done.send(());
            }
        });
        // Let the shard start and register its tick.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = shard.wakes.load(Ordering::Relaxed);
        for _ in 0..ROUNDS {
            let (done, registered) = tokio::sync::oneshot::channel();
            tx.send(done).expect("shard task runs");
            registered.await.expect("deadline registered");
            // Give the shard time to go back to waiting (and to wake for nothing, if it does).
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let wakes = shard.wakes.load(Ordering::Relaxed) - before;
        assert!(
            wakes < ROUNDS * 3 / 2,
            "{wakes} wake-ups for {ROUNDS} messages: registering a deadline woke the shard"
        );
    }

    #[tokio::test]
    async fn inline_shards_run_on_the_callers_runtime() {
        let shards = Shards::inline();
        assert_eq!(shards.count(), 0);
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        shards
            .spawn_listener(std_listener, move |listener| async move {
                let accepted = listener.accept().await.map(|_| current_shard());
                let _ = tx.send(accepted.ok());
            })
            .expect("listener");
        let _client = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(rx.await.expect("accepted"), Some(None));
    }
}
