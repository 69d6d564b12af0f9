//! HTTP/2 PING keepalive on HBONE connections, both sides.
//!
//! A peer that vanishes (its node powered off, a partition, a route withdrawn) sends no FIN
//! and no reset. With nothing to send, TCP never notices; with data queued it retransmits
//! for many minutes. Meanwhile the streams on the connection, and the clients and workloads
//! behind them, hang, and a pooled connection keeps taking new streams that go nowhere.
//! A PING every `interval` that must be answered within `timeout` bounds that to
//! `interval + timeout` (ztunnel's 10 s and 20 s by default). h2 answers the peer's PINGs
//! itself; it only sends ours when asked, hence this.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

/// When to ping and how long an answer may take.
#[derive(Clone, Debug)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
    /// Counts connections closed because their peer went silent.
    pub timeouts: Counter,
}

impl Keepalive {
    /// Resolves only if the peer leaves a PING unanswered for `timeout`; the caller then
    /// drops the connection. Stays pending when h2 gave no ping handle or refuses the PING
    /// (the connection is closing; its own future reports how it ended).
    ///
    /// Poll it together with the connection, and no longer once the connection ended:
    /// PINGs and their answers travel through the connection's future.
    pub async fn expire(&self, ping_pong: Option<h2::PingPong>) -> Duration {
        let Some(mut ping_pong) = ping_pong else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(self.interval).await;
            match tokio::time::timeout(self.timeout, ping_pong.ping(h2::Ping::opaque())).await {
                Ok(Ok(_pong)) => {}
                Ok(Err(_closed)) => return std::future::pending().await,
                Err(_elapsed) => {
                    self.timeouts.inc();
                    return self.timeout;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use bytes::Bytes;

    use super::*;

    fn keepalive() -> Keepalive {
        Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
            timeouts: Counter::default(),
        }
    }

    /// An HTTP/2 client and server over an in-memory pipe (no kernel I/O, so the paused
    /// clock only advances when both sides wait on a timer).
    async fn connected() -> (
        h2::client::Connection<tokio::io::DuplexStream, Bytes>,
        h2::server::Connection<tokio::io::DuplexStream, Bytes>,
        h2::client::SendRequest<Bytes>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let (client, server) = tokio::join!(
            h2::client::handshake(client_io),
            h2::server::handshake(server_io)
        );
        let (send, client) = client.expect("client handshake");
        (client, server.expect("server handshake"), send)
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_keeps_the_connection() {
        let (mut client, mut server, _send) = connected().await;
        let keepalive = keepalive();
        let ping_pong = client.ping_pong();
        // The server answers PINGs while it is polled.
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let mut expire = pin!(keepalive.expire(ping_pong));
        let started = tokio::time::Instant::now();
        tokio::select! {
            ended = &mut client => panic!("the connection ended: {ended:?}"),
            silent = &mut expire => panic!("an answering peer was timed out after {silent:?}"),
            () = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
        assert_eq!(started.elapsed(), Duration::from_secs(600));
        assert_eq!(keepalive.timeouts.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_detected_after_interval_plus_timeout() {
        let (mut client, server, _send) = connected().await;
        let keepalive = keepalive();
        let ping_pong = client.ping_pong();
        // Held, never polled again: the PING is delivered and never answered, like a peer
        // whose node is gone.
        let _silent_server = server;
        let started = tokio::time::Instant::now();
        let silent = tokio::select! {
            ended = &mut client => panic!("the connection ended by itself: {ended:?}"),
            silent = keepalive.expire(ping_pong) => silent,
        };
        assert_eq!(silent, Duration::from_secs(20));
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(keepalive.timeouts.get(), 1);
    }
}
