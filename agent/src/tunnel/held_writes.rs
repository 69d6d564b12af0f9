//! Joins a new HBONE connection's handshake writes into fewer socket writes.
//!
//! tokio-rustls writes each handshake flight the moment it is ready and flushes it, and
//! h2 writes its preface and its first frames apart; on a socket with `TCP_NODELAY` each
//! of those writes is a syscall and a segment that wakes the peer's agent on its own. The
//! two that matter: the client's last TLS flight (Certificate, CertificateVerify,
//! Finished) can leave with its HTTP/2 preface, SETTINGS and first CONNECT, and the
//! server's SETTINGS and SETTINGS ACK with its answer to that CONNECT. Neither end needs
//! to wait for those bytes before it sends its own (an HTTP/2 client sends its preface and
//! requests without waiting for the server's SETTINGS; the TLS 1.3 client's Finished is
//! its last flight), so holding them (the client's until its task is about to sleep, the
//! server's until it has answered a stream, at most `TunnelConfig::first_frames_hold`)
//! changes when they leave, never whether (h2, so hyper and ztunnel, and nghttp2 send
//! requests at once; a client that waited for the server's SETTINGS would wait out that
//! hold once).
//!
//! The server's answer comes only once the upstream connect is done, a wait of its own:
//! sent apart, the SETTINGS woke the client's agent once for nothing (a wake-up, an
//! `epoll_wait` and a read) and cost the server a second write. The server's task says
//! when it has answered ([`HeldWrites::hold_until_answered`]): a read that finds nothing
//! cannot tell, since h2 reads until its transport has nothing and only then, in the same
//! poll, writes what the frames it read call for (the ACK, window updates).
//!
//! The client also holds its ACK of the server's SETTINGS (a record of its own, and a
//! wake-up of the server's agent for nothing) until its next write, normally the first
//! bytes of the stream once the 200 is in. The ACK only tells the server that the client
//! applies its settings, which it does on receipt, and any frame the client sends after
//! it still follows it on the wire; RFC 9113 lets a sender give up on an ACK that does not
//! come "within a reasonable amount of time", so a client that writes nothing more sends
//! it after [`REPLY_HOLD`].
//!
//! Neither crate offers this (tokio-rustls flushes after every flight; h2 exposes no
//! hook between its handshake writes), hence a wrapper under the TLS stream.

use std::future::Future as _;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Bytes held at most; a larger write goes out at once with what is held. Handshake
/// flights are a few KiB.
const MAX_HELD: usize = 16 * 1024;

/// The client's reply to the server's first bytes is held only if it is one small
/// record: a TLS 1.3 record of one bare control frame (the SETTINGS ACK is 31 bytes: 9 of
/// frame, 22 of record header, content type and tag). Anything larger carries a stream's
/// frames, which must not wait.
const MAX_REPLY_HELD: usize = 40;

/// How long the client's SETTINGS ACK waits at most for a write to join. Well below any
/// peer's patience for an ACK (nghttpx waits 10 s), and no earlier than the shards' timer
/// tick, so arming it costs no wake-up of its own (see `shards::keep_timer_deadline_near`).
const REPLY_HOLD: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holding {
    /// During the TLS handshake: every write is held until the task is about to sleep.
    Every,
    /// After it, on the client: writes are held until the next release, then the client
    /// waits for the server's first bytes.
    UntilRelease,
    /// The client after its first release: writes pass straight through until a read
    /// brings data (the server's SETTINGS).
    AwaitingReply,
    /// Data came: the client's next write, if it is one small record (its SETTINGS ACK),
    /// is held until the write after it, a shutdown or [`REPLY_HOLD`]; then writes pass
    /// straight through.
    Reply,
    /// After it, on the server: writes are held until the server has answered a stream
    /// (its `answered` flag), or for its hold; then writes pass straight through.
    UntilAnswered,
    /// Writes pass straight through.
    Off,
}

/// Holds writes back and sends them joined. While the client holds its handshake, writes
/// leave when the task that made them is about to wait for its peer: at a write after a
/// read that found nothing, or at the second read that finds nothing while something is
/// held (the first asks for the task to be polled again, so a task that writes after
/// reading still joins its write). A flush does not send what is held while holding
/// (tokio-rustls flushes after each flight); a shutdown does.
///
/// The client holds from the start (its last TLS flight is written inside tokio-rustls)
/// and calls [`HeldWrites::hold_until_release`] once TLS is done, so its HTTP/2 preface
/// joins the flight and both leave with h2's first frames; then its small reply to the
/// server's first bytes waits for its next write (at most [`REPLY_HOLD`]). The server
/// holds nothing during TLS (its one flight must not wait) and calls
/// [`HeldWrites::hold_until_answered`] after it. Then everything passes straight
/// through: the data path sees two branch checks per call.
pub(super) struct HeldWrites<T> {
    inner: T,
    /// Accepted from the caller, not yet written to `inner`.
    held: Vec<u8>,
    holding: Holding,
    /// A read found nothing while something was held.
    read_waited: bool,
    /// The server's: set once it has answered a stream (shared with its stream tasks).
    answered: Option<Arc<AtomicBool>>,
    /// When a held reply or the server's held first frames go out on their own (boxed:
    /// most of the time there is none).
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<T> HeldWrites<T> {
    /// Holds every write until told otherwise.
    pub(super) fn holding(inner: T) -> Self {
        Self::with(inner, Holding::Every)
    }

    /// Holds nothing until told otherwise.
    pub(super) fn passing(inner: T) -> Self {
        Self::with(inner, Holding::Off)
    }

    fn with(inner: T, holding: Holding) -> Self {
        Self {
            inner,
            held: Vec::new(),
            holding,
            read_waited: false,
            answered: None,
            deadline: None,
        }
    }

    /// The wrapped stream.
    pub(super) fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The client's TLS handshake is done: hold what follows (its HTTP/2 preface) until
    /// the next release, then only its reply to the server's first bytes.
    pub(super) fn hold_until_release(&mut self) {
        self.holding = Holding::UntilRelease;
    }

    /// The server's TLS handshake is done: hold what it writes (its HTTP/2 SETTINGS, the
    /// ACK of the client's SETTINGS and a WINDOW_UPDATE, all written while it reads the
    /// client's preface and first CONNECT, which came with the client's last TLS flight)
    /// until `answered` is set (by the task that answers a stream, once its answer is
    /// queued), so they leave with that answer; at most `hold`. Then hold nothing more.
    pub(super) fn hold_until_answered(&mut self, answered: Arc<AtomicBool>, hold: Duration) {
        self.holding = Holding::UntilAnswered;
        self.answered = Some(answered);
        self.deadline = Some(Box::pin(tokio::time::sleep(hold)));
    }

    fn is_answered(&self) -> bool {
        self.answered
            .as_ref()
            .is_some_and(|answered| answered.load(Ordering::Relaxed))
    }

    fn takes(&self, len: usize) -> bool {
        let room = self.held.len() + len <= MAX_HELD;
        match self.holding {
            Holding::Every | Holding::UntilRelease => !self.read_waited && room,
            Holding::UntilAnswered => !self.is_answered() && room,
            Holding::Reply => self.held.is_empty() && len <= MAX_REPLY_HELD,
            Holding::AwaitingReply | Holding::Off => false,
        }
    }

    fn hold(&mut self, bufs: &[IoSlice<'_>]) {
        for buf in bufs {
            self.held.extend_from_slice(buf);
        }
    }

    /// Everything held has been written.
    fn released(&mut self) {
        // Its capacity would otherwise stay with the connection for its whole life.
        self.held = Vec::new();
        self.read_waited = false;
        self.deadline = None;
        self.answered = None;
        self.holding = match self.holding {
            Holding::UntilRelease => Holding::AwaitingReply,
            Holding::UntilAnswered | Holding::Reply => Holding::Off,
            other => other,
        };
    }
}

impl<T: AsyncWrite + Unpin> HeldWrites<T> {
    /// Writes out what is held.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        self.released();
        Poll::Ready(Ok(()))
    }

    /// Sends what is held if the socket takes it at once, without waiting: a failed TLS
    /// handshake's alert, which the peer should still get to read its reason.
    pub(super) fn release_without_waiting(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = self.poll_release(&mut cx);
    }

    /// One write of what is held followed by `bufs`; only bytes of `bufs` that went out
    /// are reported as written.
    fn poll_write_joined(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let held = self.held.len();
        let mut slices = Vec::with_capacity(bufs.len() + 1);
        slices.push(IoSlice::new(&self.held));
        slices.extend_from_slice(bufs);
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices))?;
        if n == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        if n <= held {
            self.held.drain(..n);
            // Nothing of `bufs` went out yet: the rest of what is held goes first.
            ready!(self.poll_release(cx))?;
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        self.released();
        Poll::Ready(Ok(n - held))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeldWrites<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match this.holding {
            Holding::AwaitingReply => {
                let before = buf.filled().len();
                let read = Pin::new(&mut this.inner).poll_read(cx, buf);
                if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                    this.holding = Holding::Reply;
                }
                return read;
            }
            Holding::Reply | Holding::UntilAnswered => {
                if let Some(deadline) = &mut this.deadline
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    ready!(this.poll_release(cx))?;
                }
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            _ => {}
        }
        if !this.held.is_empty() {
            if this.read_waited {
                ready!(this.poll_release(cx))?;
            } else {
                let read = Pin::new(&mut this.inner).poll_read(cx, buf);
                if read.is_pending() {
                    this.read_waited = true;
                    cx.waker().wake_by_ref();
                }
                return read;
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeldWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.holding == Holding::Off && this.held.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        Pin::new(this).poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.holding == Holding::Off && this.held.is_empty() {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if this.takes(len) {
            this.hold(bufs);
            if this.holding == Holding::Reply {
                this.deadline = Some(Box::pin(tokio::time::sleep(REPLY_HOLD)));
            }
            return Poll::Ready(Ok(len));
        }
        if this.held.is_empty() {
            if matches!(this.holding, Holding::Reply | Holding::UntilAnswered) {
                // A reply too large to hold, or a server that answered before it had
                // written anything: the holding is over.
                this.released();
            }
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        this.poll_write_joined(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.holding == Holding::Off {
            ready!(this.poll_release(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, SystemTime};

    use bytes::Bytes;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncWriteExt as _, DuplexStream};

    use super::*;
    use crate::identity::{CertificateAuthority as _, LocalCa, SpiffeId};
    use crate::tunnel::tls::{TrustAnchors, client_config_for, server_config_for};

    /// The server's hold in these tests (the agent's is `TunnelConfig::first_frames_hold`).
    const HOLD: Duration = Duration::from_secs(1);

    /// A vectored write's slices as the one write `writev` makes of them on a socket.
    fn joined(bufs: &[IoSlice<'_>]) -> Vec<u8> {
        bufs.iter().flat_map(|b| b.iter().copied()).collect()
    }

    /// Records each write it is given (a vectored write is one), taking at most
    /// `max_write` bytes of each; its reads find nothing yet, or the end of the stream.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        max_write: Option<usize>,
        reads_pending: bool,
        /// What the next read returns, before any pending or end of stream.
        incoming: Vec<u8>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = self.max_write.map_or(buf.len(), |max| buf.len().min(max));
            self.get_mut().writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write(cx, &joined(bufs))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            if !this.incoming.is_empty() {
                let n = this.incoming.len().min(buf.remaining());
                buf.put_slice(&this.incoming[..n]);
                this.incoming.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.reads_pending {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            }
        }
    }

    #[derive(Default)]
    struct WakeCount(AtomicUsize);

    impl futures::task::ArcWake for WakeCount {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn pending_reads() -> Recorder {
        Recorder {
            reads_pending: true,
            ..Recorder::default()
        }
    }

    fn write(io: &mut HeldWrites<Recorder>, cx: &mut Context<'_>, bytes: &[u8]) {
        match Pin::new(io).poll_write(cx, bytes) {
            Poll::Ready(Ok(n)) => assert_eq!(n, bytes.len(), "the whole write is taken"),
            other => panic!("write of {bytes:?}: {other:?}"),
        }
    }

    fn read_is_pending(io: &mut HeldWrites<Recorder>, cx: &mut Context<'_>) -> bool {
        let mut bytes = [0u8; 8];
        let mut buf = ReadBuf::new(&mut bytes);
        Pin::new(io).poll_read(cx, &mut buf).is_pending()
    }

    /// The client's last TLS flight, flushed by tokio-rustls, then h2's preface: both held
    /// until the task has read and found nothing, then sent with h2's next write in one.
    #[test]
    fn writes_wait_for_an_empty_read_and_leave_with_the_next_write() {
        let wakes = Arc::new(WakeCount::default());
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = HeldWrites::holding(pending_reads());
        write(&mut io, &mut cx, b"FINISHED");
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        io.hold_until_release();
        write(&mut io, &mut cx, b"PREFACE");
        assert!(
            io.inner.writes.is_empty(),
            "a flush while holding sends nothing"
        );

        assert!(read_is_pending(&mut io, &mut cx));
        assert!(
            io.inner.writes.is_empty(),
            "the first empty read keeps holding"
        );
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "and asks to be polled again"
        );
        write(&mut io, &mut cx, b"SETTINGS");
        assert_eq!(io.inner.writes, [b"FINISHEDPREFACESETTINGS".to_vec()]);

        write(&mut io, &mut cx, b"DATA");
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(
            io.inner.writes.len(),
            2,
            "after the release writes pass through"
        );
        assert_eq!(io.inner.writes[1], b"DATA");
        assert!(read_is_pending(&mut io, &mut cx));
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "nothing held, no wake");
    }

    /// A task that does not write after its empty read still sends what it holds at its
    /// next read, so its peer is never left waiting; while holding every write (the TLS
    /// handshake) the next write is held again.
    #[test]
    fn a_second_empty_read_sends_what_is_held() {
        let waker = futures::task::waker(Arc::new(WakeCount::default()));
        let mut cx = Context::from_waker(&waker);
        let mut io = HeldWrites::holding(pending_reads());
        write(&mut io, &mut cx, b"CLIENTHELLO");
        assert!(read_is_pending(&mut io, &mut cx));
        assert!(io.inner.writes.is_empty());
        assert!(read_is_pending(&mut io, &mut cx));
        assert_eq!(io.inner.writes, [b"CLIENTHELLO".to_vec()]);

        write(&mut io, &mut cx, b"FINISHED");
        assert_eq!(
            io.inner.writes.len(),
            1,
            "still holding during the handshake"
        );
        assert!(read_is_pending(&mut io, &mut cx));
        assert!(read_is_pending(&mut io, &mut cx));
        assert_eq!(io.inner.writes[1], b"FINISHED");
    }

    /// A client past its first release, as `hold_until_release` and one joined write
    /// leave it: waiting for the server's first bytes.
    fn client_after_first_release(cx: &mut Context<'_>) -> HeldWrites<Recorder> {
        let mut io = HeldWrites::holding(pending_reads());
        io.hold_until_release();
        write(&mut io, cx, b"FLIGHT+PREFACE");
        assert!(read_is_pending(&mut io, cx));
        write(&mut io, cx, b"CONNECT");
        assert_eq!(io.inner.writes, [b"FLIGHT+PREFACECONNECT".to_vec()]);
        io
    }

    /// The server's first bytes reach the client, which reads them.
    fn settings_arrive(io: &mut HeldWrites<Recorder>, cx: &mut Context<'_>) {
        io.inner.incoming = b"SETTINGS".to_vec();
        assert!(!read_is_pending(io, cx));
    }

    const ACK_RECORD: [u8; 31] = [0xac; 31];

    /// The client's ACK of the server's SETTINGS leaves with its next write (the stream's
    /// first bytes); flushes and empty reads do not send it, and after it writes pass
    /// straight through.
    #[tokio::test(start_paused = true)]
    async fn the_client_s_reply_to_the_server_s_first_bytes_leaves_with_its_next_write() {
        let waker = futures::task::waker(Arc::new(WakeCount::default()));
        let mut cx = Context::from_waker(&waker);
        let mut io = client_after_first_release(&mut cx);
        write(&mut io, &mut cx, b"CONNECT-2");
        assert_eq!(
            io.inner.writes.len(),
            2,
            "before the server's bytes, no holding"
        );

        settings_arrive(&mut io, &mut cx);
        write(&mut io, &mut cx, &ACK_RECORD);
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert!(read_is_pending(&mut io, &mut cx));
        assert!(read_is_pending(&mut io, &mut cx));
        assert_eq!(io.inner.writes.len(), 2, "the ACK is held");

        write(&mut io, &mut cx, b"DATA");
        assert_eq!(io.inner.writes[2], [&ACK_RECORD[..], b"DATA"].concat());
        write(&mut io, &mut cx, &ACK_RECORD);
        assert_eq!(
            io.inner.writes[3], ACK_RECORD,
            "only the first reply is held"
        );
        assert_eq!(io.holding, Holding::Off);
    }

    /// A client that writes nothing more (the server speaks first, the application only
    /// listens) still sends its ACK, once the hold is over; a shutdown sends it at once.
    #[tokio::test(start_paused = true)]
    async fn a_held_reply_leaves_on_its_own_after_the_hold_or_at_a_shutdown() {
        let waker = futures::task::waker(Arc::new(WakeCount::default()));
        let mut cx = Context::from_waker(&waker);
        let mut io = client_after_first_release(&mut cx);
        settings_arrive(&mut io, &mut cx);
        write(&mut io, &mut cx, &ACK_RECORD);
        assert!(read_is_pending(&mut io, &mut cx));

        tokio::time::advance(REPLY_HOLD - Duration::from_millis(1)).await;
        assert!(read_is_pending(&mut io, &mut cx));
        assert_eq!(io.inner.writes.len(), 1, "held until the hold is over");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(read_is_pending(&mut io, &mut cx));
        assert_eq!(io.inner.writes[1], ACK_RECORD);
        assert_eq!(io.holding, Holding::Off);

        let mut shut = client_after_first_release(&mut cx);
        settings_arrive(&mut shut, &mut cx);
        write(&mut shut, &mut cx, &ACK_RECORD);
        shut.shutdown().await.expect("shutdown");
        assert_eq!(shut.inner.writes[1], ACK_RECORD);
    }

    /// A reply larger than one bare control frame's record carries a stream's frames: it
    /// goes out at once, and nothing after it is held.
    #[tokio::test(start_paused = true)]
    async fn a_larger_reply_goes_out_at_once() {
        let waker = futures::task::waker(Arc::new(WakeCount::default()));
        let mut cx = Context::from_waker(&waker);
        let mut io = client_after_first_release(&mut cx);
        settings_arrive(&mut io, &mut cx);
        let reply = [0x17; MAX_REPLY_HELD + 1];
        write(&mut io, &mut cx, &reply);
        assert_eq!(io.inner.writes[1], reply);
        write(&mut io, &mut cx, &ACK_RECORD);
        assert_eq!(io.inner.writes[2], ACK_RECORD);
    }

    /// The server's first frames (SETTINGS, then the ACK written while it reads the
    /// client's preface) stay held through reads, flushes and the wait for its upstream;
    /// its first write once it has answered a stream takes them along, and nothing after
    /// it is held.
    #[tokio::test]
    async fn the_server_holds_its_first_frames_until_it_has_answered() {
        let waker = futures::task::waker(Arc::new(WakeCount::default()));
        let mut cx = Context::from_waker(&waker);
        let answered = Arc::new(AtomicBool::new(false));
        let mut io = HeldWrites::passing(pending_reads());
        write(&mut io, &mut cx, b"FLIGHT");
        assert_eq!(
            io.inner.writes,
            [b"FLIGHT".to_vec()],
            "the TLS flight is not held"
        );
        io.hold_until_answered(answered.clone(), HOLD);
        write(&mut io, &mut cx, b"SETTINGS");
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        io.inner.incoming = b"PREFACE".to_vec();
        assert!(!read_is_pending(&mut io, &mut cx));
        assert!(read_is_pending(&mut io, &mut cx));
        write(&mut io, &mut cx, b"ACK");
        assert!(read_is_pending(&mut io, &mut cx));
        assert!(read_is_pending(&mut io, &mut cx));
        assert_eq!(
            io.inner.writes.len(),
            1,
            "reads, flushes and waits do not release"
        );
        answered.store(true, Ordering::Relaxed);
        write(&mut io, &mut cx, b"HEADERS");
        write(&mut io, &mut cx, b"DATA");
        assert_eq!(
            io.inner.writes,
            [
                b"FLIGHT".to_vec(),
                b"SETTINGSACKHEADERS".to_vec(),
                b"DATA".to_vec()
            ]
        );
        assert_eq!(io.holding, Holding::Off);
        assert!(
            io.answered.is_none(),
            "the flag is not kept for the connection's life"
        );

        // A server that answered before it wrote anything holds nothing.
        let mut quick = HeldWrites::passing(pending_reads());
        quick.hold_until_answered(Arc::new(AtomicBool::new(true)), HOLD);
        write(&mut quick, &mut cx, b"HEADERS");
        write(&mut quick, &mut cx, b"DATA");
        assert_eq!(quick.inner.writes, [b"HEADERS".to_vec(), b"DATA".to_vec()]);
        assert_eq!(quick.holding, Holding::Off);
    }

    /// A server whose first answer does not come (an upstream that does not answer its
    /// SYN) sends its first frames once the hold is over: the read that waits arms the
    /// timer that wakes its task for it.
    #[tokio::test(start_paused = true)]
    async fn the_server_s_first_frames_leave_on_their_own_after_the_hold() {
        let wakes = Arc::new(WakeCount::default());
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = HeldWrites::passing(pending_reads());
        io.hold_until_answered(Arc::new(AtomicBool::new(false)), HOLD);
        write(&mut io, &mut cx, b"SETTINGS");
        write(&mut io, &mut cx, b"ACK");
        assert!(read_is_pending(&mut io, &mut cx));

        tokio::time::advance(HOLD - Duration::from_millis(1)).await;
        assert!(read_is_pending(&mut io, &mut cx));
        assert!(io.inner.writes.is_empty(), "held until the hold is over");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "the task is woken to send them"
        );
        assert!(read_is_pending(&mut io, &mut cx));
        assert_eq!(io.inner.writes, [b"SETTINGSACK".to_vec()]);
        write(&mut io, &mut cx, b"PING");
        assert_eq!(io.inner.writes[1], b"PING");
    }

    #[tokio::test]
    async fn a_shutdown_sends_what_is_held() {
        let mut shut = HeldWrites::holding(Recorder::default());
        shut.write_all(b"ALERT").await.expect("write");
        shut.shutdown().await.expect("shutdown");
        assert_eq!(shut.inner.writes, [b"ALERT".to_vec()]);

        let mut server = HeldWrites::passing(pending_reads());
        server.hold_until_answered(Arc::new(AtomicBool::new(false)), HOLD);
        server.write_all(b"SETTINGS").await.expect("write");
        server.shutdown().await.expect("shutdown");
        assert_eq!(server.inner.writes, [b"SETTINGS".to_vec()]);

        let mut alert = HeldWrites::holding(Recorder::default());
        alert.write_all(b"ALERT").await.expect("write");
        alert.release_without_waiting();
        assert_eq!(alert.inner.writes, [b"ALERT".to_vec()]);
    }

    /// More than a handshake's worth is not held: it goes out at once, with what is held.
    #[tokio::test]
    async fn a_large_write_goes_out_at_once() {
        let mut io = HeldWrites::holding(Recorder::default());
        io.write_all(b"HELD").await.expect("write");
        let large = vec![7u8; MAX_HELD];
        io.write_all(&large).await.expect("write");
        assert_eq!(io.inner.writes.len(), 1);
        assert_eq!(io.inner.writes[0].len(), 4 + MAX_HELD);
        assert!(io.held.is_empty());
    }

    /// A transport that takes a few bytes at a time still gets every byte once, in order.
    #[test]
    fn short_writes_lose_and_repeat_nothing() {
        let waker = futures::task::waker(Arc::new(WakeCount::default()));
        let mut cx = Context::from_waker(&waker);
        let mut io = HeldWrites::holding(Recorder {
            max_write: Some(3),
            reads_pending: true,
            ..Recorder::default()
        });
        write(&mut io, &mut cx, b"FINISHED");
        io.hold_until_release();
        write(&mut io, &mut cx, b"PREFACE");
        assert!(read_is_pending(&mut io, &mut cx));
        let mut rest: &[u8] = b"SETTINGSHEADERS";
        while !rest.is_empty() {
            match Pin::new(&mut io).poll_write(&mut cx, rest) {
                Poll::Ready(Ok(n)) => rest = &rest[n..],
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(io.inner.writes.concat(), b"FINISHEDPREFACESETTINGSHEADERS");
        assert!(io.inner.writes.iter().all(|w| w.len() <= 3));
    }

    /// Counts the writes that reach the underlying stream, each a socket write on TCP.
    struct Counted {
        inner: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
            this.writes.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write(cx, &joined(bufs))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).expect("id")
    }

    /// The agents' own TLS configurations, h2 and tokio-rustls on both ends, layered as
    /// outbound and inbound layer them: by the time the server has the first CONNECT, the
    /// client has written twice (ClientHello; its last TLS flight with the HTTP/2 preface,
    /// SETTINGS and CONNECT) and the server once (its TLS flight). The server's SETTINGS
    /// and ACK leave with its answer, in its second write. By the time the server has the
    /// stream's first bytes the client has written three times (its SETTINGS ACK with
    /// those bytes). Without the holding: four, three and four writes.
    #[tokio::test]
    async fn a_new_hbone_connection_takes_two_writes_each_way_up_to_the_first_connect() {
        crate::identity::install_crypto_provider();
        let ca = LocalCa::generate().expect("CA");
        let now = SystemTime::now() - Duration::from_secs(60);
        let issue = |sa: &str| {
            ca.issue_with_validity(&id(sa), now, now + Duration::from_secs(600))
                .expect("certificate")
        };
        let anchors = TrustAnchors::new(&ca.trust_bundle()).expect("anchors");
        let client_config =
            client_config_for(&issue("client"), &anchors, &id("server")).expect("client");
        let server_config =
            server_config_for(&issue("server"), &anchors, "cluster.local").expect("server");

        let (a, b) = tokio::io::duplex(64 * 1024);
        let client_writes = Arc::new(AtomicUsize::new(0));
        let server_writes = Arc::new(AtomicUsize::new(0));
        let client_io = Counted {
            inner: a,
            writes: client_writes.clone(),
        };
        let server_io = Counted {
            inner: b,
            writes: server_writes.clone(),
        };

        let client_writes_seen = client_writes.clone();
        let server = tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
            let mut tls = acceptor
                .accept(HeldWrites::passing(server_io))
                .await
                .expect("server TLS");
            let answered = Arc::new(AtomicBool::new(false));
            tls.get_mut().0.hold_until_answered(answered.clone(), HOLD);
            let mut connection = h2::server::handshake(tls).await.expect("server h2");
            let (request, mut respond) = connection
                .accept()
                .await
                .expect("a stream")
                .expect("a request");
            assert_eq!(request.method(), http::Method::CONNECT);
            // This test's runtime has one thread: the client has not run since its CONNECT.
            let writes_at_accept = (
                client_writes_seen.load(Ordering::Relaxed),
                server_writes.load(Ordering::Relaxed),
            );
            // As in the agent, the connection's task goes on accepting (and waits for the
            // client) while another task, here this one once it runs again, answers.
            let drive = tokio::spawn(async move {
                while let Some(stream) = connection.accept().await {
                    drop(stream);
                }
            });
            tokio::task::yield_now().await;
            let response = http::Response::new(());
            let mut send = respond.send_response(response, false).expect("200");
            send.send_data(Bytes::from_static(b"pong"), true)
                .expect("data");
            answered.store(true, Ordering::Relaxed);
            let mut body = request.into_body();
            let ping = body.data().await.expect("data").expect("bytes");
            let writes_at_data = (
                client_writes_seen.load(Ordering::Relaxed),
                server_writes.load(Ordering::Relaxed),
            );
            drive.abort();
            (writes_at_accept, ping, writes_at_data)
        });

        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_config))
            .connect(name, HeldWrites::holding(client_io))
            .await
            .expect("client TLS");
        tls.get_mut().0.hold_until_release();
        let (mut send_request, connection) = h2::client::handshake(tls).await.expect("client h2");
        let driver = tokio::spawn(connection);
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:8080")
            .body(())
            .expect("request");
        let (response, mut send) = send_request.send_request(request, false).expect("CONNECT");
        let response = response.await.expect("response");
        assert_eq!(response.status(), http::StatusCode::OK);
        send.send_data(Bytes::from_static(b"ping"), true)
            .expect("data");
        let mut body = response.into_body();
        let pong = body.data().await.expect("data").expect("bytes");
        assert_eq!(&pong[..], b"pong", "bytes flow both ways after the holding");

        let (writes_at_accept, ping, writes_at_data) = server.await.expect("server task");
        assert_eq!(&ping[..], b"ping");
        assert_eq!(
            writes_at_accept,
            (2, 1),
            "(client, server) writes when the server has the first CONNECT"
        );
        assert_eq!(
            writes_at_data,
            (3, 2),
            "(client, server) writes when the server has the stream's first bytes: the \
             server's SETTINGS and ACK left with its answer, the client's ACK with its bytes"
        );
        driver.abort();
    }
}
