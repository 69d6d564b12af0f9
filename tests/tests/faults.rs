//! Privileged: faults of the agent itself. A connection the agent cannot finish ends in a
//! reset on both sides, also when the agent process dies: a truncated transfer must never
//! look complete to either application.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use ambit_e2e::faults::{Ending, StreamServer, download};
use ambit_e2e::refusal;
use ambit_e2e::testbed::{MESH_NS, PLAIN_NS, PodSpec, Testbed};

const STREAM_PORT: u16 = 9000;
const TRANSFERS: usize = 4;

#[test]
fn killed_client_agent_resets_every_open_transfer_on_both_ends() -> anyhow::Result<()> {
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("server-b", MESH_NS, 1),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    bed.start_agents()?;
    let server = StreamServer::start(bed.pod("server-b"), STREAM_PORT)?;
    let target = bed.pod("server-b").addr(STREAM_PORT);

    // Transfers flowing end to end through both agents.
    let (started_tx, started_rx) = mpsc::channel();
    let mut clients = Vec::new();
    for _ in 0..TRANSFERS {
        let stream = bed.pod("client").connect(target)?;
        let started = started_tx.clone();
        clients.push(std::thread::spawn(move || {
            download(stream, 256 * 1024, started)
        }));
    }
    for i in 0..TRANSFERS {
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow::anyhow!("only {i} of {TRANSFERS} transfers got going"))?;
    }
    assert_eq!(
        server.accepted(),
        TRANSFERS,
        "every transfer is its own connection"
    );

    bed.kill_agent(0);

    for client in clients {
        let (received, ending) = client
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        assert_eq!(
            ending,
            Ending::Reset,
            "the client app must see its transfer torn (ECONNRESET), not ended, after {received} bytes"
        );
    }
    let endings = server.wait_endings(TRANSFERS, Duration::from_secs(15));
    assert_eq!(
        endings.len(),
        TRANSFERS,
        "every server connection ended: {endings:?}"
    );
    for (peer, ending) in &endings {
        assert_eq!(
            *ending,
            Ending::Reset,
            "the server app's connection from {peer} must be reset too"
        );
    }
    Ok(())
}

/// A server in a pod that counts the connections it accepts, records their peers and
/// echoes one line on each.
struct CountingEcho {
    accepted: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl CountingEcho {
    fn start(pod: &ambit_e2e::testbed::Pod, port: u16) -> anyhow::Result<Self> {
        let ip = pod.ip;
        let listener = pod.ns.open()?.run(move || TcpListener::bind((ip, port)))?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), peers.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                if let (Ok(peer), Ok(mut list)) = (stream.peer_addr(), seen.lock()) {
                    list.push(peer);
                }
                std::thread::spawn(move || {
                    let mut buf = [0u8; 256];
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    if let Ok(n) = stream.read(&mut buf) {
                        let _ = stream.write_all(&buf[..n]);
                    }
                });
            }
        });
        Ok(Self { accepted, peers })
    }
}

/// Issue #13 item 5, inbound: a pod that cannot be enrolled (another socket holds the
/// agent's plaintext port :15006 in it) is kept closed. Connections to its app are refused
/// with a reset, from a pod outside the mesh (the SYN is answered with RST:
/// ECONNREFUSED) and from a meshed pod (its agent's HBONE dial is refused, so the client
/// sees ECONNRESET), and the app accepts none of them. Once the port is free, the retry
/// enrolls the pod and the same connection goes through the mesh.
#[test]
fn a_pod_that_cannot_be_enrolled_refuses_inbound_until_a_retry_enrolls_it() -> anyhow::Result<()> {
    const ECHO_PORT: u16 = 9100;
    const PLAINTEXT_PORT: u16 = 15006;
    let pods = [
        PodSpec::new("client", MESH_NS, 0),
        PodSpec::new("legacy", PLAIN_NS, 0),
        PodSpec::new("server", MESH_NS, 1),
    ];
    let mut bed = Testbed::build(2, &pods, Vec::new())?;
    // The cause: a squatter on the server pod's :15006, so the agent's listener cannot bind.
    let squatter = bed
        .pod("server")
        .ns
        .open()?
        .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PLAINTEXT_PORT)))?;
    let app = CountingEcho::start(bed.pod("server"), ECHO_PORT)?;
    bed.start_agents()?;
    let wait = Duration::from_secs(20);
    bed.agent(1)
        .wait_for_log(&["could not enroll pod", "mesh/server", "15006"], wait)?;
    bed.agent(1).wait_for_log(&["inbound held closed"], wait)?;
    let target = bed.pod("server").addr(ECHO_PORT);

    // From outside the mesh: the SYN is refused.
    let refused = bed
        .pod("legacy")
        .connect(target)
        .expect_err("a held-closed pod must refuse the connection");
    let io = refused
        .downcast_ref::<std::io::Error>()
        .unwrap_or_else(|| panic!("expected an I/O error, got {refused:#}"));
    assert_eq!(
        io.kind(),
        ErrorKind::ConnectionRefused,
        "a plain pod's connection must be refused (ECONNREFUSED), got {io}"
    );

    // From a meshed pod: its agent accepts, cannot open the tunnel, and resets the client.
    // The agent gives up on its own, so the reset can land in connect, write or read.
    let refused = refusal::exchange(
        bed.pod("client"),
        target,
        b"hello\n",
        Duration::from_secs(5),
    )?;
    refusal::assert_reset(&refused, "a meshed pod's connection to a pod held closed");
    assert_eq!(
        app.accepted.load(Ordering::SeqCst),
        0,
        "the app of a pod held closed must accept nothing"
    );
    assert!(
        !bed.agent(1)
            .logs()
            .iter()
            .any(|l| l.contains("pod enrolled") && l.contains("mesh/server")),
        "the server pod must not be enrolled while its port is taken"
    );

    // The cause goes away: the retry (with back-off) enrolls the pod.
    ambit_e2e::close_listener_everywhere(squatter);
    bed.agent(1)
        .wait_for_log(&["pod enrolled", "mesh/server"], Duration::from_secs(45))?;
    let mut stream = bed.pod("client").connect(target)?;
    stream.write_all(b"through the mesh\n")?;
    let mut reply = [0u8; 64];
    let n = stream.read(&mut reply)?;
    assert_eq!(&reply[..n], b"through the mesh\n");
    assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
    let client_ip = bed.pod("client").ip;
    assert_eq!(
        app.peers
            .lock()
            .map(|p| p.iter().map(|a| a.ip()).collect::<Vec<_>>())
            .unwrap_or_default(),
        vec![std::net::IpAddr::V4(client_ip)],
        "the app sees the client's own address"
    );
    drop(stream);
    // Through the mesh: the server's agent terminated the client's HBONE tunnel.
    bed.agent(1).wait_for_log(
        &[
            "inbound connection closed",
            "spiffe://cluster.local/ns/mesh/sa/client",
        ],
        wait,
    )?;
    Ok(())
}
