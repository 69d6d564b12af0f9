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
