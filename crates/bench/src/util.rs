//! Measuring helpers: a server's CPU and memory from /proc, our own CPU, latency percentiles,
//! failure counts, file-descriptor limits and free ports.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::Serialize;

/// CPU seconds (user + system, every thread, dead ones included) a process has used so far,
/// from fields 14 and 15 of `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = stat.rfind(')').map(|i| &stat[i + 1..]).ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(|| anyhow!("unreadable /proc/{pid}/stat"))
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Resident memory now and at its peak (`VmRSS`, `VmHWM` of `/proc/<pid>/status`), KiB.
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU seconds this process (the load generator) has used so far.
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// CPU seconds the whole machine has been busy (every process, all cores), from /proc/stat.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum::<u64>();
    busy as f64 / clock_ticks()
}

/// A TCP extension counter of the network namespace (`ListenOverflows`, ...), from /proc/net/netstat.
pub fn tcp_ext(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Raises RLIMIT_NOFILE (soft and, when allowed, hard) to at least `want`; children started
/// afterwards inherit it. Returns the soft limit in force.
pub fn raise_nofile(want: u64) -> u64 {
    // SAFETY: plain get/setrlimit on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur >= want {
            return lim.rlim_cur;
        }
        // Privileged: raise the hard limit too (up to the kernel's nr_open).
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(lim.rlim_max);
        let raised = libc::rlimit { rlim_cur: want.min(nr_open), rlim_max: want.min(nr_open).max(lim.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return raised.rlim_cur;
        }
        // Unprivileged: as far as the hard limit allows.
        let soft = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return soft.rlim_cur;
        }
        lim.rlim_cur
    }
}

/// A loopback port nobody listens on right now (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Latency samples.
#[derive(Default)]
pub struct Latencies(Vec<Duration>);

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latencies {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }
    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }
    /// Nearest-rank percentiles.
    pub fn summary(&mut self) -> Summary {
        self.0.sort_unstable();
        let n = self.0.len();
        if n == 0 {
            return Summary::default();
        }
        let at = |p: f64| {
            let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
            self.0[rank - 1].as_secs_f64() * 1e3
        };
        Summary { count: n, p50_ms: at(0.50), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

/// Failures counted by reason.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Failures(pub BTreeMap<String, usize>);

impl Failures {
    pub fn add(&mut self, reason: impl Into<String>) {
        *self.0.entry(reason.into()).or_default() += 1;
    }
    pub fn merge(&mut self, other: Failures) {
        for (k, v) in other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
    pub fn total(&self) -> usize {
        self.0.values().sum()
    }
    pub fn describe(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0.iter().map(|(k, v)| format!("{v}× {k}")).collect::<Vec<_>>().join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut l = Latencies::default();
        for ms in 1..=100 {
            l.push(Duration::from_millis(ms));
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(Latencies::default().summary().count, 0);
    }

    #[test]
    fn own_process_figures() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        let (rss, hwm) = memory_kib(pid).unwrap();
        assert!(rss > 0 && hwm >= rss);
    }
}
