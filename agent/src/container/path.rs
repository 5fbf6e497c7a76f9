//! Path checks for paths a container spec controls: mount destinations, rootfs sub-paths, exec cwd.
//!
//! A path from the host is resolved inside a root directory component by component, following
//! symlinks the way the kernel would *if the root were `/`*, and refused when it would leave the root,
//! lexically (`..`) or through a symlink (absolute or relative). Refusing (instead of clamping like
//! `securejoin`) is deliberate: a spec that tries to escape is hostile or broken and the host should
//! hear about it.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path {0:?} is not absolute")]
    NotAbsolute(PathBuf),
    #[error("path {0:?} escapes its root through \"..\"")]
    DotDotEscape(PathBuf),
    #[error("path {path:?} escapes its root through the symlink {link:?} -> {target:?}")]
    SymlinkEscape {
        path: PathBuf,
        link: PathBuf,
        target: PathBuf,
    },
    #[error("path {0:?} has too many levels of symlinks")]
    TooManySymlinks(PathBuf),
    #[error("path {0:?} contains a NUL byte")]
    Nul(PathBuf),
    #[error("cannot inspect {path:?}: {err}")]
    Io { path: PathBuf, err: String },
}

const MAX_SYMLINKS: usize = 40;

/// Lexically cleans an absolute path and refuses one whose `..` would climb above `/`.
/// `/a/./b//c/../d` → `/a/b/d`; `/a/../../b` → error.
pub fn clean_absolute(path: &Path) -> Result<PathBuf, PathError> {
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(PathError::Nul(path.to_path_buf()));
    }
    if !path.is_absolute() {
        return Err(PathError::NotAbsolute(path.to_path_buf()));
    }
    let mut parts: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(PathError::DotDotEscape(path.to_path_buf()));
                }
            }
            Component::Normal(p) => parts.push(p.to_os_string()),
        }
    }
    let mut out = PathBuf::from("/");
    out.extend(parts);
    Ok(out)
}

/// Resolves `unsafe_path` (absolute, as the container sees it) inside `root` (a host path), following
/// symlinks that exist under `root`, and returns the host path. Components that do not exist yet are
/// taken literally (the runtime creates them). Errors if the path leaves `root`.
pub fn resolve_in_root(root: &Path, unsafe_path: &Path) -> Result<PathBuf, PathError> {
    // Check the lexical form first so a plain `..` escape is reported as such.
    clean_absolute(unsafe_path)?;
    // Pending components, processed front to back; symlink targets are spliced in front.
    let mut pending: Vec<OsString> = comps(unsafe_path);
    pending.reverse();
    // The resolved path relative to root, as components.
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    let mut missing = false;
    while let Some(part) = pending.pop() {
        if part == ".." {
            if resolved.pop().is_none() {
                return Err(PathError::DotDotEscape(unsafe_path.to_path_buf()));
            }
            continue;
        }
        resolved.push(part);
        if missing {
            continue;
        }
        let host = join_parts(root, &resolved);
        match std::fs::symlink_metadata(&host) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(PathError::TooManySymlinks(unsafe_path.to_path_buf()));
                }
                let target = std::fs::read_link(&host).map_err(|e| PathError::Io {
                    path: host.clone(),
                    err: e.to_string(),
                })?;
                let link_in_root = join_parts(Path::new("/"), &resolved);
                resolved.pop();
                if target.is_absolute() {
                    // An absolute target means the container's `/`, which is `root`: a runtime
                    // following it on the host would leave the root, so it is an escape.
                    return Err(PathError::SymlinkEscape {
                        path: unsafe_path.to_path_buf(),
                        link: link_in_root,
                        target,
                    });
                }
                // Relative target: splice its components; an escape shows up as `..` underflow.
                let mut t = comps(&target);
                t.reverse();
                // Check the relative target does not climb above root from here.
                let mut depth = resolved.len() as isize;
                for c in t.iter().rev() {
                    if c == ".." {
                        depth -= 1;
                        if depth < 0 {
                            return Err(PathError::SymlinkEscape {
                                path: unsafe_path.to_path_buf(),
                                link: link_in_root,
                                target,
                            });
                        }
                    } else {
                        depth += 1;
                    }
                }
                pending.extend(t);
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing = true,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => missing = true,
            Err(e) => {
                return Err(PathError::Io {
                    path: host,
                    err: e.to_string(),
                })
            }
        }
    }
    Ok(join_parts(root, &resolved))
}

/// Creates the directory `path` (as the container sees it) inside `root` if it does not exist, the
/// way runc creates a missing `process.cwd`: resolved with [`resolve_in_root`], so nothing is created
/// outside the root. Returns whether it created anything; a path that resolves outside the root is
/// left alone (`Ok(false)`: the runtime then reports the cwd as it finds it).
pub fn create_dir_in_root(root: &Path, path: &Path) -> std::io::Result<bool> {
    let Ok(host) = resolve_in_root(root, path) else {
        return Ok(false);
    };
    if std::fs::symlink_metadata(&host).is_ok() {
        return Ok(false);
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&host)?;
    Ok(true)
}

fn comps(p: &Path) -> Vec<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

fn join_parts(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

/// A container or exec id: 1..=128 of `[A-Za-z0-9_.-]`, not starting with `.` (it becomes a directory
/// name and a cgroup name).
pub fn check_id(kind: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("{kind} id {id:?} must be 1 to 128 characters"));
    }
    if id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(format!(
            "{kind} id {id:?} may only contain letters, digits, '_', '-' and '.' and must not start with '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn clean_absolute_normalises_and_refuses_escape() {
        assert_eq!(
            clean_absolute(Path::new("/a/./b//c/../d")).unwrap(),
            PathBuf::from("/a/b/d")
        );
        assert_eq!(clean_absolute(Path::new("/")).unwrap(), PathBuf::from("/"));
        assert!(matches!(
            clean_absolute(Path::new("/a/../../etc")),
            Err(PathError::DotDotEscape(_))
        ));
        assert!(matches!(
            clean_absolute(Path::new("relative/x")),
            Err(PathError::NotAbsolute(_))
        ));
    }

    #[test]
    fn resolve_plain_and_missing_paths() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("usr/lib")).unwrap();
        assert_eq!(
            resolve_in_root(d.path(), Path::new("/usr/lib")).unwrap(),
            d.path().join("usr/lib")
        );
        // Components that do not exist yet are taken literally.
        assert_eq!(
            resolve_in_root(d.path(), Path::new("/usr/new/dir")).unwrap(),
            d.path().join("usr/new/dir")
        );
        assert_eq!(
            resolve_in_root(d.path(), Path::new("/usr/lib/../share")).unwrap(),
            d.path().join("usr/share")
        );
    }

    #[test]
    fn resolve_refuses_dotdot_escape() {
        let d = tempfile::tempdir().unwrap();
        let err = resolve_in_root(d.path(), Path::new("/../../etc/shadow")).unwrap_err();
        assert!(matches!(err, PathError::DotDotEscape(_)), "{err}");
        assert!(err.to_string().contains(".."));
    }

    #[test]
    fn resolve_follows_symlinks_inside_root() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("real/dir")).unwrap();
        symlink("real", d.path().join("link")).unwrap();
        symlink("../real/dir", d.path().join("real/up")).unwrap();
        assert_eq!(
            resolve_in_root(d.path(), Path::new("/link/dir")).unwrap(),
            d.path().join("real/dir")
        );
        assert_eq!(
            resolve_in_root(d.path(), Path::new("/link/up/x")).unwrap(),
            d.path().join("real/dir/x")
        );
    }

    #[test]
    fn resolve_refuses_symlink_escapes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        symlink("/etc", d.path().join("abs")).unwrap();
        symlink("../../..", d.path().join("a/rel")).unwrap();
        let err = resolve_in_root(d.path(), Path::new("/abs/passwd")).unwrap_err();
        assert!(matches!(err, PathError::SymlinkEscape { .. }), "{err}");
        assert!(err.to_string().contains("symlink"), "{err}");
        let err = resolve_in_root(d.path(), Path::new("/a/rel/etc")).unwrap_err();
        assert!(matches!(err, PathError::SymlinkEscape { .. }), "{err}");
    }

    #[test]
    fn resolve_refuses_symlink_loops() {
        let d = tempfile::tempdir().unwrap();
        symlink("loop2", d.path().join("loop1")).unwrap();
        symlink("loop1", d.path().join("loop2")).unwrap();
        assert!(matches!(
            resolve_in_root(d.path(), Path::new("/loop1/x")),
            Err(PathError::TooManySymlinks(_))
        ));
    }

    #[test]
    fn ids() {
        assert!(check_id("container", "web-1_a.b").is_ok());
        assert!(check_id("container", "").is_err());
        assert!(check_id("container", "../x").is_err());
        assert!(check_id("container", ".hidden").is_err());
        assert!(check_id("container", "a/b").is_err());
        assert!(check_id("container", &"x".repeat(129)).is_err());
    }

    #[test]
    fn a_missing_cwd_is_created_inside_the_root_only() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("srv")).unwrap();
        assert!(create_dir_in_root(&root, Path::new("/work/dir")).unwrap());
        assert!(root.join("work/dir").is_dir());
        assert!(!create_dir_in_root(&root, Path::new("/work/dir")).unwrap());
        assert!(!create_dir_in_root(&root, Path::new("/srv")).unwrap());
        // Through a symlink that leaves the root: nothing is created anywhere.
        std::os::unix::fs::symlink("/", root.join("out")).unwrap();
        assert!(!create_dir_in_root(&root, Path::new("/out/capsa-cwd-test")).unwrap());
        assert!(!Path::new("/capsa-cwd-test").exists());
        std::os::unix::fs::symlink("../..", root.join("up")).unwrap();
        assert!(!create_dir_in_root(&root, Path::new("/up/escaped")).unwrap());
        assert!(!d.path().join("escaped").exists());
    }
}
