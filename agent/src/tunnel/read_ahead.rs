//! Reads an HBONE connection's socket in large chunks for the TLS stream above it.
//!
//! rustls asks its transport for at most 4 KiB at a time (its deframer grows its buffer by
//! that much per read), so a bulk transfer arriving as 16 KiB records took one `recvfrom`
//! per 13 KiB on average (bench, receiving agent: 82,000 per GiB). Below it, this reads up
//! to [`READ_AHEAD`] per syscall and hands rustls what it asks for from memory (21,000
//! reads of 49 KiB per GiB).
//!
//! tokio's `BufReader` does the same with a buffer it keeps for the stream's whole life;
//! thousands of idle HBONE connections would each pin one. Here reads go straight to the
//! caller until one fills the caller's buffer (more is likely queued); from then on the
//! socket is read into a buffer of [`READ_AHEAD`] until a read finds the socket empty. The
//! buffer exists only while it holds bytes, so handshakes, small messages and idle
//! connections never allocate one, and a burst of new connections does not leave the heap
//! grown by one per connection (the first version, always reading ahead, added 124 bytes
//! per idle proxied connection in the bench).

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket at most per syscall; a TCP receive queue in bulk holds
/// several records, and 64 KiB keeps the transient buffer small.
const READ_AHEAD: usize = 64 * 1024;

pub(super) struct ReadAhead<T> {
    inner: T,
    /// Read from `inner`, not yet handed up. Unallocated while empty.
    ahead: BytesMut,
    /// A read filled the caller's buffer and none has found the socket empty since.
    reading_ahead: bool,
}

impl<T> ReadAhead<T> {
    pub(super) fn new(inner: T) -> Self {
        Self {
            inner,
            ahead: BytesMut::new(),
            reading_ahead: false,
        }
    }

    /// Hands up what is read ahead; frees the buffer once it is drained.
    fn hand_up(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.ahead.len().min(buf.remaining());
        buf.put_slice(&self.ahead[..n]);
        self.ahead.advance(n);
        if self.ahead.is_empty() {
            self.ahead = BytesMut::new();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            this.hand_up(buf);
            return Poll::Ready(Ok(()));
        }
        if !this.reading_ahead || buf.remaining() >= READ_AHEAD {
            let room = buf.remaining();
            let before = buf.filled().len();
            let read = Pin::new(&mut this.inner).poll_read(cx, buf);
            if matches!(read, Poll::Ready(Ok(())))
                && room > 0
                && buf.filled().len() - before == room
            {
                this.reading_ahead = true;
            }
            return read;
        }
        this.ahead.reserve(READ_AHEAD);
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.ahead);
        match read {
            Poll::Ready(Ok(n)) if n > 0 => {
                this.hand_up(buf);
                Poll::Ready(Ok(()))
            }
            // The end of the stream (zero bytes, handed up as such), an error or an empty
            // socket: the bulk is over, and no buffer is kept.
            other => {
                this.ahead = BytesMut::new();
                this.reading_ahead = false;
                other.map_ok(drop)
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Counts the reads that reach the transport.
    struct CountingReads<T> {
        inner: T,
        reads: Arc<AtomicUsize>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for CountingReads<T> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            this.reads.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut this.inner).poll_read(cx, buf)
        }
    }

    /// 48 KiB waiting in the transport reach a reader that takes 4 KiB at a time (as
    /// rustls does): the first read fills the reader's buffer, the rest come from one more
    /// read of the transport, byte for byte; the buffer is gone once drained, and the end
    /// of the stream still reads as zero bytes.
    #[tokio::test]
    async fn small_reads_in_bulk_are_served_from_one_large_read_of_the_transport() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let sent: Vec<u8> = (0..48 * 1024).map(|i| (i % 251) as u8).collect();
        far.write_all(&sent).await.expect("write");
        drop(far);
        let reads = Arc::new(AtomicUsize::new(0));
        let mut io = ReadAhead::new(CountingReads {
            inner: near,
            reads: reads.clone(),
        });

        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < sent.len() {
            let n = io.read(&mut chunk).await.expect("read");
            assert!(n > 0, "data ended early at {}", got.len());
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, sent);
        assert_eq!(
            reads.load(Ordering::Relaxed),
            2,
            "transport reads for 48 KiB"
        );
        assert_eq!(io.ahead.capacity(), 0, "buffer kept after it was drained");
        assert_eq!(io.read(&mut chunk).await.expect("read at the end"), 0);
        assert!(!io.reading_ahead);
    }

    /// Reads that do not fill the caller's buffer (handshakes, small messages) and reads
    /// that find nothing never allocate: an idle connection holds no buffer. A reader with
    /// room for a whole chunk reads the transport directly.
    #[tokio::test]
    async fn small_messages_and_idle_streams_hold_no_buffer() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let mut io = ReadAhead::new(near);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut small = [0u8; 4096];
        let mut buf = ReadBuf::new(&mut small);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut buf).is_pending());
        assert_eq!(io.ahead.capacity(), 0);

        far.write_all(&[7u8; 1000]).await.expect("write");
        assert_eq!(io.read(&mut small).await.expect("read"), 1000);
        assert!(!io.reading_ahead, "a short read starts no read-ahead");

        // Filling the buffer starts reading ahead; a read finding nothing ends it.
        far.write_all(&[8u8; 4096 + 100]).await.expect("write");
        assert_eq!(io.read(&mut small).await.expect("read"), 4096);
        assert!(io.reading_ahead);
        assert_eq!(io.read(&mut small).await.expect("read"), 100);
        assert_eq!(io.ahead.capacity(), 0);
        let mut buf = ReadBuf::new(&mut small);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut buf).is_pending());
        assert!(!io.reading_ahead);
        assert_eq!(io.ahead.capacity(), 0);

        far.write_all(&[9u8; 100]).await.expect("write");
        let mut large = vec![0u8; READ_AHEAD];
        let n = io.read(&mut large).await.expect("read");
        assert_eq!(&large[..n], &[9u8; 100][..]);
        assert_eq!(io.ahead.capacity(), 0);
    }

    /// Writes go to the transport untouched, vectored ones included.
    #[tokio::test]
    async fn writes_pass_through() {
        let (mut far, near) = tokio::io::duplex(1024);
        let mut io = ReadAhead::new(near);
        io.write_all(b"one ").await.expect("write");
        let parts = [IoSlice::new(b"two "), IoSlice::new(b"three")];
        let n = io.write_vectored(&parts).await.expect("write");
        assert!(n > 0);
        io.shutdown().await.expect("shutdown");
        let mut got = String::new();
        far.read_to_string(&mut got).await.expect("read");
        assert!(got.starts_with("one two "), "{got}");
    }
}
