//! Finding the network namespace of pods that already run, without asking a container
//! runtime: every process's cgroup path names its pod (the kubelet puts each pod in a
//! cgroup whose name carries the pod UID), and its `ns/net` is the pod's namespace.
//!
//! Both kubelet cgroup drivers are understood:
//! - systemd: `.../kubepods-<qos>-pod<uid with '_' for '-'>.slice/<container>.scope`
//!   (guaranteed pods: `kubepods-pod<uid>.slice`);
//! - cgroupfs: `.../kubepods/<qos>/pod<uid>/<container>` (guaranteed: `/kubepods/pod<uid>/`).
//!
//! A scan only proposes a namespace: the caller confirms it with [`netns_holds_ip`] against
//! the pod's IPs from the API server before enrolling it.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::netns::NetNs;

/// A pod's UID in the API server's form: a dashed, lowercase UUID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid(String);

impl PodUid {
    /// Accepts a UUID in either case; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let lower = text.to_ascii_lowercase();
        let well_formed = lower.len() == 36
            && lower.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_hexdigit(),
            });
        well_formed.then_some(Self(lower))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifies a network namespace: the (device, inode) of its nsfs file. Two paths refer to
/// the same namespace exactly when these match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    /// Follows the `ns/net` magic link (or a bind mount such as `/run/netns/<name>`).
    pub fn of(path: &Path) -> io::Result<Self> {
        let meta = fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    fn of_file(file: &File) -> io::Result<Self> {
        let meta = file.metadata()?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A pod's namespace as found by [`scan`]: reachable through `path` for as long as `pid`
/// lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsCandidate {
    /// `<proc_root>/<pid>/ns/net`.
    pub path: PathBuf,
    pub id: NetnsId,
    pub pid: u32,
}

impl NetnsCandidate {
    /// Opens the namespace and checks it is still the one the scan saw: the process may have
    /// exited and its pid been reused since.
    pub fn open(&self) -> io::Result<NetNs> {
        let ns = NetNs::open(&self.path)?;
        let file = File::from(ns.as_fd().try_clone_to_owned()?);
        if NetnsId::of_file(&file)? != self.id {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} no longer refers to the scanned namespace (pid {} gone or reused)",
                    self.path.display(),
                    self.pid
                ),
            ));
        }
        Ok(ns)
    }
}

/// The pod UID in one line of `/proc/<pid>/cgroup` (v1 `N:controllers:/path` or v2
/// `0::/path`); `None` for processes outside any pod.
pub fn pod_uid_from_cgroup(line: &str) -> Option<PodUid> {
    let mut fields = line.trim_end().splitn(3, ':');
    let (_hierarchy, _controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
    if !path.starts_with('/') {
        return None;
    }
    let components: Vec<&str> = path.split('/').collect();
    for (i, component) in components.iter().enumerate() {
        if let Some(uid) = systemd_slice_uid(component) {
            return Some(uid);
        }
        // cgroupfs: the pod directory sits right under `kubepods` or under its QoS class.
        if let Some(uid) = component.strip_prefix("pod").and_then(PodUid::parse) {
            let parent_is_kubepods = |back: usize| {
                i.checked_sub(back)
                    .is_some_and(|j| components[j] == "kubepods")
            };
            if parent_is_kubepods(1) || parent_is_kubepods(2) {
                return Some(uid);
            }
        }
    }
    None
}

/// `kubepods-besteffort-pod<uid_>.slice`, `kubepods-pod<uid_>.slice`, and nested forms such
/// as kind's `kubelet-kubepods-burstable-pod<uid_>.slice`. systemd joins the slice hierarchy
/// with '-', which is why the UID's own dashes are written as '_'.
fn systemd_slice_uid(component: &str) -> Option<PodUid> {
    let name = component.strip_suffix(".slice")?;
    let (parents, uid) = name.rsplit_once("-pod")?;
    if !parents.split('-').any(|unit| unit == "kubepods") {
        return None;
    }
    PodUid::parse(&uid.replace('_', "-"))
}

/// The start time (clock ticks since boot, field 22) from `/proc/<pid>/stat`. The command
/// name (field 2) is in parentheses and may itself hold spaces and parentheses, so fields
/// are counted from the last ')'.
fn start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name, so field 22 is the 20th.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Walks `<proc_root>/<pid>` and returns, per pod UID, the namespace of its oldest process.
/// Processes in the host's namespace (that of pid 1: hostNetwork pods) are left out; so are
/// processes that exit during the scan. Fails only when the host's namespace or the process
/// list cannot be read.
pub fn scan(proc_root: &Path) -> io::Result<HashMap<PodUid, NetnsCandidate>> {
    let host_path = proc_root.join("1/ns/net");
    let host = NetnsId::of(&host_path).map_err(|e| {
        io::Error::new(e.kind(), format!("host netns {}: {e}", host_path.display()))
    })?;
    scan_excluding(proc_root, host)
}

/// [`scan`] with the host's namespace given by the caller, for when pid 1's `ns/net` cannot
/// be read (a sandbox that hides pid 1) but the caller knows it shares the host's namespace
/// (a hostNetwork agent: `/proc/self/ns/net`).
pub fn scan_excluding(
    proc_root: &Path,
    host: NetnsId,
) -> io::Result<HashMap<PodUid, NetnsCandidate>> {
    let mut oldest: HashMap<PodUid, (u64, NetnsCandidate)> = HashMap::new();
    let mut unreadable = 0usize;
    let mut last_error = None;
    for entry in fs::read_dir(proc_root)? {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(e),
        };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        match inspect(proc_root, pid, host) {
            Ok(Some((uid, started, candidate))) => {
                let older = oldest.get(&uid).is_none_or(|(best_started, best)| {
                    (started, candidate.pid) < (*best_started, best.pid)
                });
                if older {
                    oldest.insert(uid, (started, candidate));
                }
            }
            Ok(None) => {}
            Err(e) if vanished(&e) => {}
            Err(e) => {
                debug!(pid, error = %e, "process skipped by the netns scan");
                unreadable += 1;
                last_error = Some(e);
            }
        }
    }
    if let Some(e) = last_error {
        warn!(
            unreadable,
            last_error = %e,
            "netns scan could not read some processes; their pods were not found"
        );
    }
    Ok(oldest
        .into_iter()
        .map(|(uid, (_, candidate))| (uid, candidate))
        .collect())
}

fn inspect(
    proc_root: &Path,
    pid: u32,
    host: NetnsId,
) -> io::Result<Option<(PodUid, u64, NetnsCandidate)>> {
    let dir = proc_root.join(pid.to_string());
    let started = read_start_time(&dir)?;
    let cgroup = fs::read_to_string(dir.join("cgroup"))?;
    let Some(uid) = cgroup.lines().find_map(pod_uid_from_cgroup) else {
        return Ok(None);
    };
    let path = dir.join("ns/net");
    let id = NetnsId::of(&path)?;
    if id == host {
        return Ok(None);
    }
    // The pid may have been reused between the reads above: the same start time before and
    // after proves they all describe one process.
    if read_start_time(&dir)? != started {
        return Ok(None);
    }
    Ok(Some((uid, started, NetnsCandidate { path, id, pid })))
}

fn read_start_time(dir: &Path) -> io::Result<u64> {
    let path = dir.join("stat");
    let stat = fs::read_to_string(&path)?;
    start_time(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: no start time in {stat:?}", path.display()),
        )
    })
}

/// A process that exits mid-scan makes its /proc files vanish (ENOENT) or answer ESRCH.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// True when one of `ips` is assigned to an interface inside `ns`.
///
/// Binding a UDP socket to (ip, 0) succeeds only for a local address (EADDRNOTAVAIL
/// otherwise), unless the namespace allows non-local binds: that case is an error, since
/// the bind would then prove nothing. An IPv6 address still in duplicate address detection
/// counts as not (yet) held; callers retry.
pub fn netns_holds_ip(ns: &NetNs, ips: &[IpAddr]) -> io::Result<bool> {
    let ips = ips.to_vec();
    let ns_path = ns.path().display().to_string();
    ns.run(move || {
        for ip in ips {
            // /proc/sys/net shows the namespace of the reading thread: this one.
            let sysctl = match ip {
                IpAddr::V4(_) => "/proc/sys/net/ipv4/ip_nonlocal_bind",
                IpAddr::V6(_) => "/proc/sys/net/ipv6/ip_nonlocal_bind",
            };
            if fs::read_to_string(sysctl).is_ok_and(|v| v.trim() != "0") {
                return Err(io::Error::other(format!(
                    "{sysctl} is enabled in netns {ns_path}: a bind cannot tell whether {ip} is local"
                )));
            }
            match UdpSocket::bind(SocketAddr::new(ip, 0)) {
                Ok(_) => return Ok(true),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                    ) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("probing {ip} in netns {ns_path}: {e}"),
                    ));
                }
            }
        }
        Ok(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1d2c3b4a-5e6f-4789-a0b1-c2d3e4f5a6b7";
    const UID_UNDERSCORE: &str = "1d2c3b4a_5e6f_4789_a0b1_c2d3e4f5a6b7";

    fn uid(line: &str) -> Option<String> {
        pod_uid_from_cgroup(line).map(|u| u.to_string())
    }

    #[test]
    fn systemd_driver_v2_all_qos_classes() {
        for qos in ["besteffort", "burstable"] {
            let line = format!(
                "0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{UID_UNDERSCORE}.slice/cri-containerd-0123abcd.scope"
            );
            assert_eq!(uid(&line).as_deref(), Some(UID), "{line}");
        }
        // Guaranteed pods sit directly under kubepods.slice.
        let line =
            format!("0::/kubepods.slice/kubepods-pod{UID_UNDERSCORE}.slice/crio-0123abcd.scope");
        assert_eq!(uid(&line).as_deref(), Some(UID));
        // An unusual QoS name still parses: the UID is the last '-pod' segment.
        let line = format!(
            "0::/kubepods.slice/kubepods-odd.slice/kubepods-odd-pod{UID_UNDERSCORE}.slice/docker-0123.scope"
        );
        assert_eq!(uid(&line).as_deref(), Some(UID));
        // The pod slice itself (the pause process's cgroup in some runtimes).
        let line = format!("0::/kubepods.slice/kubepods-burstable-pod{UID_UNDERSCORE}.slice");
        assert_eq!(uid(&line).as_deref(), Some(UID));
    }

    #[test]
    fn systemd_driver_v1_lines() {
        let line = format!(
            "12:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_UNDERSCORE}.slice/cri-containerd-ab12.scope"
        );
        assert_eq!(uid(&line).as_deref(), Some(UID));
        let line = format!(
            "1:name=systemd:/kubepods.slice/kubepods-pod{UID_UNDERSCORE}.slice/docker-ab12.scope\n"
        );
        assert_eq!(uid(&line).as_deref(), Some(UID));
        let line = format!(
            "4:cpu,cpuacct:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_UNDERSCORE}.slice/crio-ab12.scope"
        );
        assert_eq!(uid(&line).as_deref(), Some(UID));
    }

    #[test]
    fn cgroupfs_driver_v1_and_v2() {
        for qos in ["besteffort", "burstable", "someday-new-class"] {
            let line = format!("0::/kubepods/{qos}/pod{UID}/0123abcdef");
            assert_eq!(uid(&line).as_deref(), Some(UID), "{line}");
            let line = format!("7:pids:/kubepods/{qos}/pod{UID}/0123abcdef");
            assert_eq!(uid(&line).as_deref(), Some(UID), "{line}");
        }
        // Guaranteed.
        assert_eq!(
            uid(&format!("0::/kubepods/pod{UID}/0123abcdef")).as_deref(),
            Some(UID)
        );
        // CRI-O names its container cgroups crio-<id> under cgroupfs too.
        assert_eq!(
            uid(&format!("3:memory:/kubepods/burstable/pod{UID}/crio-0123")).as_deref(),
            Some(UID)
        );
        // The pod directory itself.
        assert_eq!(
            uid(&format!("0::/kubepods/besteffort/pod{UID}")).as_deref(),
            Some(UID)
        );
    }

    #[test]
    fn nested_prefixes_as_on_kind_nodes() {
        let line = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_UNDERSCORE}.slice/cri-containerd-99.scope"
        );
        assert_eq!(uid(&line).as_deref(), Some(UID));
        let line = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_UNDERSCORE}.slice/cri-containerd-99.scope"
        );
        assert_eq!(uid(&line).as_deref(), Some(UID));
        let line = format!("0::/kubelet/kubepods/burstable/pod{UID}/99");
        assert_eq!(uid(&line).as_deref(), Some(UID));
        let line = format!("5:memory:/docker/abcdef/kubepods/pod{UID}/99");
        assert_eq!(uid(&line).as_deref(), Some(UID));
    }

    #[test]
    fn uid_is_normalised_to_dashed_lowercase() {
        let upper = UID_UNDERSCORE.to_ascii_uppercase();
        let line = format!("0::/kubepods.slice/kubepods-besteffort-pod{upper}.slice");
        assert_eq!(uid(&line).as_deref(), Some(UID));
        let line = format!("0::/kubepods/pod{}/x", UID.to_ascii_uppercase());
        assert_eq!(uid(&line).as_deref(), Some(UID));
    }

    #[test]
    fn non_pod_processes_and_garbage_give_none() {
        let cases = [
            "0::/".to_string(),
            "0::/init.scope".to_string(),
            "0::/system.slice/containerd.service".to_string(),
            "0::/kubepods.slice".to_string(),
            "0::/kubepods.slice/kubepods-besteffort.slice".to_string(),
            "0::/kubepods/burstable".to_string(),
            "1:name=systemd:/user.slice/user-1000.slice/session-2.scope".to_string(),
            String::new(),
            "garbage".to_string(),
            "0:/kubepods/pod".to_string(),
            // A UID that is too short, too long, or not hex.
            "0::/kubepods/pod1d2c3b4a-5e6f-4789-a0b1-c2d3e4f5a6b/x".to_string(),
            "0::/kubepods/pod1d2c3b4a-5e6f-4789-a0b1-c2d3e4f5a6b77/x".to_string(),
            "0::/kubepods/podzd2c3b4a-5e6f-4789-a0b1-c2d3e4f5a6b7/x".to_string(),
            // Dashes in the wrong places (a 32-hex static-pod hash is not an API UID).
            "0::/kubepods/pod1d2c3b4a5e6f4789a0b1c2d3e4f5a6b7----/x".to_string(),
            "0::/kubepods/pod1d2c3b4a5e6f4789a0b1c2d3e4f5a6b7/x".to_string(),
            // A pod-like directory not under kubepods.
            format!("0::/system.slice/pod{UID}/x"),
            // Too deep below kubepods to be the pod level.
            format!("0::/kubepods/a/b/pod{UID}/x"),
            // A pod-like slice outside the kubepods hierarchy.
            format!("0::/system.slice/other-pod{UID_UNDERSCORE}.slice"),
            // Not a slice.
            format!("0::/kubepods.slice/kubepods-pod{UID_UNDERSCORE}.scope"),
            // No path field at all, or a relative one.
            format!("0:kubepods-pod{UID_UNDERSCORE}.slice"),
            format!("0::kubepods/pod{UID}/x"),
        ];
        for line in cases {
            assert_eq!(uid(&line), None, "{line:?}");
        }
    }

    #[test]
    fn pod_uid_parse() {
        assert_eq!(PodUid::parse(UID).map(|u| u.0), Some(UID.to_string()));
        assert_eq!(PodUid::parse(UID_UNDERSCORE), None);
        assert_eq!(PodUid::parse(""), None);
        assert_eq!(PodUid::parse(&format!(" {UID}")), None);
    }

    #[test]
    fn start_time_survives_hostile_command_names() {
        let tail = "S 1 1 1 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(&format!("42 (sleep) {tail}")), Some(987654));
        assert_eq!(
            start_time(&format!("42 (a) (b c) ) x) {tail}")),
            Some(987654)
        );
        assert_eq!(start_time(&format!("42 () {tail}")), Some(987654));
        assert_eq!(start_time("42 (sleep) S 1 2"), None);
        assert_eq!(start_time("42 sleep S"), None);
        assert_eq!(start_time(""), None);
    }

    /// A fake /proc tree: each process has `cgroup`, `stat` and an `ns/net` regular file;
    /// processes sharing a namespace share the file through hard links (same dev/ino).
    struct FakeProc {
        root: PathBuf,
    }

    impl FakeProc {
        fn new() -> Self {
            let root = std::env::temp_dir().join(format!(
                "ambit-procscan-{}-{:x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            fs::create_dir_all(&root).expect("temp dir");
            Self { root }
        }

        /// `netns_of`: share the namespace of that pid; `None` creates a new namespace.
        fn process(&self, pid: u32, cgroup: &str, started: u64, comm: &str, netns_of: Option<u32>) {
            let dir = self.root.join(pid.to_string());
            fs::create_dir_all(dir.join("ns")).expect("pid dir");
            fs::write(dir.join("cgroup"), cgroup).expect("cgroup");
            fs::write(
                dir.join("stat"),
                format!("{pid} ({comm}) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {started} 0 0\n"),
            )
            .expect("stat");
            match netns_of {
                Some(other) => fs::hard_link(
                    self.root.join(format!("{other}/ns/net")),
                    dir.join("ns/net"),
                )
                .expect("hard link"),
                None => fs::write(dir.join("ns/net"), "").expect("ns file"),
            }
        }

        fn id(&self, pid: u32) -> NetnsId {
            NetnsId::of(&self.root.join(format!("{pid}/ns/net"))).expect("id")
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn systemd_cgroup(uid_: &str) -> String {
        format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-1.scope\n"
        )
    }

    #[test]
    fn scan_picks_each_pods_oldest_process_and_skips_the_host() {
        let proc = FakeProc::new();
        let other = "00000000-0000-4000-8000-00000000000a";
        proc.process(1, "0::/init.scope\n", 1, "systemd", None);
        proc.process(
            20,
            "0::/system.slice/containerd.service\n",
            5,
            "containerd",
            Some(1),
        );
        // Pod A: pause (oldest) and an app container, same namespace; the app has the lower
        // pid but started later.
        proc.process(300, &systemd_cgroup(UID_UNDERSCORE), 100, "pause", None);
        proc.process(
            250,
            &systemd_cgroup(UID_UNDERSCORE),
            150,
            "app (v2) )",
            Some(300),
        );
        // CRI-O's conmon shares the pod's cgroup parent but stays in the host's namespace;
        // it starts before the pod's own processes and still must not win.
        proc.process(
            290,
            &format!(
                "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_UNDERSCORE}.slice/crio-conmon-1.scope\n"
            ),
            90,
            "conmon",
            Some(1),
        );
        // Pod B (cgroupfs, v1 hybrid file): two processes with the same start time; the
        // lower pid wins.
        let v1 = format!(
            "4:memory:/kubepods/burstable/pod{other}/c1\n1:name=systemd:/kubepods/burstable/pod{other}/c1\n0::/\n"
        );
        proc.process(402, &v1, 200, "pause", None);
        proc.process(401, &v1, 200, "pause", None);
        // A hostNetwork pod: in the host's namespace, so left out.
        let host_pod = "00000000-0000-4000-8000-00000000000b";
        proc.process(
            500,
            &format!(
                "0::/kubepods.slice/kubepods-pod{}.slice/x.scope\n",
                host_pod.replace('-', "_")
            ),
            50,
            "kube-proxy",
            Some(1),
        );
        // Non-pid entries are ignored.
        fs::create_dir_all(proc.root.join("self")).expect("self");
        fs::write(proc.root.join("uptime"), "1 1").expect("uptime");

        let found = scan(&proc.root).expect("scan");
        let mut uids: Vec<&str> = found.keys().map(PodUid::as_str).collect();
        uids.sort_unstable();
        assert_eq!(uids, vec![other, UID]);
        let a = &found[&PodUid::parse(UID).expect("uid")];
        assert_eq!(a.pid, 300);
        assert_eq!(a.id, proc.id(300));
        assert_eq!(a.path, proc.root.join("300/ns/net"));
        let b = &found[&PodUid::parse(other).expect("uid")];
        assert_eq!(b.pid, 401);
        assert_eq!(b.id, proc.id(401));
        assert_ne!(proc.id(401), proc.id(402));
    }

    #[test]
    fn scan_skips_processes_that_vanish_or_are_half_gone() {
        let proc = FakeProc::new();
        proc.process(1, "0::/init.scope\n", 1, "systemd", None);
        proc.process(300, &systemd_cgroup(UID_UNDERSCORE), 100, "pause", None);
        // A process that exited between the directory listing and the reads: its files
        // are gone (the kernel answers ENOENT).
        fs::create_dir_all(proc.root.join("301")).expect("dir");
        // One whose namespace link is already gone (a zombie).
        proc.process(302, &systemd_cgroup(UID_UNDERSCORE), 50, "pause", None);
        fs::remove_file(proc.root.join("302/ns/net")).expect("rm");
        let found = scan(&proc.root).expect("scan");
        assert_eq!(found.len(), 1);
        assert_eq!(found[&PodUid::parse(UID).expect("uid")].pid, 300);
    }

    #[test]
    fn scan_fails_without_the_hosts_namespace() {
        let proc = FakeProc::new();
        proc.process(300, &systemd_cgroup(UID_UNDERSCORE), 100, "pause", None);
        let err = scan(&proc.root).expect_err("no pid 1");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("host netns"), "{err}");
    }

    #[test]
    fn candidate_open_detects_a_reused_pid() {
        let proc = FakeProc::new();
        proc.process(1, "0::/init.scope\n", 1, "systemd", None);
        proc.process(300, &systemd_cgroup(UID_UNDERSCORE), 100, "pause", None);
        let found = scan(&proc.root).expect("scan");
        let candidate = found[&PodUid::parse(UID).expect("uid")].clone();
        assert_eq!(candidate.open().expect("open").path(), candidate.path);
        // pid 300 exits; a new process with another namespace gets its pid.
        // (Created before the old file goes, so it cannot get the same inode.)
        let replacement = proc.root.join("300/ns/new");
        fs::write(&replacement, "").expect("new ns");
        fs::rename(&replacement, &candidate.path).expect("replace ns");
        let err = candidate.open().expect_err("changed");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("pid 300"), "{err}");
    }

    /// Privileged: a real namespace, a real process in a cgroup laid out like the systemd
    /// driver's, found by scanning the real /proc.
    mod privileged {
        use super::*;
        use std::process::{Child, Command, Stdio};
        use std::time::{Duration, Instant};

        fn is_root() -> bool {
            fs::read_to_string("/proc/self/status").is_ok_and(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2))
                    == Some("0")
            })
        }

        fn cgroup2_root() -> Option<PathBuf> {
            let mounts = fs::read_to_string("/proc/mounts").ok()?;
            mounts.lines().find_map(|line| {
                let mut f = line.split_whitespace();
                let (_src, target, fstype) = (f.next()?, f.next()?, f.next()?);
                (fstype == "cgroup2").then(|| PathBuf::from(target))
            })
        }

        fn ip(args: &[&str]) {
            let status = Command::new("ip").args(args).status().expect("run ip");
            assert!(status.success(), "ip {args:?} failed: {status}");
        }

        /// Everything the test creates, removed in reverse order even when it fails.
        #[derive(Default)]
        struct Cleanup {
            netns: Option<String>,
            child: Option<Child>,
            cgroups: Vec<PathBuf>,
        }

        impl Drop for Cleanup {
            fn drop(&mut self) {
                if let Some(child) = &mut self.child {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                for dir in self.cgroups.iter().rev() {
                    // A reaped process can linger in cgroup.procs for a moment.
                    for _ in 0..50 {
                        match fs::remove_dir(dir) {
                            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                                std::thread::sleep(Duration::from_millis(20))
                            }
                            _ => break,
                        }
                    }
                }
                if let Some(ns) = &self.netns {
                    let _ = Command::new("ip").args(["netns", "del", ns]).status();
                }
            }
        }

        fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !ok() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        #[test]
        fn scan_finds_a_real_pod_netns_and_checks_its_ip() {
            if !is_root() {
                eprintln!("skipping scan_finds_a_real_pod_netns_and_checks_its_ip: needs root");
                return;
            }
            let Some(cgroup2) = cgroup2_root() else {
                eprintln!("skipping: no cgroup2 mount in /proc/mounts");
                return;
            };
            let unique = format!("{}-{:x}", std::process::id(), rand::random::<u32>());
            let ns_name = format!("ambit-test-{unique}");
            let bits = rand::random::<u128>();
            let uid = PodUid::parse(&format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                (bits >> 96) as u32,
                (bits >> 80) as u16,
                (bits >> 64) as u16,
                (bits >> 48) as u16,
                bits as u64 & 0xffff_ffff_ffff
            ))
            .expect("uid");
            let mut cleanup = Cleanup::default();

            ip(&["netns", "add", &ns_name]);
            cleanup.netns = Some(ns_name.clone());
            ip(&["-n", &ns_name, "link", "set", "lo", "up"]);
            ip(&["-n", &ns_name, "addr", "add", "10.251.7.9/32", "dev", "lo"]);

            let top = cgroup2.join(format!("ambit-test-{unique}"));
            let kubepods = top.join("kubepods.slice");
            let qos = kubepods.join("kubepods-besteffort.slice");
            let pod = qos.join(format!(
                "kubepods-besteffort-pod{}.slice",
                uid.as_str().replace('-', "_")
            ));
            let container = pod.join("cri-containerd-0123456789abcdef.scope");
            for dir in [&top, &kubepods, &qos, &pod, &container] {
                fs::create_dir(dir).expect("mkdir cgroup");
                cleanup.cgroups.push(dir.clone());
            }

            let child = Command::new("ip")
                .args(["netns", "exec", &ns_name, "sleep", "30"])
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn sleep in netns");
            let pid = child.id();
            cleanup.child = Some(child);
            let ns_path = PathBuf::from(format!("/run/netns/{ns_name}"));
            let want = NetnsId::of(&ns_path).expect("netns id");
            let proc_ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            wait_for("the child to enter the netns", || {
                NetnsId::of(&proc_ns).is_ok_and(|id| id == want)
            });
            fs::write(container.join("cgroup.procs"), pid.to_string()).expect("move to cgroup");

            let (found, host) = match NetnsId::of(Path::new("/proc/1/ns/net")) {
                Ok(host) => (scan(Path::new("/proc")).expect("scan /proc"), host),
                Err(e) => {
                    // Some sandboxes deny even root the ns links of their pid 1; the test
                    // runs in the host's namespace, so its own stands in.
                    eprintln!("/proc/1/ns/net unreadable ({e}); excluding this process's netns");
                    let host = NetnsId::of(Path::new("/proc/self/ns/net")).expect("own netns");
                    let found = scan_excluding(Path::new("/proc"), host).expect("scan /proc");
                    (found, host)
                }
            };
            let candidate = found.get(&uid).expect("pod found by the scan");
            assert_eq!(candidate.id, want);
            assert_eq!(candidate.pid, pid);
            assert_eq!(candidate.path, proc_ns);
            assert!(found.values().all(|c| c.id != host));

            let ns = candidate.open().expect("open candidate");
            let held: IpAddr = "10.251.7.9".parse().expect("ip");
            let other: IpAddr = "10.251.7.10".parse().expect("ip");
            let v6: IpAddr = "fd00:251::9".parse().expect("ip");
            assert!(netns_holds_ip(&ns, &[other, held]).expect("probe"));
            assert!(!netns_holds_ip(&ns, &[other, v6]).expect("probe"));
            assert!(!netns_holds_ip(&ns, &[]).expect("probe"));
            // The host does not hold the pod's address.
            let host_ns = NetNs::open("/proc/self/ns/net").expect("host ns");
            assert!(!netns_holds_ip(&host_ns, &[held]).expect("probe host"));

            // With non-local binds allowed a bind proves nothing: an error, not a yes.
            ip(&[
                "netns",
                "exec",
                &ns_name,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_nonlocal_bind",
            ]);
            let err = netns_holds_ip(&ns, &[other]).expect_err("nonlocal bind");
            assert!(err.to_string().contains("ip_nonlocal_bind"), "{err}");
            // The check reads the pod's sysctl, not the host's.
            assert!(!netns_holds_ip(&host_ns, &[held]).expect("host unaffected"));
        }
    }
}
