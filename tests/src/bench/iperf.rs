//! Bulk throughput with iperf3 (Debian's), server and client each inside a pod's network
//! namespace through `nsenter --net=<netns path>`.

use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// `iperf3 -s` inside a pod, killed on drop.
pub struct IperfServer {
    child: Child,
}

impl IperfServer {
    pub fn start(netns: &Path, port: u16) -> anyhow::Result<Self> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["iperf3", "-s", "--forceflush", "-p", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (cargo xtask setup installs it)")?;
        let stdout = child.stdout.take().context("iperf3 stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        // "Server listening on <port>" once the socket is bound.
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening") => break,
                Some(Ok(_)) => {}
                _ => bail!("iperf3 -s exited before listening"),
            }
        }
        // Keep draining so iperf3 never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child })
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One client run's result, as the receiver counted it.
#[derive(Clone, Copy, Debug)]
pub struct Bulk {
    pub bits_per_second: f64,
    pub bytes: f64,
}

/// `iperf3 -c` from inside a pod: `streams` parallel streams for `secs` seconds. iperf3's
/// server runs one test at a time and frees itself only after it has seen the previous
/// client's control connection close, which through the mesh (and on a loaded machine) can
/// come after the next client asks: "the server is busy" is retried a few times.
pub fn run_client(
    netns: &Path,
    server: Ipv4Addr,
    port: u16,
    secs: u64,
    streams: u32,
) -> anyhow::Result<Bulk> {
    const BUSY_RETRIES: u32 = 10;
    let mut attempt = 0;
    let json = loop {
        let json = client_once(netns, server, port, secs, streams)?;
        match json.get("error") {
            None => break json,
            Some(error)
                if attempt < BUSY_RETRIES
                    && error.as_str().is_some_and(|e| e.contains("server is busy")) =>
            {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            Some(error) => bail!("iperf3 -c failed: {error}"),
        }
    };
    let received = &json["end"]["sum_received"];
    let bits_per_second = received["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's JSON")?;
    let bytes = received["bytes"]
        .as_f64()
        .context("no end.sum_received.bytes in iperf3's JSON")?;
    Ok(Bulk {
        bits_per_second,
        bytes,
    })
}

fn client_once(
    netns: &Path,
    server: Ipv4Addr,
    port: u16,
    secs: u64,
    streams: u32,
) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["iperf3", "-J", "-c", &server.to_string(), "-p"])
        .arg(port.to_string())
        .args(["-t", &secs.to_string(), "-P", &streams.to_string()])
        .output()
        .context("running iperf3 -c")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 -c printed no JSON ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
