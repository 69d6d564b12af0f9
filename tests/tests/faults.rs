//! Privileged: faults of the agent itself. A connection the agent cannot finish ends in a
//! reset on both sides, also when the agent process dies: a truncated transfer must never
//! look complete to either application.

use std::sync::mpsc;
use std::time::Duration;

use ambit_e2e::faults::{Ending, StreamServer, download};
use ambit_e2e::testbed::{MESH_NS, PodSpec, Testbed};

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
