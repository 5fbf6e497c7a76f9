//! One unprivileged uid (and the gid of the same number) per live sandbox, from a configured range.
//!
//! A uid is held by an exclusive `flock` on `<lock dir>/<uid>` for as long as the [`UidLease`] lives. The
//! kernel drops the lock when its holder dies, so a dead shim's uid is free again at once (its stale file is
//! reused, or removed by [`sweep_stale`]). A uid whose lock is free but that a live process still runs as
//! (a VMM that outlived its shim) is skipped: the caller passes the uids in use ([`uids_in_use`]).
//! Releasing unlinks the file while still holding the lock; an allocator that locked a file which was unlinked
//! meanwhile sees a different inode at the path and tries again, so two holders never share a uid.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::JailError;

/// A range of uids (and the gids of the same numbers) for jails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub base: u32,
    pub count: u32,
}

impl UidRange {
    pub fn contains(&self, uid: u32) -> bool {
        uid >= self.base && uid - self.base < self.count
    }

    /// Refuses ranges that reach root, `nobody` (65534) or the invalid id `(uid_t)-1`, or that overflow.
    pub fn validate(&self) -> Result<(), JailError> {
        let bad = |reason: &str| {
            Err(JailError::Config(format!(
                "jail uid range {}+{}: {reason}",
                self.base, self.count
            )))
        };
        if self.count == 0 {
            return bad("empty");
        }
        let Some(last) = self.base.checked_add(self.count - 1) else {
            return bad("overflows u32");
        };
        if self.base == 0 {
            return bad("includes root (0)");
        }
        if last == u32::MAX || (self.base <= 65534 && last >= 65534) {
            return bad("includes nobody (65534) or (uid_t)-1");
        }
        Ok(())
    }
}

/// An allocated uid; released (lock file removed) on drop.
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    path: PathBuf,
    file: Option<File>,
}

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        // Unlink while holding the lock, then unlock by closing.
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove jail uid lock");
            }
        }
        drop(self.file.take());
    }
}

fn try_flock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a valid, owned fd; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Opens and locks `path`; `None` when another holder has it. Retries when the file was unlinked between
/// open and lock (a release racing with us).
fn lock_file(path: &Path) -> Result<Option<File>, JailError> {
    let io = |source| JailError::Io {
        what: "jail uid lock",
        path: path.to_path_buf(),
        source,
    };
    let mut tries = 0;
    loop {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path);
        let file = match opened {
            Ok(f) => f,
            // The directory was pruned by a sandbox that just ended: make it again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 10 => {
                tries += 1;
                if let Some(dir) = path.parent() {
                    use std::os::unix::fs::DirBuilderExt;
                    let _ = std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir);
                }
                continue;
            }
            Err(e) => return Err(io(e)),
        };
        if !try_flock(&file).map_err(io)? {
            return Ok(None);
        }
        let held = file.metadata().map_err(io)?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(Some(file)),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(e)),
        }
    }
}

/// Allocates the first uid of `range` that is neither locked nor in `in_use`; the lock file records
/// `owner` (the sandbox id) so that a dead shim's cleanup can find it.
pub fn allocate(
    lock_dir: &Path,
    range: UidRange,
    in_use: &HashSet<u32>,
    owner: &str,
) -> Result<UidLease, JailError> {
    range.validate()?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(lock_dir)
            .map_err(|source| JailError::Io {
                what: "jail uid lock directory",
                path: lock_dir.to_path_buf(),
                source,
            })?;
    }
    for i in 0..range.count {
        let uid = range.base + i;
        if in_use.contains(&uid) {
            continue;
        }
        let path = lock_dir.join(uid.to_string());
        let Some(mut file) = lock_file(&path)? else {
            continue;
        };
        // Informational (and for cleanup): who holds it.
        let _ = file.set_len(0);
        let _ = writeln!(file, "{owner} {}", std::process::id());
        return Ok(UidLease {
            uid,
            path,
            file: Some(file),
        });
    }
    Err(JailError::UidsExhausted {
        base: range.base,
        count: range.count,
        lock_dir: lock_dir.to_path_buf(),
    })
}

/// Removes lock files nobody holds (their shims died); with `owner`, only those naming that sandbox.
/// Returns the uids freed.
pub fn sweep_stale(lock_dir: &Path, owner: Option<&str>) -> Vec<u32> {
    let mut freed = Vec::new();
    for entry in std::fs::read_dir(lock_dir).into_iter().flatten().flatten() {
        let Some(uid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if let Some(owner) = owner {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.split_whitespace().next() != Some(owner) {
                continue;
            }
        }
        if let Ok(Some(file)) = lock_file(&path) {
            let _ = std::fs::remove_file(&path);
            drop(file);
            freed.push(uid);
        }
    }
    freed
}

/// The uids in `range` that live processes run as (the owner of `/proc/<pid>`, the effective uid of a
/// dumpable process; a VMM is dumpable after its exec).
pub fn uids_in_use(range: UidRange) -> HashSet<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.uid())
        .filter(|u| range.contains(*u))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: UidRange = UidRange {
        base: 1_900_000_000,
        count: 3,
    };

    #[test]
    fn ranges_are_validated() {
        assert!(R.validate().is_ok());
        for bad in [
            UidRange { base: 0, count: 10 },
            UidRange {
                base: 65000,
                count: 1000,
            },
            UidRange {
                base: u32::MAX - 1,
                count: 5,
            },
            UidRange {
                base: u32::MAX - 1,
                count: 2,
            },
            UidRange { base: 5, count: 0 },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn allocation_is_exclusive_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let none = HashSet::new();
        let a = allocate(d.path(), R, &none, "sb-a").unwrap();
        let b = allocate(d.path(), R, &none, "sb-b").unwrap();
        assert_eq!(a.uid(), R.base);
        assert_eq!(b.uid(), R.base + 1);
        assert!(std::fs::read_to_string(a.path())
            .unwrap()
            .starts_with("sb-a "));
        let c = allocate(d.path(), R, &none, "sb-c").unwrap();
        let err = allocate(d.path(), R, &none, "sb-d").unwrap_err();
        assert!(matches!(err, JailError::UidsExhausted { .. }), "{err}");
        assert!(err.to_string().contains(&d.path().display().to_string()));
        let a_path = a.path().to_path_buf();
        drop(a);
        assert!(!a_path.exists(), "lock file left behind");
        let again = allocate(d.path(), R, &none, "sb-e").unwrap();
        assert_eq!(again.uid(), R.base);
        drop((b, c, again));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn uids_in_use_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let busy: HashSet<u32> = [R.base].into();
        let a = allocate(d.path(), R, &busy, "sb").unwrap();
        assert_eq!(a.uid(), R.base + 1);
    }

    #[test]
    fn a_dead_holders_lock_is_recovered() {
        let d = tempfile::tempdir().unwrap();
        // Another process (flock(1), standing in for a shim) takes the lock on R.base and dies without
        // removing the file.
        let path = d.path().join(R.base.to_string());
        std::fs::write(&path, "dead-sb 1\n").unwrap();
        let status = std::process::Command::new("flock")
            .arg("-n")
            .arg(&path)
            .arg("true")
            .status()
            .expect("flock(1) from util-linux");
        assert!(status.success());
        assert!(path.exists());
        // The stale file is there but unlocked: allocation reuses the uid.
        let a = allocate(d.path(), R, &HashSet::new(), "sb-new").unwrap();
        assert_eq!(a.uid(), R.base);
        // While held, a sweep leaves it alone...
        assert!(sweep_stale(d.path(), None).is_empty());
        assert!(a.path().exists());
        // ...and a stale file of another sandbox is removed by the sweep for that owner only.
        let stale = d.path().join((R.base + 2).to_string());
        std::fs::write(&stale, "other 1\n").unwrap();
        assert!(sweep_stale(d.path(), Some("nobody-else")).is_empty());
        assert_eq!(sweep_stale(d.path(), Some("other")), vec![R.base + 2]);
        assert!(!stale.exists());
    }

    #[test]
    fn a_lock_held_by_another_open_file_is_respected() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(R.base.to_string());
        // Another holder (a different open file description, as another shim would have).
        let other = lock_file(&path).unwrap().unwrap();
        let a = allocate(d.path(), R, &HashSet::new(), "sb").unwrap();
        assert_eq!(a.uid(), R.base + 1);
        drop(other);
    }

    #[test]
    fn own_uid_shows_as_in_use() {
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        let r = UidRange {
            base: me.max(1),
            count: 1,
        };
        if me >= 1 {
            assert!(uids_in_use(r).contains(&me));
        }
    }
}
