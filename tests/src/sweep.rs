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

impl Swept {
    fn is_empty(&self) -> bool {
        self.netns.is_empty()
            && self.pins.is_empty()
            && self.cgroups.is_empty()
            && self.temp_dirs.is_empty()
            && self.killed.is_empty()
    }
}

/// Once per process, as root (nothing to remove otherwise) and in the machine's own PID
/// namespace (from inside another one, live test processes elsewhere would look gone):
/// sweeps the system's places, judging owners by the processes alive once every place has
/// been read.
pub fn once() {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        if crate::is_root() && in_initial_pid_namespace() {
            let live = std::cell::OnceCell::new();
            sweep(&Places::system(), |owner| {
                live.get_or_init(LivePids::now).owns(owner)
            });
        }
    });
}

/// The initial PID namespace has a fixed inode number (PROC_PID_INIT_INO).
fn in_initial_pid_namespace() -> bool {
    std::fs::read_link("/proc/self/ns/pid").is_ok_and(|ns| ns.as_os_str() == "pid:[4026531836]")
}

/// Removes every test resource in `places` whose owner `alive` says is gone: first the
/// processes still using them (agents of a killed bench, servers in its namespaces), then
/// pins (detaching their programs), namespaces, cgroups and directories.
///
/// `alive` is asked only after every place has been listed: a test process that created
/// something listed here was running before the listing, so it is alive when asked (or
/// gone, and its resource stale) — never taken for dead while it creates its resources.
pub fn sweep(places: &Places, alive: impl Fn(Owner) -> bool) -> Swept {
    let list = |dir: &Path, prefixes: &[&str]| -> Vec<(String, PathBuf, Owner)> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let owner = prefixes.iter().find_map(|p| Owner::parse(&name, p))?;
                Some((name, e.path(), owner))
            })
            .collect()
    };
    let listed = [
        list(&places.netns_dir, NETNS_PREFIXES),
        list(&places.bpffs, &[PIN_PREFIX]),
        places
            .cgroup2
            .as_deref()
            .map(|root| list(root, CGROUP_PREFIXES))
            .unwrap_or_default(),
        list(&places.temp, &[TEMP_PREFIX]),
    ];
    let [netns, pins, cgroups, temp_dirs] = listed.map(|found| {
        found
            .into_iter()
            .filter(|(_, _, owner)| !alive(*owner))
            .map(|(name, path, _)| (name, path))
            .collect::<Vec<_>>()
    });
    let mut swept = Swept::default();

    // Agents name their pin, state and config paths on the command line; servers and pods
    // run inside the namespaces.
    let paths: Vec<String> = pins
        .iter()
        .chain(&temp_dirs)
        .map(|(_, path)| path.display().to_string())
        .collect();
    let mut doomed = agents_naming(&paths);
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

    swept.pins = remove_each(pins, |_, path| ambit_agent::capture::remove_pins(path));
    swept.netns = remove_each(netns, |name, _| crate::ip(&["netns", "del", name]));
    swept.cgroups = remove_each(cgroups, |_, path| remove_cgroup(path));
    swept.temp_dirs = remove_each(temp_dirs, |_, path| std::fs::remove_dir_all(path));
    if !swept.is_empty() {
        eprintln!(
            "stale test resources of processes that are gone, removed: namespaces {:?}, \
             bpffs pins {:?}, cgroups {:?}, directories {:?}; processes killed {:?}",
            swept.netns, swept.pins, swept.cgroups, swept.temp_dirs, swept.killed
        );
    }
    swept
}

/// Removes each of `found` with `remove`; returns the names removed, says why for the rest.
fn remove_each<E: std::fmt::Display>(
    found: Vec<(String, PathBuf)>,
    remove: impl Fn(&str, &Path) -> Result<(), E>,
) -> Vec<String> {
    found
        .into_iter()
        .filter_map(|(name, path)| match remove(&name, &path) {
            Ok(()) => Some(name),
            Err(e) => {
                eprintln!("stale test resources: {}: {e}", path.display());
                None
            }
        })
        .collect()
}

/// Agent processes (`ambit …`, `ambit ca`) that were given one of `paths`, or something
/// under it, as a flag's value or in `KUBECONFIG`. Only those: an editor or a shell that
/// happens to mention the path is left alone.
fn agents_naming(paths: &[String]) -> Vec<u32> {
    if paths.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let names = |value: &str| paths.iter().any(|p| names_path(value, p));
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            // A binary rebuilt since the agent started reads "ambit (deleted)".
            let exe = exe.file_name()?.to_str()?;
            if exe.strip_suffix(" (deleted)").unwrap_or(exe) != "ambit" {
                return None;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let flagged = args
                .windows(2)
                .any(|pair| pair[0].starts_with("--") && names(&pair[1]))
                || args.iter().any(|a| {
                    a.starts_with("--") && a.split_once('=').is_some_and(|(_, v)| names(v))
                });
            let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
            let kubeconfig = environ.split(|&b| b == 0).any(|var| {
                String::from_utf8_lossy(var)
                    .strip_prefix("KUBECONFIG=")
                    .is_some_and(names)
            });
            (flagged || kubeconfig).then_some(pid)
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

/// SIGKILL by PID, read from /proc moments before: a PID reused in between would be hit,
/// a window of milliseconds against PIDs cycling through at least 32,768 values.
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

    /// What the test creates, removed however it ends (already gone after a sweep that
    /// worked: errors are ignored).
    #[derive(Default)]
    struct Created {
        netns: Vec<String>,
        pins: Vec<PathBuf>,
        cgroups: Vec<PathBuf>,
        dirs: Vec<PathBuf>,
    }

    impl Drop for Created {
        fn drop(&mut self) {
            for name in &self.netns {
                let _ = crate::ip(&["netns", "del", name]);
            }
            for pins in &self.pins {
                let _ = ambit_agent::capture::remove_pins(pins);
            }
            for cgroup in &self.cgroups {
                let _ = remove_cgroup(cgroup);
            }
            for dir in &self.dirs {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// How the child ended, waiting at most 10 s: `Some(signal)` when a signal ended it,
    /// `None` when it still runs (or exited by itself).
    fn ended_by_signal(child: &mut std::process::Child) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt as _;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.signal(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => return None,
            }
        }
    }

    /// What a bench killed outright leaves (a namespace with a server in it, pins, a cgroup
    /// with a process, agents still running from its pin and state directories) is removed
    /// and its processes killed; the same kinds of resource of a live test stay, and so do
    /// processes that only mention a stale path without being its agents.
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
        let mut created = Created::default();
        let mut children = Children(Vec::new());
        let mut spawn = |cmd: &mut Command| {
            let child = cmd.spawn().expect("spawning a stand-in process");
            let pid = child.id();
            children.0.push(child);
            pid
        };
        // Stand-ins for agents: a shell whose executable is named like the agent's.
        let scratch = places.temp.join(crate::unique_name("ambit-sweep-bin-"));
        created.dirs.push(scratch.clone());
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        let fake_agent = scratch.join("ambit");
        std::fs::copy("/bin/sh", &fake_agent).expect("copying sh");
        let waiting = |program: &Path| {
            let mut cmd = Command::new(program);
            cmd.args(["-c", "read never", "ambit"])
                .stdin(std::process::Stdio::piped());
            cmd
        };

        // The dead test's resources.
        let server_ns = dead("apod");
        crate::ip(&["netns", "add", &server_ns]).expect("netns add");
        created.netns.push(server_ns.clone());
        let server = spawn(Command::new("ip").args(["netns", "exec", &server_ns, "sleep", "600"]));
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
        created.netns.push(unit_test_ns.clone());
        let pins = places.bpffs.join(dead("ambit-test-"));
        created.pins.push(pins.clone());
        std::fs::create_dir_all(pins.join("links")).expect("pin dir");
        let testbed = places.temp.join(dead("ambit-testbed-"));
        created.dirs.push(testbed.clone());
        let state = testbed.join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        let agent = spawn(waiting(&fake_agent).arg("--pin-dir").arg(&pins));
        let ca = spawn(waiting(&fake_agent).env("KUBECONFIG", testbed.join("kubeconfig")));
        let agent_given_state =
            spawn(waiting(&fake_agent).arg(format!("--state-dir={}", state.display())));
        // An agent whose binary has been replaced since it started.
        let rebuilt = scratch.join("rebuilt");
        std::fs::create_dir_all(&rebuilt).expect("scratch dir");
        std::fs::copy("/bin/sh", rebuilt.join("ambit")).expect("copying sh");
        let agent_of_deleted_binary =
            spawn(waiting(&rebuilt.join("ambit")).arg("--pin-dir").arg(&pins));
        std::fs::remove_file(rebuilt.join("ambit")).expect("removing the binary");
        // Not agents of the dead test: a path as a plain argument, or a process of
        // another name.
        let mentions = spawn(waiting(&fake_agent).arg(&state));
        let other_program = spawn(waiting(Path::new("/bin/sh")).arg("--pin-dir").arg(&pins));
        let cgroup = cgroup2.join(dead("ambit-e2e-"));
        created.cgroups.push(cgroup.clone());
        let leaf = cgroup.join("kubepods.slice");
        std::fs::create_dir_all(&leaf).expect("cgroup");
        let pod = spawn(Command::new("sleep").arg("600"));
        std::fs::write(leaf.join("cgroup.procs"), pod.to_string()).expect("cgroup.procs");

        // A live test's resources, named by this process.
        let live_ns = crate::Netns::create("apod").expect("netns");
        let live_pins = crate::PinDir::unique();
        std::fs::create_dir_all(live_pins.path()).expect("pin dir");
        let live_temp = places.temp.join(crate::unique_name("ambit-testbed-"));
        created.dirs.push(live_temp.clone());
        std::fs::create_dir_all(&live_temp).expect("temp dir");

        let swept = sweep(&places, |owner| {
            owner != Owner::PidSuffix(dead_suffix)
                && owner != Owner::Pid(pid_max + 1)
                && LivePids::now().owns(owner)
        });

        let bystanders = [mentions, other_program];
        let mut children = children;
        for child in children
            .0
            .iter_mut()
            .filter(|c| !bystanders.contains(&c.id()))
        {
            assert_eq!(ended_by_signal(child), Some(9), "{} not killed", child.id());
        }
        for pid in [
            server,
            agent,
            ca,
            agent_given_state,
            agent_of_deleted_binary,
        ] {
            assert!(swept.killed.contains(&pid), "{pid} not reported: {swept:?}");
        }
        for child in children
            .0
            .iter_mut()
            .filter(|c| bystanders.contains(&c.id()))
        {
            let pid = child.id();
            assert!(
                !swept.killed.contains(&pid),
                "{pid} only mentions a stale path"
            );
            assert!(matches!(child.try_wait(), Ok(None)), "{pid} must still run");
        }
        assert!(!places.netns_dir.join(&server_ns).exists());
        assert!(!places.netns_dir.join(&unit_test_ns).exists());
        assert!(!pins.exists());
        assert!(!cgroup.exists());
        assert!(!testbed.exists());
        for kind in [&swept.netns, &swept.pins, &swept.cgroups, &swept.temp_dirs] {
            assert!(!kind.is_empty(), "{swept:?}");
        }

        assert!(live_ns.path().exists());
        assert!(live_pins.path().exists());
        assert!(live_temp.exists());
    }
}
