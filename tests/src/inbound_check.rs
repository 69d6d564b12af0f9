//! The receiving side's testbed: a "client" netns wired to a "pod" netns, an app listening
//! on pod-ip:9000, and the test playing the agent: it holds the in-pod listeners on 15006
//! and 15008 and registers them with [`Capture::attach_inbound`].

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambit_agent::capture::{Capture, CaptureConfig};
use ambit_agent::netns::NetNs;
use ambit_common::{AGENT_MARK, HBONE_PORT, INBOUND_PLAINTEXT_PORT};
use anyhow::Context as _;
use socket2::{Domain, Socket, Type};

use crate::{Netns, PinDir, wire};

pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
pub const APP_PORT: u16 = 9000;

pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The agent's in-pod inbound listeners.
pub struct AgentListeners {
    pub hbone: TcpListener,
    pub plaintext: TcpListener,
}

pub struct InboundBed {
    pub pins: PinDir,
    pub capture: Option<Capture>,
    pub pod_cookie: u64,
    pub pod_ns: NetNs,
    pub client_ns: NetNs,
    /// The pod's end of the veth.
    pub pod_if: String,
    pub agent: Option<AgentListeners>,
    /// The app: listens on pod-ip:9000, non-blocking.
    pub app: TcpListener,
    // Declared last: the namespaces go after everything that lives in them.
    _client: Netns,
    pod: Option<Netns>,
}

impl InboundBed {
    /// Namespaces, the app's listener, and the capture programs attached with a unique pin
    /// directory. The pod is not steered until [`InboundBed::start_agent`].
    pub fn new() -> anyhow::Result<Self> {
        Self::with_excluded_ports(&[])
    }

    /// Like [`InboundBed::new`], with these destination ports never captured.
    pub fn with_excluded_ports(excluded_ports: &[u16]) -> anyhow::Result<Self> {
        let pod = Netns::create("ipod")?;
        let client = Netns::create("icli")?;
        let (pod_if, _) = wire(
            &pod,
            &format!("{POD_IP}/24"),
            &client,
            &format!("{CLIENT_IP}/24"),
        )?;
        let pod_ns = pod.open()?;
        let client_ns = client.open()?;
        let pod_cookie = pod_ns.cookie()?;
        let app = pod_ns.run(|| {
            let l = TcpListener::bind((POD_IP, APP_PORT))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let pins = PinDir::unique();
        let capture = attach(&pins, excluded_ports)?;
        Ok(Self {
            pins,
            capture: Some(capture),
            pod_cookie,
            pod_ns,
            client_ns,
            pod_if,
            agent: None,
            app,
            _client: client,
            pod: Some(pod),
        })
    }

    /// The pod's netns by name (for `ip -n`); `None` once [`InboundBed::delete_pod_netns`] ran.
    pub fn pod_netns(&self) -> Option<&Netns> {
        self.pod.as_ref()
    }

    /// Deletes the pod's named netns, as when the pod is deleted (the handles the bed and
    /// the "agent" hold keep the namespace itself alive, as the agent's threads would).
    pub fn delete_pod_netns(&mut self) {
        self.pod.take();
    }

    pub fn app_addr(&self) -> SocketAddr {
        SocketAddr::from((POD_IP, APP_PORT))
    }

    pub fn capture(&mut self) -> anyhow::Result<&mut Capture> {
        self.capture.as_mut().context("agent is not running")
    }

    /// Opens the agent's listeners in the pod (0.0.0.0:15006, 0.0.0.0:15008) and attaches
    /// inbound capture for the pod.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let listeners = self.pod_ns.run(|| {
            let open = |port: u16| -> std::io::Result<TcpListener> {
                let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            };
            Ok(AgentListeners {
                hbone: open(HBONE_PORT)?,
                plaintext: open(INBOUND_PLAINTEXT_PORT)?,
            })
        })?;
        let cookie = self.pod_cookie;
        let capture = self.capture.as_mut().context("agent is not running")?;
        capture.attach_inbound(
            &self.pod_ns,
            cookie,
            &[POD_IP],
            &listeners.hbone,
            &listeners.plaintext,
        )?;
        self.agent = Some(listeners);
        Ok(())
    }

    /// Where the pod's link `name` is pinned (`sk_lookup`; `tc_egress`: on the pod's
    /// interface; `tc_lo_egress`: on lo).
    pub fn link_pin(&self, name: &str) -> PathBuf {
        self.pins
            .path()
            .join(format!("pods/{}/{name}", self.pod_cookie))
    }

    /// The ids of the programs attached to `ifname`'s TCX egress hook in the pod's netns,
    /// as the kernel reports them (whatever holds or pins their links).
    pub fn tcx_egress_programs(&self, ifname: &str) -> anyhow::Result<Vec<u32>> {
        let ns = self.pod_netns().context("pod netns")?;
        let ifname = ifname.to_owned();
        let programs = ns.open()?.run(move || {
            aya::programs::SchedClassifier::query_tcx(
                &ifname,
                aya::programs::tc::TcAttachType::Egress,
            )
            .map(|(_, programs)| programs.iter().map(|p| p.id()).collect::<Vec<_>>())
            .map_err(std::io::Error::other)
        })?;
        Ok(programs)
    }

    /// Plays an agent crash: listeners and map handles vanish, the pins stay.
    pub fn crash_agent(&mut self) {
        if let Some(AgentListeners { hbone, plaintext }) = self.agent.take() {
            crate::close_listener_everywhere(hbone);
            crate::close_listener_everywhere(plaintext);
        }
        self.capture = None;
    }

    /// Plays an agent restart: reattach (reusing pins), reopen and re-register listeners.
    pub fn restart_agent(&mut self) -> anyhow::Result<()> {
        self.capture = Some(attach(&self.pins, &[])?);
        self.start_agent()
    }

    pub fn detach_inbound(&mut self) -> anyhow::Result<()> {
        let cookie = self.pod_cookie;
        Ok(self.capture()?.detach_inbound(cookie)?)
    }

    pub fn preserve_source(&mut self) -> anyhow::Result<()> {
        let capture = self.capture.as_mut().context("agent is not running")?;
        Ok(capture.preserve_source(&self.pod_ns, &self.pod_if)?)
    }

    /// connect() from the client netns.
    pub fn connect_from_client(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        connect_in(&self.client_ns, dst)
    }

    /// connect() from inside the pod (e.g. to its own address: over lo).
    pub fn connect_in_pod(&self, dst: SocketAddr) -> std::io::Result<TcpStream> {
        connect_in(&self.pod_ns, dst)
    }

    /// What the agent does for a plaintext inbound connection with source preservation:
    /// inside the pod, a socket with IP_TRANSPARENT and the agent's mark, bound to the
    /// client's IP (port 0: the steered socket already owns the exact client 4-tuple
    /// toward the original destination), connected to the original destination.
    /// Without `client_ip`, a plain agent socket (marked, source chosen by the kernel).
    pub fn dial_app_as(
        &self,
        client_ip: Option<IpAddr>,
        dst: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        self.pod_ns.run(move || {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            ambit_agent::sys::set_mark(&socket, AGENT_MARK)?;
            if let Some(ip) = client_ip {
                ambit_agent::sys::set_ip_transparent(&socket)?;
                socket.bind(&SocketAddr::new(ip, 0).into())?;
            }
            socket.connect_timeout(&dst.into(), IO_TIMEOUT)?;
            Ok(TcpStream::from(socket))
        })
    }
}

fn attach(pins: &PinDir, excluded_ports: &[u16]) -> anyhow::Result<Capture> {
    Capture::attach(&CaptureConfig {
        pin_dir: pins.path().to_path_buf(),
        excluded_ports: excluded_ports.to_vec(),
        ..CaptureConfig::default()
    })
    .context("attach capture programs")
}

fn connect_in(ns: &NetNs, dst: SocketAddr) -> std::io::Result<TcpStream> {
    ns.run(move || {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.connect_timeout(&dst.into(), IO_TIMEOUT)?;
        let stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    })
}

/// The next connection queued on a non-blocking `listener`, waiting up to `wait`.
/// The kernel completes the handshake before connect() returns, so a short wait covers
/// scheduling only.
pub fn accept_within(
    listener: &TcpListener,
    wait: Duration,
) -> anyhow::Result<Option<(TcpStream, SocketAddr)>> {
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                return Ok(Some((stream, peer)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// What source preservation leaves in a netns, read the way an operator would: `ip rule`,
/// `ip route` and lo's IPv4 sysctls.
#[derive(Debug, PartialEq, Eq)]
pub struct ReplyRouting {
    /// `ip rule` lines that send the reply mark to table 133.
    pub rules: Vec<String>,
    /// The routes of table 133, as `ip route show table all` prints them.
    pub routes: Vec<String>,
    /// Every file of /proc/sys/net/ipv4/conf/lo, by name.
    pub lo_sysctls: std::collections::BTreeMap<String, String>,
}

impl ReplyRouting {
    pub fn of(ns: &Netns) -> anyhow::Result<Self> {
        let mark = format!("fwmark {:#x} lookup 133", ambit_common::REPLY_MARK);
        let rules = crate::ip_output(&["-n", ns.name(), "rule", "show"])?
            .lines()
            .filter(|l| l.contains(&mark))
            .map(str::to_owned)
            .collect();
        // `show table 133` fails while the table does not exist: filter the whole dump.
        let routes = crate::ip_output(&["-n", ns.name(), "route", "show", "table", "all"])?
            .lines()
            .filter(|l| l.contains(" table 133 "))
            .map(|l| l.trim().to_owned())
            .collect();
        let lo_sysctls = ns.open()?.run(|| {
            let mut values = std::collections::BTreeMap::new();
            for entry in std::fs::read_dir("/proc/sys/net/ipv4/conf/lo")? {
                let entry = entry?;
                let value = std::fs::read_to_string(entry.path())?;
                values.insert(
                    entry.file_name().to_string_lossy().into_owned(),
                    value.trim().to_owned(),
                );
            }
            Ok(values)
        })?;
        Ok(Self {
            rules,
            routes,
            lo_sysctls,
        })
    }

    pub fn accept_local(&self) -> &str {
        self.lo_sysctls
            .get("accept_local")
            .map_or("<missing>", String::as_str)
    }

    /// Exactly the agent's rule and route are there.
    pub fn assert_set_up(&self) {
        assert_eq!(self.rules.len(), 1, "one reply rule: {:?}", self.rules);
        assert!(
            self.rules[0].starts_with("32765:"),
            "the rule's fixed priority: {:?}",
            self.rules
        );
        assert_eq!(
            self.routes,
            vec!["local default dev lo table 133 scope host".to_owned()],
            "the local route in table 133"
        );
        assert_eq!(self.accept_local(), "1", "lo accept_local");
    }
}
