//! The accept loop every listener of the agent runs. An accept error is almost always
//! transient (EMFILE/ENFILE while descriptors are short, ENOBUFS, a connection aborted in
//! the backlog): ending the loop on one would leave an enrolled pod without a listener until
//! the agent restarts, with its traffic captured into a closed port. So errors are counted,
//! logged once per streak, and retried with back-off; only the caller ends the loop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

/// A listening socket registered with the runtime it was made on, whose accepted sockets
/// are not registered anywhere yet, so that each is registered once, with the event loop
/// of the shard it will run on. Tokio's `TcpListener` registers them with the accepting
/// thread's: one run elsewhere had to be moved (`epoll_ctl` DEL and ADD).
pub struct Listener(AsyncFd<mio::net::TcpListener>);

impl Listener {
    /// Registers `listener` with the current runtime (it is made non-blocking).
    pub fn from_std(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        crate::sys::async_readable(mio::net::TcpListener::from_std(listener)).map(Self)
    }

    /// The next connection, non-blocking (mio accepts with `SOCK_NONBLOCK`) and registered
    /// nowhere.
    pub async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            // `WouldBlock` clears the readiness and waits again.
            if let Ok(accepted) = ready.try_io(|listener| listener.get_ref().accept()) {
                return accepted.map(|(stream, peer)| (stream.into(), peer));
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }
}

/// Delays between retries after accept errors: doubling from `initial` up to `max`, back to
/// `initial` after the next success.
#[derive(Clone, Copy, Debug)]
pub struct AcceptBackoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for AcceptBackoff {
    /// 10 ms is short enough that a brief descriptor shortage costs little latency; 1 s
    /// caps both the wait once descriptors are back and the cost of a persistent error.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
        }
    }
}

/// Accepts connections on `listener` and hands each to `on_accept` until `stop` resolves.
/// `name` identifies the listener in logs; every accept error increments `errors`.
pub async fn accept_loop(
    listener: &Listener,
    name: &'static str,
    backoff: AcceptBackoff,
    errors: Counter,
    stop: impl Future<Output = ()>,
    mut on_accept: impl FnMut(std::net::TcpStream, SocketAddr),
) {
    tokio::pin!(stop);
    let mut delay = backoff.initial;
    // Errors since the last successful accept: the first is logged, the rest only counted,
    // and the end of the streak is logged with its length.
    let mut streak: u64 = 0;
    loop {
        let accepted = tokio::select! {
            () = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if streak > 0 {
                    info!(
                        listener = name,
                        failures = streak,
                        "accepting again after accept errors"
                    );
                    streak = 0;
                    delay = backoff.initial;
                }
                on_accept(stream, peer);
            }
            Err(e) => {
                errors.inc();
                if streak == 0 {
                    warn!(listener = name, error = %e, retry_in = ?delay, "accept failed; retrying with back-off until it works again");
                }
                streak += 1;
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(backoff.max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    const CHILD_ENV: &str = "AMBIT_ACCEPT_FD_EXHAUSTION_CHILD";
    const CHILD_TEST: &str = "tunnel::accept::tests::fd_exhaustion_child";
    const CHILD_DONE: &str = "fd-exhaustion-child: accepted after the shortage";

    /// Lowering RLIMIT_NOFILE affects the whole process, so the scenario runs in a child
    /// process (this test binary again, running only the test below).
    #[test]
    fn accepting_resumes_once_descriptors_are_freed() {
        let exe = std::env::current_exe().expect("test binary path");
        let output = std::process::Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                CHILD_TEST,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .expect("running the child test");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "child failed:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains(CHILD_DONE) || stderr.contains(CHILD_DONE),
            "the child test did not run its scenario:\n{stdout}\n{stderr}"
        );
    }

    #[test]
    #[ignore = "runs in its own process, started by accepting_resumes_once_descriptors_are_freed"]
    fn fd_exhaustion_child() {
        if std::env::var_os(CHILD_ENV).is_none() {
            eprintln!("only meaningful in the child process the parent test starts");
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener =
                Listener::from_std(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
                    .expect("listener registers");
            let addr = listener.local_addr().expect("local addr");
            let errors = Counter::<u64>::default();
            let accepted = Arc::new(AtomicUsize::new(0));
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let loop_task = {
                let errors = errors.clone();
                let accepted = accepted.clone();
                tokio::spawn(async move {
                    accept_loop(
                        &listener,
                        "test",
                        AcceptBackoff::default(),
                        errors,
                        async {
                            let _ = stop_rx.await;
                        },
                        move |stream, _| {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            let mut stream = TcpStream::from_std(stream).expect("registers");
                            // Kept open until the reply is read.
                            tokio::spawn(async move {
                                let _ = stream.write_all(b"hi").await;
                                let _ = stream.readable().await;
                            });
                        },
                    )
                    .await;
                })
            };

            // Fill the descriptor table: a low limit, then files until EMFILE.
            crate::sys::set_nofile_soft_limit(128).expect("lowering RLIMIT_NOFILE");
            let mut filler = Vec::new();
            loop {
                match std::fs::File::open("/dev/null") {
                    Ok(f) => filler.push(f),
                    Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
                    Err(e) => panic!("unexpected error filling the fd table: {e}"),
                }
            }
            // One descriptor for the client; the connection then completes in the
            // listener's backlog, and accepting it needs a descriptor there is none of.
            filler.pop();
            let mut client = TcpStream::connect(addr).await.expect("client connects");
            let until_error = Instant::now() + Duration::from_secs(10);
            while errors.get() < 3 {
                assert!(
                    Instant::now() < until_error,
                    "the listener never hit EMFILE"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 0, "no fd, no accept");
            assert!(
                !loop_task.is_finished(),
                "an accept error must not end the loop"
            );

            drop(filler);
            let mut reply = [0u8; 2];
            tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut reply))
                .await
                .expect("accepting never resumed after descriptors were freed")
                .expect("reply from the accepted side");
            assert_eq!(&reply, b"hi");
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
            // The streak is over: a new connection is served at once.
            let mut second = TcpStream::connect(addr).await.expect("second client");
            tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut reply))
                .await
                .expect("second connection served")
                .expect("second reply");
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
            let _ = client.write_all(b"bye").await;
            let _ = stop_tx.send(());
            tokio::time::timeout(Duration::from_secs(5), loop_task)
                .await
                .expect("the loop ends when told")
                .expect("accept loop task");
            println!("{CHILD_DONE} ({} accept errors)", errors.get());
        });
    }
}
