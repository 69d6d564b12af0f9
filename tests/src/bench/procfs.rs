//! What the bench reads about the agents from /proc: resident memory and CPU time.

use std::time::Duration;

use anyhow::Context as _;

/// VmRSS of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS in /proc/<pid>/status")?
        .parse()?;
    Ok(kib * 1024)
}

/// User + system CPU time of `pid` so far (all its threads).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    cpu_time_of_stat(&stat)
}

/// User + system CPU time in a `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat` text.
pub fn cpu_time_of_stat(stat: &str) -> anyhow::Result<Duration> {
    // The command name (field 2) may contain spaces: fields are counted after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("short /proc/<pid>/stat")?.parse()?)
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_secs_f64(
        total as f64 / clock_ticks_per_sec(),
    ))
}

/// USER_HZ, the unit of /proc/<pid>/stat times (100 on every Linux we run on; asked of
/// getconf to be sure).
fn clock_ticks_per_sec() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Open file descriptors of `pid` (entries of /proc/<pid>/fd).
pub fn open_fds(pid: u32) -> anyhow::Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .count())
}

/// Time the threads of `pid` spent runnable but waiting for a CPU so far (the second field
/// of each `/proc/<pid>/task/<tid>/schedstat`): whether a stall is the agents not being
/// scheduled. Threads that ended are not counted.
pub fn run_queue_wait(pid: u32) -> anyhow::Result<Duration> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0u64;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = task?.path().join("schedstat");
        // A thread that ended since the listing has no file any more.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += parse_schedstat_wait_ns(&text)
            .with_context(|| format!("malformed {}", path.display()))?;
    }
    Ok(Duration::from_nanos(total))
}

/// `<run ns> <wait ns> <timeslices>`: the wait.
fn parse_schedstat_wait_ns(text: &str) -> Option<u64> {
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The machine's CPU time by kind so far, from the `cpu` line of `/proc/stat` (USER_HZ
/// ticks, all CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MachineCpu {
    pub busy: u64,
    pub idle: u64,
    /// Time the hypervisor ran something else while this VM wanted the CPU.
    pub steal: u64,
}

impl MachineCpu {
    pub fn now() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Self::parse(&text).context("no cpu line in /proc/stat")
    }

    fn parse(text: &str) -> Option<Self> {
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
        let field = |i: usize| v.get(i).copied().unwrap_or(0);
        Some(Self {
            busy: field(0) + field(1) + field(2) + field(5) + field(6),
            idle: field(3) + field(4),
            steal: field(7),
        })
    }

    /// Steal as a share of all the CPU time between `self` (earlier) and `later`, in %.
    pub fn steal_percent_until(self, later: Self) -> Option<f64> {
        let busy = later.busy.saturating_sub(self.busy);
        let idle = later.idle.saturating_sub(self.idle);
        let steal = later.steal.saturating_sub(self.steal);
        let all = busy + idle + steal;
        (all > 0).then(|| 100.0 * steal as f64 / all as f64)
    }
}

/// TCP's own account of trouble in one network namespace (`/proc/net/snmp` and `netstat`):
/// what a latency stall leaves behind if TCP caused it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TcpTrouble {
    /// Segments sent again, by fast retransmit, tail loss probe or timeout: Tcp RetransSegs.
    pub retransmitted: u64,
    /// ACKs the kernel held back: TcpExt DelayedACKs.
    pub delayed_acks: u64,
}

impl TcpTrouble {
    /// The counters of the netns the calling thread is in.
    pub fn of_current_netns() -> anyhow::Result<Self> {
        let mut counters = std::collections::HashMap::new();
        for file in [
            "/proc/thread-self/net/snmp",
            "/proc/thread-self/net/netstat",
        ] {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
            parse_counter_pairs(&text, &mut counters);
        }
        let get = |name: &str| counters.get(name).copied().unwrap_or(0);
        Ok(Self {
            retransmitted: get("Tcp:RetransSegs"),
            delayed_acks: get("TcpExt:DelayedACKs"),
        })
    }

    /// What happened between `self` (earlier) and `later`.
    pub fn since(self, later: Self) -> Self {
        Self {
            retransmitted: later.retransmitted.saturating_sub(self.retransmitted),
            delayed_acks: later.delayed_acks.saturating_sub(self.delayed_acks),
        }
    }

    pub fn plus(self, other: Self) -> Self {
        Self {
            retransmitted: self.retransmitted + other.retransmitted,
            delayed_acks: self.delayed_acks + other.delayed_acks,
        }
    }
}

/// `/proc/net/snmp`-style text: a line of names then a line of values, each starting with the
/// same `Prefix:`; adds `Prefix:Name` → value.
fn parse_counter_pairs(text: &str, into: &mut std::collections::HashMap<String, u64>) {
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let mut names = names.split_whitespace();
        let mut values = values.split_whitespace();
        let (Some(prefix), Some(same)) = (names.next(), values.next()) else {
            continue;
        };
        if prefix != same {
            continue;
        }
        for (name, value) in names.zip(values) {
            if let Ok(value) = value.parse() {
                into.insert(format!("{prefix}{name}"), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_a_share_of_all_cpu_time_between_two_readings() {
        let before =
            MachineCpu::parse("cpu  100 0 50 1000 10 0 5 20 0 0\ncpu0 50 0 25 500 5 0 2 10 0 0\n")
                .expect("cpu line");
        assert_eq!(
            before,
            MachineCpu {
                busy: 155,
                idle: 1010,
                steal: 20
            }
        );
        let later = MachineCpu {
            busy: 155 + 60,
            idle: 1010 + 30,
            steal: 20 + 10,
        };
        assert_eq!(before.steal_percent_until(later), Some(10.0));
        assert_eq!(before.steal_percent_until(before), None);
        assert!(MachineCpu::parse("intr 5\n").is_none());
    }

    #[test]
    fn schedstat_gives_the_run_queue_wait() {
        assert_eq!(parse_schedstat_wait_ns("81234 90038 17\n"), Some(90038));
        assert_eq!(parse_schedstat_wait_ns("81234\n"), None);
        // The calling process's own threads have a readable wait.
        assert!(run_queue_wait(std::process::id()).is_ok());
    }

    #[test]
    fn counter_pairs_are_read_by_prefix_and_name() {
        let text = "Tcp: RtoMin RetransSegs\nTcp: 200 17\nTcpExt: DelayedACKs TCPLossProbes\nTcpExt: 5 -\n";
        let mut counters = std::collections::HashMap::new();
        parse_counter_pairs(text, &mut counters);
        assert_eq!(counters.get("Tcp:RetransSegs"), Some(&17));
        assert_eq!(counters.get("TcpExt:DelayedACKs"), Some(&5));
        assert_eq!(counters.get("TcpExt:TCPLossProbes"), None, "not a number");
        let before = TcpTrouble {
            retransmitted: 3,
            delayed_acks: 9,
        };
        let after = TcpTrouble {
            retransmitted: 5,
            delayed_acks: 10,
        };
        assert_eq!(
            before.since(after),
            TcpTrouble {
                retransmitted: 2,
                delayed_acks: 1
            }
        );
    }
}
