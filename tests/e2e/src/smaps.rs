//! `/proc/<pid>/smaps` parsing: a VMM's own memory is its RSS minus the RSS of the guest RAM mapping.

/// One mapping of `/proc/<pid>/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Path or pseudo-name (`[heap]`, `/memfd:pc.ram (deleted)`), empty for anonymous mappings.
    pub name: String,
    pub rss_kib: u64,
}

impl Mapping {
    pub fn size(&self) -> u64 {
        self.end - self.start
    }
}

/// Parses smaps text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                // perms offset dev inode [name...]
                let name = fields.skip(4).collect::<Vec<_>>().join(" ");
                out.push(Mapping {
                    start,
                    end,
                    name,
                    rss_kib: 0,
                });
                continue;
            }
        }
        if first == "Rss:" {
            if let (Some(m), Some(v)) = (out.last_mut(), fields.next()) {
                m.rss_kib = v.parse().unwrap_or(0);
            }
        }
    }
    out
}

/// The VMM's memory split into guest RAM and everything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub total_rss_kib: u64,
    /// RSS of the mapping(s) taken to be guest RAM.
    pub guest_rss_kib: u64,
    /// What is left: the VMM's own overhead.
    pub vmm_rss_kib: u64,
    /// How the guest mapping was found.
    pub method: String,
}

/// Splits a process's RSS: mappings exactly `guest_bytes` long are guest RAM (a VMM maps guest RAM as
/// one region below 3 GiB); failing that, the largest mapping at least 90% of `guest_bytes` is.
pub fn split(maps: &[Mapping], guest_bytes: u64) -> Split {
    let total: u64 = maps.iter().map(|m| m.rss_kib).sum();
    let exact: Vec<&Mapping> = maps.iter().filter(|m| m.size() == guest_bytes).collect();
    let (guest, method) = if !exact.is_empty() {
        (
            exact.iter().map(|m| m.rss_kib).sum(),
            format!("{} mapping(s) of exactly the guest size", exact.len()),
        )
    } else if let Some(m) = maps
        .iter()
        .filter(|m| m.size() >= guest_bytes / 10 * 9)
        .max_by_key(|m| m.size())
    {
        (
            m.rss_kib,
            format!(
                "largest mapping ({} KiB) taken as guest RAM",
                m.size() / 1024
            ),
        )
    } else {
        (0, "no guest RAM mapping found".to_owned())
    };
    Split {
        total_rss_kib: total,
        guest_rss_kib: guest,
        vmm_rss_kib: total.saturating_sub(guest),
        method,
    }
}

/// Reads and splits `/proc/<pid>/smaps`.
pub fn split_pid(pid: u32, guest_bytes: u64) -> std::io::Result<Split> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(split(&parse(&text), guest_bytes))
}

/// `VmRSS` of a process in KiB.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1234                       /usr/bin/capsa-vmm
Size:               1024 kB
Rss:                 800 kB
Pss:                 800 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Rss:               30000 kB
7f0020000000-7f0020021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                 100 kB
VmFlags: rd wr mr mw me ac
";

    #[test]
    fn parses_and_splits() {
        let maps = parse(SMAPS);
        assert_eq!(maps.len(), 3);
        assert_eq!(maps[0].name, "/usr/bin/capsa-vmm");
        assert_eq!(maps[1].name, "");
        assert_eq!(maps[1].size(), 256 << 20);
        assert_eq!(maps[2].name, "[heap]");
        let s = split(&maps, 256 << 20);
        assert_eq!(s.total_rss_kib, 30900);
        assert_eq!(s.guest_rss_kib, 30000);
        assert_eq!(s.vmm_rss_kib, 900);
        // No exact match: the largest big-enough mapping.
        let s = split(&maps, 260 << 20);
        assert_eq!(s.guest_rss_kib, 30000);
        // Nothing big enough.
        let s = split(&maps, 1 << 30);
        assert_eq!(s.guest_rss_kib, 0);
        assert_eq!(s.vmm_rss_kib, 30900);
    }

    #[test]
    fn own_process() {
        let pid = std::process::id();
        assert!(split_pid(pid, 1 << 40).unwrap().total_rss_kib > 0);
        assert!(vm_rss_kib(pid).unwrap() > 0);
    }
}
