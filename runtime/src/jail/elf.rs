//! The files a dynamically linked binary needs at exec: its program interpreter (`PT_INTERP`) and the
//! shared libraries the interpreter resolves (`<interp> --list <binary>`, what ldd does, without running
//! the binary). A static binary needs none. Results are cached per binary path and modification time.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use super::JailError;

const PT_INTERP: u32 = 3;

/// The `PT_INTERP` path of a 64-bit little-endian ELF file, `None` for a static binary.
pub fn interpreter(elf: &[u8]) -> Result<Option<PathBuf>, String> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let truncated = || "truncated ELF header".to_string();
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(truncated)?).map_err(|e| e.to_string())?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(truncated)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(truncated)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph).ok_or_else(truncated)? != PT_INTERP {
            continue;
        }
        let off =
            usize::try_from(u64_at(ph + 8).ok_or_else(truncated)?).map_err(|e| e.to_string())?;
        let len =
            usize::try_from(u64_at(ph + 32).ok_or_else(truncated)?).map_err(|e| e.to_string())?;
        let raw = elf
            .get(off..off.saturating_add(len))
            .ok_or_else(|| "PT_INTERP outside the file".to_string())?;
        let raw = raw.split(|b| *b == 0).next().unwrap_or_default();
        use std::os::unix::ffi::OsStrExt;
        return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(raw))));
    }
    Ok(None)
}

/// Absolute library paths in the output of `ld.so --list` (`name => /path (0x...)` and `/path (0x...)`).
pub fn parse_list(out: &str) -> Vec<PathBuf> {
    let mut libs = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') && !libs.iter().any(|l: &PathBuf| l == Path::new(path)) {
            libs.push(PathBuf::from(path));
        }
    }
    libs
}

type Cache = HashMap<PathBuf, (Option<SystemTime>, Vec<PathBuf>)>;
static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// The interpreter and libraries `binary` needs (empty for a static binary).
pub fn runtime_files(binary: &Path) -> Result<Vec<PathBuf>, JailError> {
    let err = |reason: String| JailError::Binary {
        path: binary.to_path_buf(),
        reason,
    };
    let mtime = std::fs::metadata(binary).and_then(|m| m.modified()).ok();
    if let Ok(cache) = CACHE.lock() {
        if let Some((t, files)) = cache.as_ref().and_then(|c| c.get(binary)) {
            if *t == mtime {
                return Ok(files.clone());
            }
        }
    }
    let mut head = Vec::new();
    std::fs::File::open(binary)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .map_err(|e| err(e.to_string()))?;
    let files = match interpreter(&head).map_err(err)? {
        None => Vec::new(),
        Some(interp) => {
            let out = std::process::Command::new(&interp)
                .arg("--list")
                .arg(binary)
                .output()
                .map_err(|e| err(format!("cannot run {} --list: {e}", interp.display())))?;
            if !out.status.success() {
                return Err(err(format!(
                    "{} --list failed: {}",
                    interp.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let mut files = vec![interp.clone()];
            for l in parse_list(&String::from_utf8_lossy(&out.stdout)) {
                if !files.contains(&l) {
                    files.push(l);
                }
            }
            files
        }
    };
    if let Ok(mut cache) = CACHE.lock() {
        cache
            .get_or_insert_with(HashMap::new)
            .insert(binary.to_path_buf(), (mtime, files.clone()));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ld_so_list_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                   \tlibmissing.so => not found\n";
        assert_eq!(
            parse_list(out),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn a_dynamic_binary_needs_its_loader_and_libc() {
        let sh = Path::new("/bin/sh");
        let files = runtime_files(sh).unwrap();
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("ld-linux")),
            "{files:?}"
        );
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("libc.so")),
            "{files:?}"
        );
        for f in &files {
            assert!(f.exists(), "{}", f.display());
        }
    }

    #[test]
    fn non_elf_is_refused_naming_the_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("script");
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        let e = runtime_files(&p).unwrap_err();
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        assert!(interpreter(b"\x7fELF").is_err());
    }
}
