//! Facts about the guest for GetGuestDetails: kernel release, vCPUs, memory, boot time.

use std::time::{SystemTime, UNIX_EPOCH};

use capsa_proto::agent::GuestDetailsResponse;
use nix::time::{clock_gettime, ClockId};

/// Errors reading guest facts.
#[derive(Debug, thiserror::Error)]
pub enum GuestDetailsError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("{0} not found in /proc/meminfo")]
    MeminfoField(&'static str),
    #[error("clock_gettime(CLOCK_BOOTTIME): {0}")]
    Clock(nix::Error),
}

/// Memory figures from /proc/meminfo, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub total_bytes: u64,
    /// MemAvailable (absent on very old kernels: 0).
    pub available_bytes: u64,
}

/// Value of one `/proc/meminfo` field (`Key:   1234 kB`), in bytes.
fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, rest) = line.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        let multiplier = match parts.next() {
            None => 1,
            Some(u) if u.eq_ignore_ascii_case("kB") => 1024,
            Some(_) => return None,
        };
        value.checked_mul(multiplier)
    })
}

/// Parses the text of /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Result<MemInfo, GuestDetailsError> {
    let total_bytes =
        meminfo_field(text, "MemTotal").ok_or(GuestDetailsError::MeminfoField("MemTotal"))?;
    let available_bytes = meminfo_field(text, "MemAvailable").unwrap_or(0);
    Ok(MemInfo {
        total_bytes,
        available_bytes,
    })
}

fn read(path: &'static str) -> Result<String, GuestDetailsError> {
    std::fs::read_to_string(path).map_err(|source| GuestDetailsError::Read { path, source })
}

/// Time since the kernel booted (CLOCK_BOOTTIME), in nanoseconds.
pub fn uptime_ns() -> Result<u64, GuestDetailsError> {
    let ts = clock_gettime(ClockId::CLOCK_BOOTTIME).map_err(GuestDetailsError::Clock)?;
    let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// Number of online CPUs (sysconf(_SC_NPROCESSORS_ONLN)).
pub fn online_cpus() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(0)
}

/// Everything that does not change while the agent runs.
#[derive(Debug, Clone)]
pub struct AgentFacts {
    /// Guest uptime when the agent started, ns.
    pub start_uptime_ns: u64,
    /// Whether the agent is the guest's PID 1.
    pub is_init: bool,
}

/// Collects GetGuestDetails' answer.
pub fn collect(facts: &AgentFacts) -> Result<GuestDetailsResponse, GuestDetailsError> {
    let mem = parse_meminfo(&read("/proc/meminfo")?)?;
    let uptime = uptime_ns()?;
    let now_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);

    let mut r = GuestDetailsResponse::new();
    r.kernel_release = read("/proc/sys/kernel/osrelease")?.trim().to_string();
    r.agent_version = env!("CARGO_PKG_VERSION").to_string();
    r.online_cpus = online_cpus();
    r.mem_total_bytes = mem.total_bytes;
    r.mem_available_bytes = mem.available_bytes;
    r.uptime_ns = uptime;
    r.boot_time_unix_ns = now_unix_ns.saturating_sub(uptime);
    r.agent_start_uptime_ns = facts.start_uptime_ns;
    r.agent_is_init = facts.is_init;
    r.kernel_cmdline = read("/proc/cmdline")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    // Filled in as storage.rs learns drivers.
    r.storage_drivers = Vec::new();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "MemTotal:         121432 kB
MemFree:           97820 kB
MemAvailable:      95112 kB
Buffers:               0 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
";

    #[test]
    fn meminfo_sample() {
        let m = parse_meminfo(SAMPLE).expect("parses");
        assert_eq!(m.total_bytes, 121_432 * 1024);
        assert_eq!(m.available_bytes, 95_112 * 1024);
        assert_eq!(meminfo_field(SAMPLE, "HugePages_Total"), Some(0));
        assert_eq!(meminfo_field(SAMPLE, "Mem"), None);
    }

    #[test]
    fn meminfo_missing_total() {
        assert!(matches!(
            parse_meminfo("MemFree: 1 kB\n"),
            Err(GuestDetailsError::MeminfoField("MemTotal"))
        ));
        assert!(parse_meminfo("MemTotal: lots kB\n").is_err());
        assert!(parse_meminfo("").is_err());
    }

    #[test]
    fn meminfo_no_available() {
        let m = parse_meminfo("MemTotal: 2048 kB\n").expect("parses");
        assert_eq!(
            m,
            MemInfo {
                total_bytes: 2048 * 1024,
                available_bytes: 0
            }
        );
    }

    #[test]
    fn collect_on_this_machine() {
        let facts = AgentFacts {
            start_uptime_ns: 1,
            is_init: false,
        };
        let d = collect(&facts).expect("collect");
        assert!(!d.kernel_release.is_empty());
        assert!(d.online_cpus >= 1);
        assert!(d.mem_total_bytes > 0);
        assert!(d.uptime_ns > 0);
    }
}
