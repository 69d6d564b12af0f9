//! Running code inside another network namespace.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, so each call here spawns a
//! short-lived thread, enters the namespace there and runs the closure. Sockets created in
//! that thread stay in that namespace for their whole life and can be handed back to the
//! async runtime. (`ip netns exec` is unusable for the agent: it remounts /sys and hides the
//! bpffs pins.)

use std::fs::File;
use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use crate::sys;

/// An open handle on a network namespace (e.g. `/run/netns/<name>` or `/proc/<pid>/ns/net`).
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    file: File,
}

impl NetNs {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", path.display())))?;
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    /// The thread is scoped: `f` may borrow from the caller (e.g. an already loaded eBPF
    /// program to attach inside the namespace).
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> io::Result<T> + Send,
    {
        let fd = self.file.as_fd();
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("ambit-netns".into())
                .spawn_scoped(scope, move || {
                    sys::setns_net(fd)?;
                    f()
                })?
                .join()
                .map_err(|_| io::Error::other("thread inside netns panicked"))?
        })
    }

    /// The namespace's cookie, as the eBPF programs see it (`bpf_get_netns_cookie`).
    pub fn cookie(&self) -> io::Result<u64> {
        self.run(|| {
            // Any socket works; a wildcard UDP bind needs no interface to be up.
            let probe = UdpSocket::bind(("0.0.0.0", 0))?;
            sys::netns_cookie(&probe)
        })
    }
}

impl AsFd for NetNs {
    /// The namespace file, e.g. for attaching a program to the namespace.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
