//! A plain TCP relay pair with the mesh's three TCP legs and nothing else: the client's
//! connection to a relay in its own pod (127.0.0.1, like the agent's 15001), that relay's
//! connection across nodes to a relay in the server's pod, and that one's connection to the
//! app. No capture, TLS, HTTP/2, policy or logs; each relay is one thread with a
//! single-threaded runtime, so nothing is handed between threads either. Whatever a mesh
//! with these legs does in user space, it pays at least what this pays in the kernel: its
//! connections/s, added latency, bulk throughput and CPU per byte against no mesh are the
//! floor the bench reports beside the aims.

use std::fs::File;
use std::io::{Read as _, Seek as _};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::oneshot;

use super::load;

/// What a relay copies per read for connections and round trips: tokio's default.
pub const SMALL_COPIES: usize = 8 * 1024;

/// What a relay copies per read for bulk: the agent's largest read from an application
/// (`tunnel/copy.rs`), so that the floor pays no more syscalls per byte than the agent.
pub const BULK_COPIES: usize = 256 * 1024;

/// One relay: accepts in a pod's netns and copies each connection to `upstream`, both ways,
/// up to `copies` bytes per read, half-closes carried across. Stops when dropped.
pub struct Relay {
    pub addr: SocketAddr,
    /// `/proc/thread-self/stat` of the relay's thread, opened by the thread itself.
    thread_stat: File,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Relay {
    pub fn start(
        netns: &Path,
        listen: SocketAddr,
        upstream: SocketAddr,
        copies: usize,
    ) -> anyhow::Result<Self> {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<(SocketAddr, File)>();
        // The thread is in the pod's netns: the listener and every upstream socket are the
        // pod's.
        let thread = load::spawn_in_netns(netns, move || {
            let listener = std::net::TcpListener::bind(listen)
                .with_context(|| format!("relay listening on {listen}"))?;
            listener.set_nonblocking(true)?;
            let stat = File::open("/proc/thread-self/stat")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // Nothing left to fail before serving: tell the caller where to connect.
            let _ = ready_tx.send((listener.local_addr()?, stat));
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let accept_loop = async {
                    while let Ok((mut client, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await
                            else {
                                return;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional_with_sizes(
                                &mut client,
                                &mut server,
                                copies,
                                copies,
                            )
                            .await;
                        });
                    }
                };
                tokio::select! {
                    () = accept_loop => {}
                    _ = stopped => {}
                }
                anyhow::Ok(())
            })
        })?;
        let Ok((addr, thread_stat)) = ready.recv() else {
            // The thread ended before listening: its error says why.
            load::join(thread)?;
            anyhow::bail!("relay thread ended before listening");
        };
        Ok(Self {
            addr,
            thread_stat,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// CPU time of the relay's thread so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        let mut stat = &self.thread_stat;
        let mut text = String::new();
        stat.rewind()?;
        stat.read_to_string(&mut text)?;
        super::procfs::cpu_time_of_stat(&text)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
