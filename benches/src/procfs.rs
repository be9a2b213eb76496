//! CPU time and memory of processes, from `/proc`: how much each process of the stack
//! spent per request, measured around a load run.

use std::path::Path;

/// Kernel clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// The fields of `/proc/PID/stat` after the `(comm)` field, which may hold spaces.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = text.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// User + system CPU of `pid` (all its threads) in clock ticks; with `reaped`, plus
/// what its exited children spent (a Postgres backend that ends inside the window).
pub fn cpu_ticks_of(pid: u32, reaped: bool) -> u64 {
    // After the comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    stat_fields(pid)
        .map(|f| {
            let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            get(11) + get(12) + if reaped { get(13) + get(14) } else { 0 }
        })
        .unwrap_or(0)
}

pub fn cpu_ticks(pid: u32) -> u64 {
    cpu_ticks_of(pid, false)
}

fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Every process id on the machine.
fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `root` and its direct children (a Postgres postmaster and its backends).
pub fn with_children(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    pids.extend(
        all_pids()
            .into_iter()
            .filter(|p| *p != root && parent_of(*p) == Some(root)),
    );
    pids
}

/// The process whose command line contains every one of `needles`.
pub fn find_by_cmdline(needles: &[&str]) -> Option<u32> {
    all_pids().into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                let line = String::from_utf8_lossy(&raw).replace('\0', " ");
                needles.iter().all(|n| line.contains(n))
            })
            .unwrap_or(false)
    })
}

/// The postmaster's pid from a data directory's `postmaster.pid`.
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A named group of processes whose CPU is summed (Postgres is many processes).
#[derive(Debug, Clone)]
pub struct Tracked {
    pub name: &'static str,
    pub root: u32,
    /// Children are listed again at each sample: Postgres backends come and go.
    pub include_children: bool,
}

impl Tracked {
    pub fn ticks(&self) -> u64 {
        if self.include_children {
            cpu_ticks_of(self.root, true)
                + with_children(self.root)
                    .into_iter()
                    .filter(|p| *p != self.root)
                    .map(cpu_ticks)
                    .sum::<u64>()
        } else {
            cpu_ticks(self.root)
        }
    }
}

/// CPU ticks of each tracked group at one moment.
pub fn sample(tracked: &[Tracked]) -> Vec<u64> {
    tracked.iter().map(Tracked::ticks).collect()
}
