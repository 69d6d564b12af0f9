//! Capture: loading ambit's eBPF programs, attaching them, and turning "pod X is enrolled"
//! into map entries. Public surface: [`Capture`] and [`CaptureConfig`].
//!
//! Programs, links and maps are pinned under one bpffs directory so that they outlive the
//! agent: while the agent is down, enrolled pods keep being redirected to listeners that no
//! longer exist, and their connections fail instead of leaking out in plaintext (fail
//! closed). A restarted (or upgraded) agent finds the pins, keeps the links and switches
//! each to the program it loaded, in place; it reuses the pinned maps whose definition is
//! unchanged (`upgrade.rs`).

mod cgroup;
mod inbound;
mod rtnl;
mod upgrade;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use ambit_common::{
    ENROLL_OUTBOUND, EnrolledPod, FAMILY_V4, FAMILY_V6, FlowKey, ListenerKey, OrigDst, SOCKMAP_ON,
    SockKey, SockmapStat, globals, maps, programs,
};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink, LinkError, PinnedLink};
use aya::programs::{CgroupSockAddr, ProgramError, SchedClassifier, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};

pub use cgroup::cgroup2_root;
pub use upgrade::{LinkOutcome, MapDefinition, PinnedLinkProgram, pinned_link_programs};

/// Default bpffs directory for ambit's pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ambit";

/// The eBPF object built from `ebpf/` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup v2 mount found in /proc/mounts; ambit needs cgroup v2")]
    NoCgroup2,
    #[error("open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("load eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("link of program {name}: {source}")]
    Link {
        name: &'static str,
        source: LinkError,
    },
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("parse the embedded eBPF object: {0}")]
    Object(String),
    #[error(
        "pinned map {name} at {pin} does not match this agent's definition ({differences}); it \
         carries enrollment across restarts, so it is not recreated: pods stay held by the \
         earlier programs. Migrate it, or run `ambit uninstall` (pods lose capture) and start again"
    )]
    MapDefinitionChanged {
        name: &'static str,
        pin: PathBuf,
        differences: String,
    },
    #[error("switch the program of the link pinned at {pin}: {source}")]
    LinkUpdate {
        pin: PathBuf,
        source: std::io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("remove pins under {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("inside pod netns {path}: {source}")]
    PodNetns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("netlink in netns {netns}: {request}: {source}")]
    Netlink {
        netns: PathBuf,
        request: String,
        source: std::io::Error,
    },
}

/// bpf_link attachments to a cgroup coexist with any other program by construction and the
/// kernel rejects explicit flags for them (EINVAL), so "Single" (no flags) is the right mode.
const LINK_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

type Result<T, E = CaptureError> = std::result::Result<T, E>;

/// Every map of the object is pinned: the per-pod program instances loaded later (see
/// `inbound.rs`) must share them with the cgroup programs.
const PINNED_MAPS: [&str; 12] = [
    maps::AYA_LOGS,
    maps::ENROLLED,
    maps::PENDING,
    maps::ORIG_DST,
    maps::EXCLUDED_PORTS,
    maps::PEER_ORIG_DST,
    maps::INBOUND_LISTENERS,
    maps::LOCAL_LEGS,
    maps::AGENT_UPSTREAMS,
    maps::TCP_LEGS,
    maps::SOCKMAP_SWITCH,
    maps::SOCKMAP_STATS,
];

/// The programs attached once at the cgroup v2 root (as opposed to per pod).
const CGROUP_PROGRAMS: [&str; 5] = [
    programs::CONNECT4,
    programs::SOCK_OPS,
    programs::GETPEERNAME4,
    programs::CONNECT6,
    programs::GETPEERNAME6,
];

/// The tc programs attached per pod (see `inbound.rs`), loaded once by [`Capture::attach`].
const TC_PROGRAMS: [&str; 2] = [programs::TC_AGENT_LO, programs::TC_REPLY_TO_LO];

/// Size of aya-log's ring, instead of the 128 KiB aya-log-ebpf declares. The programs log
/// warnings only unless asked for debug records, and the agent reads the ring as records
/// arrive; a ring buffer's data pages are mapped twice into its reader, so 128 KiB held
/// 256 KiB of every agent's resident memory. 32 KiB still holds a few hundred records
/// between two reads. A power-of-two number of pages, which the kernel requires.
const EBPF_LOG_RING_BYTES: u32 = 32 * 1024;

/// The maps this agent creates with another size than the object declares.
pub(crate) fn max_entries_override(map: &str) -> Option<u32> {
    (map == maps::AYA_LOGS).then_some(EBPF_LOG_RING_BYTES)
}

/// A loader that reuses (or creates) the pinned maps under `maps_dir` (aya-log's ring
/// included, so one reader serves every loaded instance and survives agent restarts) and
/// sets the programs' log level.
fn pinned_loader<'a>(maps_dir: &Path, log_level: &'a u8) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    for name in PINNED_MAPS {
        loader.map_pin_path(name, maps_dir.join(name));
        if let Some(entries) = max_entries_override(name) {
            loader.map_max_entries(name, entries);
        }
    }
    loader.override_global(globals::AYA_LOG_LEVEL, log_level, false);
    loader
}

/// aya-log's numbering of a tracing level.
fn aya_log_level(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 1,
        tracing::Level::WARN => 2,
        tracing::Level::INFO => 3,
        tracing::Level::DEBUG => 4,
        tracing::Level::TRACE => 5,
    }
}

/// Reads the eBPF programs' log records (aya-log) into the agent's own log stream.
pub type EbpfLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// bpffs directory holding `maps/` and `links/`; unique per test, [`DEFAULT_PIN_DIR`]
    /// in production.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory to attach to; the host's cgroup v2 root when `None`.
    pub cgroup: Option<PathBuf>,
    /// Destination ports that are never captured.
    pub excluded_ports: Vec<u16>,
    /// Most verbose level the eBPF programs log at.
    pub ebpf_log_level: tracing::Level,
    /// Move the bytes of the local legs (app <-> agent in a pod) with the sockmap
    /// (`ambit_sk_msg`) instead of loopback TCP. Experimental, off by default (`--sockmap`).
    pub sockmap: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            cgroup: None,
            excluded_ports: Vec::new(),
            ebpf_log_level: tracing::Level::WARN,
            sockmap: false,
        }
    }
}

/// What the sockmap shortcut is doing, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockmapStats {
    /// The sk_msg program is attached and sock_ops files local legs.
    pub attached: bool,
    /// Attaching failed at start (0 or 1): the agent carries on over TCP.
    pub attach_failures: u64,
    /// Bytes moved from one end of a local leg straight to the other's receive queue.
    pub redirected_bytes: u64,
    /// Local-leg sockets whose peer was not filed yet at their first send: they stay on TCP.
    pub tcp_fallbacks: u64,
}

/// What became of the pinned links this agent found (see [`Capture::link_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Links switched in place from an earlier agent's program to this agent's.
    pub replaced: u64,
    /// Links whose switch failed: they keep the earlier program (still capturing).
    pub failed: u64,
}

impl LinkStats {
    fn record(&mut self, outcome: &LinkOutcome) {
        match outcome {
            LinkOutcome::Replaced { .. } => self.replaced += 1,
            LinkOutcome::KeptOld { .. } => self.failed += 1,
            LinkOutcome::Attached { .. } => {}
        }
    }
}

/// The original-destination map as one pod's outbound side reads it ([`Capture::orig_dst_table`]).
pub struct OrigDstTable {
    /// Read with lookup-and-delete, which needs no `&mut`: connections share no lock here.
    map: HashMap<MapData, FlowKey, OrigDst>,
}

impl OrigDstTable {
    /// Takes the original destination of the connection from `netns_cookie`'s source
    /// port `client_port`: `None` if none was recorded (or its family is unknown).
    pub fn take(&self, netns_cookie: u64, client_port: u16) -> io::Result<Option<SocketAddr>> {
        take_orig_dst(&self.map, netns_cookie, client_port)
    }
}

/// Reads and removes a captured connection's entry (one syscall): the entry serves one
/// accept, and the LRU map need not wait for eviction to reuse its slot.
fn take_orig_dst(
    map: &HashMap<MapData, FlowKey, OrigDst>,
    netns_cookie: u64,
    client_port: u16,
) -> io::Result<Option<SocketAddr>> {
    let key = FlowKey {
        netns_cookie,
        port: u32::from(client_port),
        reserved: 0,
    };
    Ok(crate::sys::bpf_map_lookup_and_delete(map, &key)?.and_then(|o| orig_dst_to_socket_addr(&o)))
}

/// Attached capture programs and handles on their maps.
pub struct Capture {
    pin_dir: PathBuf,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    orig_dst: HashMap<MapData, FlowKey, OrigDst>,
    listeners: SockHash<MapData, ListenerKey>,
    /// Names of the programs whose links this agent holds.
    programs: Vec<&'static str>,
    ebpf_logger: Option<EbpfLogger>,
    sockmap_stats: PerCpuArray<MapData, u64>,
    sockmap_attached: bool,
    sockmap_attach_failures: u64,
    links_stats: LinkStats,
    maps_recreated: Vec<&'static str>,
    /// What this agent changed inside each pod's netns besides its pinned links, by netns
    /// cookie, for [`Capture::detach_inbound`] to undo. In memory only: see
    /// [`inbound::PodNetnsChanges`].
    pod_netns: std::collections::BTreeMap<u64, inbound::PodNetnsChanges>,
    /// Which pod (netns cookie) each address's INBOUND_LISTENERS entries belong to, so that
    /// a pod leaving removes its own entries and not those of a pod that took the address
    /// over. In memory only: an earlier agent's entries went with its sockets.
    listener_addrs: std::collections::BTreeMap<std::net::Ipv4Addr, u64>,
    // Kept so the pinned links' fds stay open for the agent's lifetime; the pins keep the
    // programs attached when the agent is gone.
    _links: Vec<PinnedLink>,
    /// Keeps the loaded programs alive until the links are established and pinned, and
    /// holds the per-pod programs (sk_lookup, tc), loaded once here and linked into every
    /// pod.
    ebpf: Ebpf,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// Loads the programs and attaches them at the cgroup v2 root; over links pinned by a
    /// previous run of the agent (possibly another version), switches those links to the
    /// programs loaded now. Fails, before touching any link, if a pinned map that carries
    /// state no longer matches this object's definition (see `upgrade::check_pinned_maps`).
    pub fn attach(config: &CaptureConfig) -> Result<Self> {
        let pin_dir = config.pin_dir.clone();
        ensure_bpffs(&pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| CaptureError::Bpffs {
                path: dir.clone(),
                source,
            })?;
        }

        // Pinned maps are reused (state survives agent restarts) only where their definition
        // is still this object's; see `upgrade::check_pinned_maps`.
        let maps_recreated = upgrade::check_pinned_maps(&maps_dir)?;
        let ebpf_log_level = aya_log_level(config.ebpf_log_level);
        let mut ebpf = pinned_loader(&maps_dir, &ebpf_log_level).load(EBPF_OBJECT)?;
        // The loader, and its parse of the kernel's BTF (~20 MB of heap), are freed by now.
        crate::sys::release_free_heap();
        let ebpf_logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!(error = %e, "eBPF program logs will not reach the agent's log");
                None
            }
        };

        let cgroup_path = match &config.cgroup {
            Some(path) => path.clone(),
            None => cgroup2_root().ok_or(CaptureError::NoCgroup2)?,
        };
        let cgroup = std::fs::File::open(&cgroup_path).map_err(|source| CaptureError::Cgroup {
            path: cgroup_path.clone(),
            source,
        })?;

        // Programs are loaded while the loader still holds every map: their instructions
        // refer to the maps' fds, and some handles taken below are dropped once written.
        for name in CGROUP_PROGRAMS {
            let err = |source| CaptureError::Program { name, source };
            if name == programs::SOCK_OPS {
                program::<SockOps>(&mut ebpf, name)?.load().map_err(err)?;
            } else {
                program::<CgroupSockAddr>(&mut ebpf, name)?
                    .load()
                    .map_err(err)?;
            }
        }
        for name in TC_PROGRAMS {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| CaptureError::Program { name, source })?;
        }
        {
            let name = programs::SK_LOOKUP;
            let prog: &mut SkLookup = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| CaptureError::Program { name, source })?;
        }

        // Every map the programs read is filled before any program is attached or switched
        // in below: a new connect4 must never run against an empty EXCLUDED_PORTS.
        let enrolled = take_map(&mut ebpf, maps::ENROLLED)?;
        let orig_dst = take_map(&mut ebpf, maps::ORIG_DST)?;
        let listeners = {
            let name = maps::INBOUND_LISTENERS;
            let map = ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?;
            SockHash::try_from(map).map_err(|source| CaptureError::Map { name, source })?
        };
        let mut excluded: HashMap<MapData, u32, u32> = take_map(&mut ebpf, maps::EXCLUDED_PORTS)?;
        for port in &config.excluded_ports {
            excluded
                .insert(u32::from(*port), 1, 0)
                .map_err(|source| CaptureError::Map {
                    name: maps::EXCLUDED_PORTS,
                    source,
                })?;
        }
        let (sockmap_attached, sockmap_attach_failures) = if config.sockmap {
            match attach_sockmap(&mut ebpf) {
                Ok(()) => (true, 0),
                Err(e) => {
                    // The local legs keep working over loopback TCP, only slower.
                    tracing::warn!(error = %e, "sockmap shortcut not attached; local legs stay on TCP");
                    (false, 1)
                }
            }
        } else {
            (false, 0)
        };
        // Written at every start: the pinned sock_ops program may come from an earlier run
        // with the other setting. Off unless the sk_msg program is attached, so that no
        // socket is filed where nothing would redirect its bytes.
        {
            let name = maps::SOCKMAP_SWITCH;
            let err = |source| CaptureError::Map { name, source };
            let mut switch: Array<MapData, u32> =
                Array::try_from(ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?)
                    .map_err(err)?;
            let value = if sockmap_attached { SOCKMAP_ON } else { 0 };
            switch.set(0, value, 0).map_err(err)?;
        }
        let sockmap_stats = {
            let name = maps::SOCKMAP_STATS;
            let map = ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?;
            PerCpuArray::try_from(map).map_err(|source| CaptureError::Map { name, source })?
        };
        // Each cgroup hook gets this agent's program: attached and pinned the first time;
        // over a link pinned by an earlier agent (an upgrade, or just a restart), swapped
        // into that link in place, so the hook never goes without a capture program.
        // aya gives CgroupSockAddr and SockOps the same load/attach/take_link shape but no
        // common trait, so one macro serves both.
        let mut links_stats = LinkStats::default();
        let mut links = Vec::with_capacity(CGROUP_PROGRAMS.len());
        macro_rules! attach_to_cgroup {
            ($ty:ty, $name:expr) => {{
                let name = $name;
                let pin = links_dir.join(name);
                let prog: &mut $ty = program(&mut ebpf, name)?;
                let err = |source| CaptureError::Program { name, source };
                let prog_id = prog.info().map_err(err)?.id();
                let outcome = upgrade::link_program(
                    &pin,
                    prog,
                    prog_id,
                    |prog| {
                        let id = prog.attach(&cgroup, LINK_ATTACH_MODE).map_err(err)?;
                        let link = prog.take_link(id).map_err(err)?;
                        FdLink::try_from(link).map_err(|source| CaptureError::Link { name, source })
                    },
                    |prog, _link, old_prog_id| {
                        let fd = prog.fd().map_err(err)?;
                        upgrade::update_pinned_link(&pin, fd.as_fd(), old_prog_id)
                    },
                )?;
                links_stats.record(&outcome);
                links.push(PinnedLink::from_pin(&pin).map_err(|e| CaptureError::Pin {
                    path: pin.clone(),
                    source: Box::new(e),
                })?);
            }};
        }
        attach_to_cgroup!(CgroupSockAddr, programs::CONNECT4);
        attach_to_cgroup!(SockOps, programs::SOCK_OPS);
        attach_to_cgroup!(CgroupSockAddr, programs::GETPEERNAME4);
        attach_to_cgroup!(CgroupSockAddr, programs::CONNECT6);
        attach_to_cgroup!(CgroupSockAddr, programs::GETPEERNAME6);

        info!(
            pin_dir = %pin_dir.display(),
            cgroup = %cgroup_path.display(),
            sockmap = sockmap_attached,
            links_replaced = links_stats.replaced,
            link_replace_failures = links_stats.failed,
            maps_recreated = ?maps_recreated,
            "capture programs attached"
        );
        let mut attached_programs = CGROUP_PROGRAMS.to_vec();
        if sockmap_attached {
            attached_programs.push(programs::SK_MSG);
        }
        Ok(Self {
            pin_dir,
            enrolled,
            orig_dst,
            listeners,
            programs: attached_programs,
            ebpf_logger,
            sockmap_stats,
            sockmap_attached,
            sockmap_attach_failures,
            links_stats,
            maps_recreated,
            pod_netns: std::collections::BTreeMap::new(),
            listener_addrs: std::collections::BTreeMap::new(),
            _links: links,
            ebpf,
        })
    }

    /// How many pinned links were switched to this agent's programs, and how many kept the
    /// earlier agent's program because the switch failed (cgroup and per-pod links, since
    /// start). For metrics: a non-zero `failed` means older capture code is still running.
    pub fn link_stats(&self) -> LinkStats {
        self.links_stats
    }

    /// Ids of the programs this agent loaded once at start and holds (the cgroup, sk_lookup,
    /// tc and sk_msg programs, by name).
    /// Loaded-but-unused programs report nothing.
    pub fn program_ids(&self) -> Vec<(String, u32)> {
        self.ebpf
            .programs()
            .filter_map(|(name, prog)| Some((name.to_string(), prog.info().ok()?.id())))
            .collect()
    }

    /// Pinned maps found with another definition and recreated empty at start.
    pub fn maps_recreated(&self) -> &[&'static str] {
        &self.maps_recreated
    }

    /// The reader of the programs' log records, for the caller to drive (once).
    pub fn take_ebpf_logger(&mut self) -> Option<EbpfLogger> {
        self.ebpf_logger.take()
    }

    /// Starts capturing outbound TCP of the pod whose netns has this cookie.
    pub fn enroll(&mut self, netns_cookie: u64) -> Result<()> {
        let value = EnrolledPod {
            flags: ENROLL_OUTBOUND,
            reserved: 0,
        };
        self.enrolled
            .insert(netns_cookie, value, 0)
            .map_err(|source| CaptureError::Map {
                name: maps::ENROLLED,
                source,
            })?;
        debug!(netns_cookie, "enrolled");
        Ok(())
    }

    /// Stops capturing the pod; absent entries are not an error.
    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<()> {
        removed_or_absent(maps::ENROLLED, self.enrolled.remove(&netns_cookie))
    }

    /// Netns cookies currently enrolled.
    pub fn enrolled(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(|k| k.ok()).collect()
    }

    /// Attached programs, by name (for metrics and readiness).
    pub fn programs(&self) -> &[&'static str] {
        &self.programs
    }

    /// Entries in the maps that steer traffic, by map name. Walks the maps: for scrapes, not
    /// for the data path.
    pub fn map_entries(&self) -> Vec<(&'static str, usize)> {
        vec![
            (maps::ENROLLED, self.enrolled.keys().count()),
            (maps::ORIG_DST, self.orig_dst.keys().count()),
        ]
    }

    /// The sockmap shortcut's state and counters (summed over CPUs). For scrapes.
    pub fn sockmap_stats(&self) -> SockmapStats {
        let sum = |stat: SockmapStat| {
            self.sockmap_stats
                .get(&(stat as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        SockmapStats {
            attached: self.sockmap_attached,
            attach_failures: self.sockmap_attach_failures,
            redirected_bytes: sum(SockmapStat::RedirectedBytes),
            tcp_fallbacks: sum(SockmapStat::TcpFallbacks),
        }
    }

    /// Takes the original destination recorded for a captured connection, identified by the
    /// client's netns and source port (the peer port of the socket the agent accepted).
    pub fn take_orig_dst(
        &self,
        netns_cookie: u64,
        client_port: u16,
    ) -> io::Result<Option<SocketAddr>> {
        take_orig_dst(&self.orig_dst, netns_cookie, client_port)
    }

    /// A handle of its own on the original-destination map, for the data path: looking up
    /// a captured connection then never waits on enrollment or a metrics scrape, which
    /// hold the `Capture`.
    pub fn orig_dst_table(&self) -> Result<OrigDstTable> {
        let name = maps::ORIG_DST;
        let err = |source| CaptureError::Map { name, source };
        let data = MapData::from_pin(self.pin_dir.join("maps").join(name)).map_err(err)?;
        let map =
            HashMap::try_from(aya::maps::Map::from_map_data(data).map_err(err)?).map_err(err)?;
        Ok(OrigDstTable { map })
    }

    /// Detaches everything and removes the pins: plain networking for every pod.
    pub fn uninstall(self) -> Result<()> {
        // Our handles go first; the links are detached through their pins.
        let pin_dir = self.pin_dir.clone();
        drop(self);
        remove_pins(&pin_dir)
    }
}

/// Loads `ambit_sk_msg` and attaches it to the LOCAL_LEGS sockhash. The attachment belongs to
/// the (pinned) map, not to a link: it lasts while the map does, and sockets filed in the
/// map keep the program they got. The sk_msg program is detached when the agent's handle
/// on it is dropped; sockets filed earlier keep it until they close, redirecting only to
/// their own connection's other end.
///
/// There is no pinned link to switch here on an upgrade: the kernel swaps the map's sk_msg
/// program in one step at this attach (BPF_PROG_ATTACH on a sockmap replaces the program it
/// holds), so sockets filed from then on get this agent's program.
fn attach_sockmap(ebpf: &mut Ebpf) -> Result<()> {
    let name = maps::LOCAL_LEGS;
    let legs: SockHash<MapData, SockKey> =
        SockHash::try_from(ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?)
            .map_err(|source| CaptureError::Map { name, source })?;
    let name = programs::SK_MSG;
    let err = |source| CaptureError::Program { name, source };
    let prog: &mut SkMsg = program(ebpf, name)?;
    prog.load().map_err(err)?;
    prog.attach(legs.fd()).map_err(err)?;
    let prog_id = prog.info().map_err(err)?.id();
    info!(
        prog_id,
        "sk_msg program attached to LOCAL_LEGS (replacing any earlier one)"
    );
    Ok(())
}

/// Removes ambit's pins under `pin_dir`, detaching the programs, without loading anything.
///
/// Each link is unpinned, then detached explicitly: merely unlinking the pin file would leave
/// the detach to a kernel work queue (a few more connections captured after "uninstall"
/// returned), and closing our fd detaches only if no other process holds one.
/// Per-pod links (`pods/<netns-cookie>/…`) go first, then the cgroup links.
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    if let Ok(pods) = std::fs::read_dir(pin_dir.join(inbound::PODS_DIR)) {
        for pod in pods.flatten() {
            detach_links_in(&pod.path())?;
        }
    }
    detach_links_in(&pin_dir.join("links"))?;
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CaptureError::Unpin {
            path: pin_dir.to_path_buf(),
            source,
        }),
    }
}

/// Detaches every pinned link in `dir` (absent directory: nothing to do).
fn detach_links_in(dir: &Path) -> Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            detach_pinned(&entry.path())?;
        }
    }
    Ok(())
}

/// Removes the pin at `pin`, then detaches its link from its hook even while another process
/// holds an fd of it (`sys::bpf_link_detach`). Unpinned first: a detached link left pinned
/// would pass for a live one at the next start, which keeps pinned links.
fn detach_pinned(pin: &Path) -> Result<()> {
    let link = crate::sys::bpf_obj_get(pin).map_err(|e| CaptureError::Pin {
        path: pin.to_path_buf(),
        source: Box::new(e),
    })?;
    std::fs::remove_file(pin).map_err(|source| CaptureError::Unpin {
        path: pin.to_path_buf(),
        source,
    })?;
    // A kernel or link type without BPF_LINK_DETACH: closing our fd (below) still detaches
    // the link unless another process holds one.
    if let Err(e) = crate::sys::bpf_link_detach(link.as_fd()) {
        warn!(pin = %pin.display(), error = %e, "explicit link detach failed; detaching by closing the link");
    }
    Ok(())
}

fn orig_dst_to_socket_addr(orig: &OrigDst) -> Option<SocketAddr> {
    let port = u16::try_from(orig.port).ok()?;
    let ip = match orig.family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(orig.addr[0].to_ne_bytes())),
        FAMILY_V6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(orig.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let bpffs_root = Path::new("/sys/fs/bpf");
    let err = |source| CaptureError::Bpffs {
        path: bpffs_root.to_path_buf(),
        source,
    };
    if !crate::sys::is_bpffs(bpffs_root).map_err(err)? {
        crate::sys::mount_bpffs(bpffs_root).map_err(err)?;
        info!("mounted bpffs at /sys/fs/bpf");
    }
    if !pin_dir.starts_with(bpffs_root) && !crate::sys::is_bpffs(pin_dir).unwrap_or(false) {
        return Err(CaptureError::Bpffs {
            path: pin_dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not on a bpffs"),
        });
    }
    Ok(())
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::MissingProgram(name))?
        .try_into()
        .map_err(|source| CaptureError::Program { name, source })
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>> {
    let map = ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?;
    HashMap::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

/// A map delete whose key may already be gone: absent is success. aya reports an absent
/// key either as `KeyNotFound` or as the delete syscall's ENOENT.
fn removed_or_absent(name: &'static str, result: std::result::Result<(), MapError>) -> Result<()> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(CaptureError::Map { name, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orig_dst_v4_decodes_network_order() {
        let orig = OrigDst {
            addr: [u32::from_ne_bytes([10, 1, 2, 3]), 0, 0, 0],
            port: 8080,
            family: FAMILY_V4,
        };
        assert_eq!(
            orig_dst_to_socket_addr(&orig),
            Some("10.1.2.3:8080".parse().unwrap())
        );
    }

    #[test]
    fn orig_dst_rejects_unknown_family_and_bad_port() {
        let mut orig = OrigDst {
            addr: [0; 4],
            port: 80,
            family: 9,
        };
        assert_eq!(orig_dst_to_socket_addr(&orig), None);
        orig.family = FAMILY_V4;
        orig.port = 70_000;
        assert_eq!(orig_dst_to_socket_addr(&orig), None);
    }

    #[test]
    fn embedded_object_has_every_program_and_map() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("parse embedded eBPF object");
        for name in [
            programs::CONNECT4,
            programs::SOCK_OPS,
            programs::GETPEERNAME4,
            programs::CONNECT6,
            programs::GETPEERNAME6,
            programs::SK_LOOKUP,
            programs::TC_REPLY_TO_LO,
            programs::TC_AGENT_LO,
            programs::SK_MSG,
        ] {
            assert!(obj.programs.contains_key(name), "program {name} missing");
        }
        for name in PINNED_MAPS {
            assert!(obj.maps.contains_key(name), "map {name} missing");
        }
    }
}
