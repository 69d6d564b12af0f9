//! Removes what killed test processes left behind. Every guard here removes its namespace,
//! pins, cgroup or directory on drop, panics included; a process killed outright (SIGKILL,
//! the machine's session ending mid-bench) drops nothing, and its eBPF programs stay
//! attached at the root cgroup, its agents keep running and its namespaces keep their
//! addresses — the next run would measure or test beside them. So the first resource a
//! test process names sweeps, once, everything named like a test resource whose process is
//! gone (see [`Owner`]), and says on stderr what it removed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Namespace prefixes the testbed's guards create (`Netns::create`).
const NETNS_PREFIXES: &[&str] = &[
    "afab",
    "anode",
    "apod",
    "apeer",
    "ipod",
    "icli",
    "inew",        // unique_name()
    "ambit-test-", // the agent crate's own tests (ScratchNetns, procscan)
];
const PIN_PREFIX: &str = "ambit-test-";
const CGROUP_PREFIXES: &[&str] = &["ambit-e2e-", "ambit-test-"];
const TEMP_PREFIX: &str = "ambit-testbed-";

/// How long a killed cgroup's processes get to exit before its directories are removed.
const CGROUP_EXIT: Duration = Duration::from_secs(5);

/// The test process a resource's name points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// `<prefix><pid % 100000>x<n>` ([`crate::unique_name`]): alive while any process has
    /// a PID with these last five digits (a conservative reading of the short form).
    PidSuffix(u32),
    /// `<prefix><pid>-<hex>` (the agent crate's tests).
    Pid(u32),
}

impl Owner {
    /// The owner named by `name` after `prefix`, or `None` when it is not a test name.
    pub fn parse(name: &str, prefix: &str) -> Option<Self> {
        let rest = name.strip_prefix(prefix)?;
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if let Some((pid, n)) = rest.split_once('x')
            && all_digits(pid)
            && all_digits(n)
        {
            return pid.parse().ok().map(Owner::PidSuffix);
        }
        let (pid, tag) = rest.split_once('-')?;
        (all_digits(pid) && !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| pid.parse().ok().map(Owner::Pid))
            .flatten()
    }
}

/// The processes alive right now, by PID.
pub struct LivePids(HashSet<u32>);

impl LivePids {
    pub fn now() -> Self {
        Self(
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect(),
        )
    }

    pub fn owns(&self, owner: Owner) -> bool {
        match owner {
            Owner::Pid(pid) => self.0.contains(&pid),
            Owner::PidSuffix(suffix) => self.0.iter().any(|pid| pid % 100_000 == suffix),
        }
    }
}

/// Where test resources live; the real places outside tests of the sweep itself.
pub struct Places {
    pub netns_dir: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup2: Option<PathBuf>,
    pub temp: PathBuf,
}

impl Places {
    pub fn system() -> Self {
        Self {
            netns_dir: PathBuf::from("/run/netns"),
            bpffs: PathBuf::from("/sys/fs/bpf"),
            cgroup2: ambit_agent::capture::cgroup2_root(),
            temp: std::env::temp_dir(),
        }
    }
}

/// What one sweep removed (names only), for its caller and its tests.
#[derive(Debug, Default)]
pub struct Swept {
    pub netns: Vec<String>,
    pub pins: Vec<String>,
    pub cgroups: Vec<String>,
    pub temp_dirs: Vec<String>,
    pub killed: Vec<u32>,
}

/// Once per process, and only as root (nothing to remove otherwise): sweeps the system's
/// places, judging owners by the processes alive now.
pub fn once() {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        if crate::is_root() {
            let live = LivePids::now();
            sweep(&Places::system(), |owner| live.owns(owner));
        }
    });
}

/// Removes every test resource in `places` whose owner `alive` says is gone: first the
/// processes still using them (agents of a killed bench, servers in its namespaces), then
/// pins (detaching their programs), namespaces, cgroups and directories.
pub fn sweep(places: &Places, alive: impl Fn(Owner) -> bool) -> Swept {
    let stale = |dir: &Path, prefixes: &[&str]| -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let owner = prefixes.iter().find_map(|p| Owner::parse(&name, p))?;
                (!alive(owner)).then(|| (name, e.path()))
            })
            .collect()
    };
    let netns = stale(&places.netns_dir, NETNS_PREFIXES);
    let pins = stale(&places.bpffs, &[PIN_PREFIX]);
    let cgroups = places
        .cgroup2
        .as_deref()
        .map(|root| stale(root, CGROUP_PREFIXES))
        .unwrap_or_default();
    let temp_dirs = stale(&places.temp, &[TEMP_PREFIX]);
    let mut swept = Swept::default();

    // Agents name their pin and state directories on the command line; servers and pods
    // run inside the namespaces.
    let paths: Vec<String> = pins
        .iter()
        .chain(&temp_dirs)
        .map(|(_, path)| path.display().to_string())
        .collect();
    let mut doomed = processes_naming(&paths);
    for (name, _) in &netns {
        doomed.extend(processes_in_netns(name));
    }
    doomed.sort_unstable();
    doomed.dedup();
    doomed.retain(|&pid| pid != std::process::id());
    for pid in doomed {
        if kill(pid) {
            swept.killed.push(pid);
        }
    }

    for (name, path) in pins {
        match ambit_agent::capture::remove_pins(&path) {
            Ok(()) => swept.pins.push(name),
            Err(e) => eprintln!("stale test resources: {name}: {e}"),
        }
    }
    for (name, _) in netns {
        match crate::ip(&["netns", "del", &name]) {
            Ok(()) => swept.netns.push(name),
            Err(e) => eprintln!("stale test resources: {e}"),
        }
    }
    for (name, path) in cgroups {
        match remove_cgroup(&path) {
            Ok(()) => swept.cgroups.push(name),
            Err(e) => eprintln!("stale test resources: cgroup {}: {e}", path.display()),
        }
    }
    for (name, path) in temp_dirs {
        match std::fs::remove_dir_all(&path) {
            Ok(()) => swept.temp_dirs.push(name),
            Err(e) => eprintln!("stale test resources: {}: {e}", path.display()),
        }
    }
    if !(swept.netns.is_empty()
        && swept.pins.is_empty()
        && swept.cgroups.is_empty()
        && swept.temp_dirs.is_empty()
        && swept.killed.is_empty())
    {
        eprintln!(
            "stale test resources of processes that are gone, removed: namespaces {:?}, \
             bpffs pins {:?}, cgroups {:?}, directories {:?}; processes killed {:?}",
            swept.netns, swept.pins, swept.cgroups, swept.temp_dirs, swept.killed
        );
    }
    swept
}

/// Processes whose command line contains one of `paths`.
fn processes_naming(paths: &[String]) -> Vec<u32> {
    if paths.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            paths
                .iter()
                .any(|p| cmdline.split('\0').any(|arg| names_path(arg, p)))
                .then_some(pid)
        })
        .collect()
}

/// `arg` mentions `path` itself or something under it (`ambit-test-1x3` is not
/// `ambit-test-1x35`).
fn names_path(arg: &str, path: &str) -> bool {
    arg.match_indices(path)
        .any(|(at, _)| matches!(arg[at + path.len()..].chars().next(), None | Some('/')))
}

fn processes_in_netns(name: &str) -> Vec<u32> {
    crate::ip_output(&["netns", "pids", name])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn kill(pid: u32) -> bool {
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Kills whatever is left in a cgroup tree (`cgroup.kill`), waits until it is empty, then
/// removes its directories, deepest first.
fn remove_cgroup(top: &Path) -> std::io::Result<()> {
    if top.join("cgroup.kill").exists() {
        std::fs::write(top.join("cgroup.kill"), "1")?;
    }
    let deadline = Instant::now() + CGROUP_EXIT;
    while std::fs::read_to_string(top.join("cgroup.events"))
        .is_ok_and(|events| events.lines().any(|l| l == "populated 1"))
    {
        if Instant::now() > deadline {
            return Err(std::io::Error::other(format!(
                "its processes did not exit within {CGROUP_EXIT:?} of cgroup.kill"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut dirs = vec![top.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    for dir in dirs.iter().rev() {
        std::fs::remove_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_point_at_their_process() {
        assert_eq!(
            Owner::parse("anode18154x3", "anode"),
            Some(Owner::PidSuffix(18154))
        );
        assert_eq!(
            Owner::parse("ambit-test-4021-1a2bf", "ambit-test-"),
            Some(Owner::Pid(4021))
        );
        assert_eq!(
            Owner::parse("ambit-test-123x0", "ambit-test-"),
            Some(Owner::PidSuffix(123))
        );
        // Not test names: the sweep leaves them alone.
        for (name, prefix) in [
            ("anode", "anode"),
            ("anodex3", "anode"),
            ("anode12x", "anode"),
            ("anode12y3", "anode"),
            ("ambit-test-12-", "ambit-test-"),
            ("ambit-test-12-zz", "ambit-test-"),
            ("ambit-test-", "ambit-test-"),
            ("cni-1234", "anode"),
        ] {
            assert_eq!(Owner::parse(name, prefix), None, "{name}");
        }
    }

    #[test]
    fn an_argument_names_a_path_or_what_is_under_it() {
        let pins = "/sys/fs/bpf/ambit-test-12x3";
        assert!(names_path(pins, pins));
        assert!(names_path("--pin-dir=/sys/fs/bpf/ambit-test-12x3", pins));
        assert!(names_path("/sys/fs/bpf/ambit-test-12x3/links", pins));
        assert!(!names_path("/sys/fs/bpf/ambit-test-12x35", pins));
        assert!(!names_path("/sys/fs/bpf", pins));
    }

    #[test]
    fn a_short_pid_is_alive_while_any_process_ends_in_it() {
        let live = LivePids([123_456, 7].into_iter().collect());
        assert!(live.owns(Owner::PidSuffix(23_456)));
        assert!(live.owns(Owner::PidSuffix(7)));
        assert!(!live.owns(Owner::PidSuffix(123)));
        assert!(live.owns(Owner::Pid(7)));
        assert!(!live.owns(Owner::Pid(23_456)));
    }

    /// Kills and reaps the test's own children however the test ends.
    struct Children(Vec<std::process::Child>);

    impl Drop for Children {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    fn killed_by_sigkill(child: &mut std::process::Child) -> bool {
        use std::os::unix::process::ExitStatusExt as _;
        child.wait().is_ok_and(|s| s.signal() == Some(9))
    }

    /// What a bench killed outright leaves (a namespace with a server in it, pins, a cgroup
    /// with a process, a state directory an agent still runs from) is removed and its
    /// processes killed; the same kinds of resource of a live test stay untouched.
    #[test]
    fn a_dead_test_process_leaves_nothing_behind_and_a_live_one_keeps_everything() {
        if !crate::is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let Some(cgroup2) = ambit_agent::capture::cgroup2_root() else {
            eprintln!("skipping: no cgroup v2 mount");
            return;
        };
        // This process's own sweep is over before the dead test's resources appear.
        once();
        let live = LivePids::now();
        let dead_suffix = (1..100_000u32)
            .rev()
            .find(|&n| !live.owns(Owner::PidSuffix(n)))
            .expect("an unused PID suffix");
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .expect("pid_max")
            .trim()
            .parse()
            .expect("pid_max is a number");
        let dead = |prefix: &str| format!("{prefix}{dead_suffix}x0");
        let places = Places::system();
        let mut children = Children(Vec::new());
        let spawn = |cmd: &mut Command| cmd.spawn().expect("spawning a stand-in process");

        // The dead test's resources.
        let server_ns = dead("apod");
        crate::ip(&["netns", "add", &server_ns]).expect("netns add");
        children.0.push(spawn(
            Command::new("ip").args(["netns", "exec", &server_ns, "sleep", "600"]),
        ));
        let server = children.0[0].id();
        let entered = Instant::now() + Duration::from_secs(10);
        while !processes_in_netns(&server_ns).contains(&server) {
            assert!(
                Instant::now() < entered,
                "the server never entered {server_ns}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let unit_test_ns = format!("ambit-test-{}-5eed", pid_max + 1);
        crate::ip(&["netns", "add", &unit_test_ns]).expect("netns add");
        let pins = places.bpffs.join(dead("ambit-test-"));
        std::fs::create_dir_all(pins.join("links")).expect("pin dir");
        let state = places.temp.join(dead("ambit-testbed-")).join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        // Stand-ins for an orphaned agent: they name its pin and state directories.
        for named in [&pins, &state] {
            children.0.push(spawn(
                Command::new("sh")
                    .args(["-c", "read never", "agent"])
                    .arg(named)
                    .stdin(std::process::Stdio::piped()),
            ));
        }
        let cgroup = cgroup2.join(dead("ambit-e2e-"));
        let leaf = cgroup.join("kubepods.slice");
        std::fs::create_dir_all(&leaf).expect("cgroup");
        children.0.push(spawn(Command::new("sleep").arg("600")));
        let pod = children.0[3].id();
        std::fs::write(leaf.join("cgroup.procs"), pod.to_string()).expect("cgroup.procs");

        // A live test's resources, named by this process.
        let live_ns = crate::Netns::create("apod").expect("netns");
        let live_pins = crate::PinDir::unique();
        std::fs::create_dir_all(live_pins.path()).expect("pin dir");
        let live_temp = places.temp.join(crate::unique_name("ambit-testbed-"));
        std::fs::create_dir_all(&live_temp).expect("temp dir");

        let swept = sweep(&places, |owner| {
            owner != Owner::PidSuffix(dead_suffix) && owner != Owner::Pid(pid_max + 1) && {
                let live = LivePids::now();
                live.owns(owner)
            }
        });

        for child in &mut children.0 {
            assert!(killed_by_sigkill(child), "{} was not killed", child.id());
        }
        assert!(!places.netns_dir.join(&server_ns).exists());
        assert!(!places.netns_dir.join(&unit_test_ns).exists());
        assert!(!pins.exists());
        assert!(!cgroup.exists());
        assert!(!state.exists());
        for kind in [&swept.netns, &swept.pins, &swept.cgroups, &swept.temp_dirs] {
            assert!(!kind.is_empty(), "{swept:?}");
        }
        assert!(swept.killed.contains(&server), "{swept:?}");

        assert!(live_ns.path().exists());
        assert!(live_pins.path().exists());
        assert!(live_temp.exists());
        let _ = std::fs::remove_dir_all(&live_temp);
    }
}
