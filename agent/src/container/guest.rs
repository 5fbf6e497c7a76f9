//! Sandbox-wide guest calls that sit next to the containers: the clock, files copied in from the
//! host, metrics.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use capsa_proto::agent::CopyFileRequest;

use super::path::clean_absolute;
use super::ContainerError;

/// Files the host may write with CopyFile live under this directory (Kata restricts it the same
/// way: a CopyFile anywhere would let the host overwrite the agent).
pub const COPY_ROOT: &str = "/run/capsa/shared";
/// Largest file CopyFile accepts.
const MAX_COPY: i64 = 256 << 20;

pub fn set_time(sec: i64, usec: i64) -> Result<(), ContainerError> {
    if !(0..1_000_000).contains(&usec) || sec < 0 {
        return Err(ContainerError::InvalidArgument(format!(
            "bad time {sec}.{usec:06}"
        )));
    }
    let ts = nix::sys::time::TimeSpec::new(sec, usec * 1000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| ContainerError::Internal(format!("clock_settime: {e}")))
}

pub fn copy_file(req: &CopyFileRequest) -> Result<(), ContainerError> {
    copy_file_under(Path::new(COPY_ROOT), req)
}

pub fn copy_file_under(root: &Path, req: &CopyFileRequest) -> Result<(), ContainerError> {
    let bad = |m: String| ContainerError::InvalidArgument(m);
    let p = clean_absolute(Path::new(&req.path)).map_err(|e| bad(format!("CopyFile: {e}")))?;
    if !p.starts_with(root) || p == root {
        return Err(bad(format!(
            "CopyFile: {:?} is not under {}",
            req.path,
            root.display()
        )));
    }
    // Refuse symlinks on the way (a container could have planted one in a shared directory).
    let rel = p.strip_prefix(root).unwrap_or(Path::new(""));
    let resolved = super::path::resolve_in_root(root, &Path::new("/").join(rel))
        .map_err(|e| bad(format!("CopyFile: {e}")))?;
    if resolved != p {
        return Err(bad(format!(
            "CopyFile: {:?} goes through a symlink",
            req.path
        )));
    }
    if req.file_size < 0 || req.file_size > MAX_COPY || req.offset < 0 {
        return Err(bad(format!(
            "CopyFile: size {} / offset {} out of range (max {MAX_COPY})",
            req.file_size, req.offset
        )));
    }
    let end = req.offset.saturating_add(req.data.len() as i64);
    if end > req.file_size {
        return Err(bad(format!(
            "CopyFile: chunk ends at {end}, past the file size {}",
            req.file_size
        )));
    }
    let io =
        |what: &str, e: std::io::Error| ContainerError::Internal(format!("CopyFile {what}: {e}"));
    let parent: PathBuf = p
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.to_path_buf());
    if !parent.exists() {
        std::fs::create_dir_all(&parent).map_err(|e| io("mkdir", e))?;
        if req.dir_mode != 0 {
            let _ = std::fs::set_permissions(
                &parent,
                std::fs::Permissions::from_mode(req.dir_mode & 0o7777),
            );
        }
    }
    let mode = if req.file_mode == 0 {
        0o644
    } else {
        req.file_mode & 0o7777
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(req.offset == 0)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
        .map_err(|e| io("open", e))?;
    f.seek(SeekFrom::Start(req.offset as u64))
        .map_err(|e| io("seek", e))?;
    f.write_all(&req.data).map_err(|e| io("write", e))?;
    let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode));
    let _ = nix::unistd::chown(
        &p,
        Some(nix::unistd::Uid::from_raw(req.uid)),
        Some(nix::unistd::Gid::from_raw(req.gid)),
    );
    Ok(())
}

/// A few guest metrics in Prometheus text format.
pub fn metrics() -> String {
    let mut out = String::new();
    if let Ok(s) = std::fs::read_to_string("/proc/loadavg") {
        if let Some(l) = s.split_whitespace().next() {
            out.push_str(&format!(
                "# TYPE capsa_guest_load1 gauge\ncapsa_guest_load1 {l}\n"
            ));
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/meminfo") {
        for line in s.lines() {
            for (key, name) in [
                ("MemTotal:", "mem_total"),
                ("MemAvailable:", "mem_available"),
            ] {
                if let Some(v) = line.strip_prefix(key) {
                    let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    out.push_str(&format!(
                        "# TYPE capsa_guest_{name}_bytes gauge\ncapsa_guest_{name}_bytes {}\n",
                        kb * 1024
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &Path, size: i64, offset: i64, data: &[u8]) -> CopyFileRequest {
        let mut r = CopyFileRequest::new();
        r.path = path.to_string_lossy().into_owned();
        r.file_size = size;
        r.offset = offset;
        r.data = data.to_vec();
        r.file_mode = 0o600;
        r.uid = nix::unistd::getuid().as_raw();
        r.gid = nix::unistd::getgid().as_raw();
        r
    }

    #[test]
    fn copies_in_chunks_and_refuses_escapes() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let f = root.join("etc/hosts");
        copy_file_under(root, &req(&f, 10, 0, b"hello")).unwrap();
        copy_file_under(root, &req(&f, 10, 5, b"world")).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"helloworld");
        assert!(copy_file_under(root, &req(&f, 4, 0, b"hello")).is_err());
        assert!(copy_file_under(root, &req(Path::new("/etc/passwd"), 1, 0, b"x")).is_err());
        let esc = PathBuf::from(format!("{}/../x", root.display()));
        assert!(copy_file_under(root, &req(&esc, 1, 0, b"x")).is_err());
        std::os::unix::fs::symlink("/tmp", root.join("link")).unwrap();
        let err = copy_file_under(root, &req(&root.join("link/x"), 1, 0, b"x")).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(metrics().contains("capsa_guest_mem_total_bytes"));
        assert!(set_time(1, 2_000_000).is_err());
    }
}
