//! Unpacks an OCI image archive (a tar of an OCI image layout: `oci-layout`, `index.json`,
//! `blobs/sha256/...`, as `skopeo copy ... oci-archive:` or `tests/e2e/scripts/busybox-oci.sh` write it,
//! or a `docker save` tar with `manifest.json`) into a root file system directory for `capsa run`.
//!
//! Layers are applied in order; gzip layers are detected by their magic bytes. Whiteouts follow the OCI
//! image spec: `.wh.<name>` deletes `<name>` from the lower layers, `.wh..wh..opq` empties its directory of
//! everything the lower layers put there. Nothing is written or deleted outside the target directory.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
const MANIFEST_LIST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image archive: {0}")]
    Format(String),
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Entry {
        layer: String,
        entry: String,
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the image's configuration says about how to run it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
}

impl ImageConfig {
    fn from_json(v: &Value) -> Self {
        let c = &v["config"];
        let strings = |x: &Value| -> Vec<String> {
            x.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        ImageConfig {
            env: strings(&c["Env"]),
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_owned(),
        }
    }
}

/// True when `path` looks like an image archive (a tar holding `index.json` or `manifest.json`).
pub fn is_image_archive(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    let mut ar = tar::Archive::new(BufReader::new(f));
    let Ok(entries) = ar.entries() else {
        return false;
    };
    for e in entries {
        let Ok(e) = e else { return false };
        let Ok(p) = e.path() else { return false };
        let p = p.to_string_lossy().trim_start_matches("./").to_owned();
        if p == "index.json" || p == "manifest.json" {
            return true;
        }
    }
    false
}

/// Reads the archive's layout files and blobs into `blobs_dir` (flat: `<algo>/<hex>` kept as is).
fn extract_archive(archive: &Path, dir: &Path) -> Result<(), ImageError> {
    let f = File::open(archive).map_err(io(archive))?;
    let mut ar = tar::Archive::new(BufReader::new(f));
    ar.set_preserve_permissions(false);
    ar.set_unpack_xattrs(false);
    for entry in ar.entries().map_err(io(archive))? {
        let mut entry = entry.map_err(io(archive))?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        // unpack_in refuses paths that would leave `dir`.
        entry.unpack_in(dir).map_err(io(archive))?;
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value, ImageError> {
    let text = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text)
        .map_err(|e| ImageError::Format(format!("{}: {e}", path.display())))
}

/// `sha256:<hex>` → `<dir>/blobs/sha256/<hex>`, refusing anything but a plain digest.
fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let (algo, hex) = digest
        .split_once(':')
        .ok_or_else(|| ImageError::Format(format!("bad digest {digest:?}")))?;
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !ok(algo) || !ok(hex) {
        return Err(ImageError::Format(format!("bad digest {digest:?}")));
    }
    Ok(dir.join("blobs").join(algo).join(hex))
}

/// Inside-archive path from `manifest.json` (docker save), refusing `..` and absolute paths.
fn relative(dir: &Path, p: &str) -> Result<PathBuf, ImageError> {
    let rel = Path::new(p);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(ImageError::Format(format!(
            "bad path {p:?} in manifest.json"
        )));
    }
    Ok(dir.join(rel))
}

fn is_amd64_linux(m: &Value) -> bool {
    let p = &m["platform"];
    p.is_null()
        || (p["os"] == "linux"
            && p["architecture"] == std::env::consts::ARCH.replace("x86_64", "amd64"))
}

/// Finds the config and the ordered layer files of the image in an extracted archive.
fn resolve(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>), ImageError> {
    if dir.join("index.json").exists() {
        let mut desc = read_json(&dir.join("index.json"))?;
        // index → (nested index →) manifest
        for _ in 0..4 {
            let is_index = desc["manifests"].is_array()
                && (desc["mediaType"].is_null()
                    || MANIFEST_LIST_TYPES.contains(&desc["mediaType"].as_str().unwrap_or("")));
            if !is_index {
                break;
            }
            let manifests = desc["manifests"].as_array().cloned().unwrap_or_default();
            let m = manifests
                .iter()
                .find(|m| is_amd64_linux(m))
                .ok_or_else(|| ImageError::Format("no linux/amd64 manifest in the index".into()))?;
            let digest = m["digest"]
                .as_str()
                .ok_or_else(|| ImageError::Format("manifest without a digest".into()))?;
            desc = read_json(&blob_path(dir, digest)?)?;
        }
        let config = desc["config"]["digest"]
            .as_str()
            .ok_or_else(|| ImageError::Format("manifest without a config".into()))?;
        let layers = desc["layers"]
            .as_array()
            .ok_or_else(|| ImageError::Format("manifest without layers".into()))?
            .iter()
            .map(|l| {
                let d = l["digest"]
                    .as_str()
                    .ok_or_else(|| ImageError::Format("layer without a digest".into()))?;
                blob_path(dir, d)
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((blob_path(dir, config)?, layers));
    }
    if dir.join("manifest.json").exists() {
        let m = read_json(&dir.join("manifest.json"))?;
        let first = &m[0];
        let config = first["Config"]
            .as_str()
            .ok_or_else(|| ImageError::Format("manifest.json without Config".into()))?;
        let layers = first["Layers"]
            .as_array()
            .ok_or_else(|| ImageError::Format("manifest.json without Layers".into()))?
            .iter()
            .map(|l| {
                relative(
                    dir,
                    l.as_str()
                        .ok_or_else(|| ImageError::Format("bad layer in manifest.json".into()))?,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((relative(dir, config)?, layers));
    }
    Err(ImageError::Format(
        "neither index.json (OCI layout) nor manifest.json (docker save) in the archive".into(),
    ))
}

/// Normalises a layer entry path: no root, no `.`; `None` for the root itself; error for `..`.
fn clean_entry_path(p: &Path) -> Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err("path leaves the root file system".into())
            }
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// `root/rel` if its parent resolves (through symlinks) to a directory inside `root`.
fn inside(root: &Path, rel: &Path) -> Option<PathBuf> {
    let canon_root = root.canonicalize().ok()?;
    let target = root.join(rel);
    let parent = target.parent()?.canonicalize().ok()?;
    if !parent.starts_with(&canon_root) {
        return None;
    }
    Some(parent.join(target.file_name()?))
}

/// `root/rel` resolved (through symlinks) if it is a directory inside `root`.
fn inside_dir(root: &Path, rel: &Path) -> Option<PathBuf> {
    let canon_root = root.canonicalize().ok()?;
    let dir = root.join(rel).canonicalize().ok()?;
    (dir.starts_with(&canon_root) && dir.is_dir()).then_some(dir)
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens a layer blob, gunzipping when it starts with the gzip magic.
fn open_layer(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(io(path))?;
    f.seek(SeekFrom::Start(0)).map_err(io(path))?;
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        return Ok(Box::new(flate2::read::GzDecoder::new(BufReader::new(f))));
    }
    if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        return Err(ImageError::Format(format!(
            "{}: zstd layers are not supported",
            path.display()
        )));
    }
    Ok(Box::new(BufReader::new(f)))
}

/// An error with its sources (the tar crate's messages name the file, the source says why).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Applies one layer tar onto `root`.
pub fn apply_layer(layer: impl Read, root: &Path, name: &str) -> Result<(), ImageError> {
    let err = |entry: &Path, reason: String| ImageError::Entry {
        layer: name.to_owned(),
        entry: entry.display().to_string(),
        reason,
    };
    let mut ar = tar::Archive::new(layer);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    ar.set_preserve_mtime(true);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    // Paths this layer wrote: an opaque whiteout hides only what lower layers put there.
    let mut written: HashSet<PathBuf> = HashSet::new();
    let entries = ar
        .entries()
        .map_err(|e| err(Path::new(""), e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| err(Path::new(""), e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| err(Path::new(""), e.to_string()))?
            .into_owned();
        let Some(rel) = clean_entry_path(&raw).map_err(|r| err(&raw, r))? else {
            continue; // the root directory itself
        };
        let file_name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if file_name == OPAQUE_WHITEOUT {
            let Some(dir) = inside_dir(root, &parent) else {
                continue;
            };
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    let child_rel = parent.join(child.file_name());
                    if !written.contains(&child_rel) {
                        remove_any(&child.path()).map_err(|e| err(&raw, e.to_string()))?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            if let Some(target) = inside(root, &parent.join(hidden)) {
                remove_any(&target).map_err(|e| err(&raw, e.to_string()))?;
            }
            continue;
        }
        // A directory over a non-directory (or the reverse) replaces it.
        let is_dir = entry.header().entry_type().is_dir();
        if let Some(target) = inside(root, &rel) {
            if let Ok(md) = std::fs::symlink_metadata(&target) {
                if !(is_dir && md.is_dir()) {
                    remove_any(&target).map_err(|e| err(&raw, e.to_string()))?;
                }
            }
        }
        let unpacked = entry.unpack_in(root).map_err(|e| err(&raw, chain(&e)))?;
        if !unpacked {
            return Err(err(&raw, "path leaves the root file system".into()));
        }
        written.insert(rel);
    }
    Ok(())
}

/// Unpacks the image archive `archive` into `rootfs` (created; should not exist or be empty), using
/// `scratch` for the archive's blobs (removed afterwards). Returns the image's run configuration.
pub fn unpack(archive: &Path, rootfs: &Path, scratch: &Path) -> Result<ImageConfig, ImageError> {
    std::fs::create_dir_all(scratch).map_err(io(scratch))?;
    let result = (|| {
        extract_archive(archive, scratch)?;
        let (config, layers) = resolve(scratch)?;
        let config = ImageConfig::from_json(&read_json(&config)?);
        std::fs::create_dir_all(rootfs).map_err(io(rootfs))?;
        for layer in &layers {
            let name = layer
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            tracing::debug!(layer = %name, "applying layer");
            apply_layer(open_layer(layer)?, rootfs, &name)?;
        }
        Ok(config)
    })();
    let _ = std::fs::remove_dir_all(scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Directory);
        b.append_data(&mut h, path, &[][..]).unwrap();
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn sha256_hex(data: &[u8]) -> String {
        // Digest values only need to be unique names here; use the content's length and a hash.
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        data.hash(&mut h);
        format!("{:016x}{:08x}", h.finish(), data.len())
    }

    /// An OCI layout archive with the given layers (first = lowest).
    fn oci_archive(layers: &[Vec<u8>], gzip: &[bool]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut descs = Vec::new();
        for (l, &z) in layers.iter().zip(gzip) {
            let blob = if z { gz(l) } else { l.clone() };
            let d = sha256_hex(&blob);
            add_file(&mut b, &format!("blobs/sha256/{d}"), &blob);
            descs.push(serde_json::json!({"digest": format!("sha256:{d}"), "size": blob.len()}));
        }
        let config = serde_json::json!({"config": {"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "Entrypoint": null, "WorkingDir": "/w"}}).to_string();
        let cd = sha256_hex(config.as_bytes());
        add_file(&mut b, &format!("blobs/sha256/{cd}"), config.as_bytes());
        let manifest = serde_json::json!({"schemaVersion": 2, "config": {"digest": format!("sha256:{cd}")}, "layers": descs}).to_string();
        let md = sha256_hex(manifest.as_bytes());
        add_file(&mut b, &format!("blobs/sha256/{md}"), manifest.as_bytes());
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"digest": "sha256:0000", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": format!("sha256:{md}"), "platform": {"os": "linux", "architecture": "amd64"}}
        ]})
        .to_string();
        add_file(&mut b, "index.json", index.as_bytes());
        add_file(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let mut l1 = tar::Builder::new(Vec::new());
        add_dir(&mut l1, "./etc");
        add_file(&mut l1, "./etc/keep", b"keep");
        add_file(&mut l1, "./etc/gone", b"gone");
        add_file(&mut l1, "./etc/over", b"old");
        add_dir(&mut l1, "./opq");
        add_file(&mut l1, "./opq/lower", b"lower");
        add_file(&mut l1, "./was-file", b"f");
        let l1 = l1.into_inner().unwrap();
        let mut l2 = tar::Builder::new(Vec::new());
        add_file(&mut l2, "etc/.wh.gone", b"");
        add_file(&mut l2, "etc/over", b"new");
        add_dir(&mut l2, "opq");
        add_file(&mut l2, "opq/upper", b"upper");
        add_file(&mut l2, "opq/.wh..wh..opq", b"");
        add_dir(&mut l2, "was-file");
        add_file(&mut l2, "was-file/inner", b"i");
        let l2 = l2.into_inner().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("img.tar");
        std::fs::write(&archive, oci_archive(&[l1, l2], &[true, false])).unwrap();
        assert!(is_image_archive(&archive));
        let rootfs = dir.path().join("rootfs");
        let scratch = dir.path().join("scratch");
        let cfg = unpack(&archive, &rootfs, &scratch).unwrap();
        assert_eq!(cfg.env, ["PATH=/bin", "A=1"]);
        assert_eq!(cfg.cmd, ["sh"]);
        assert!(cfg.entrypoint.is_empty());
        assert_eq!(cfg.working_dir, "/w");
        let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).ok();
        assert_eq!(read("etc/keep").as_deref(), Some("keep"));
        assert_eq!(read("etc/gone"), None);
        assert_eq!(read("etc/over").as_deref(), Some("new"));
        assert_eq!(
            read("opq/lower"),
            None,
            "opaque whiteout hides the lower layer"
        );
        assert_eq!(
            read("opq/upper").as_deref(),
            Some("upper"),
            "but not its own layer"
        );
        assert_eq!(read("was-file/inner").as_deref(), Some("i"));
        assert!(!rootfs.join("etc/.wh.gone").exists());
        assert!(!scratch.exists(), "scratch removed");
    }

    #[test]
    fn escaping_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        // A raw header with `..` (the tar crate's builder refuses to write one).
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../escaped.tx");
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend_from_slice(&[b'x'; 512]);
        data.extend_from_slice(&[0u8; 1024]);
        let e = apply_layer(&data[..], &root, "evil").unwrap_err();
        assert!(e.to_string().contains("leaves"), "{e}");
        assert!(!dir.path().join("escaped.tx").exists());

        // A whiteout through a symlink that points outside is ignored.
        std::fs::write(dir.path().join("victim"), b"v").unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("link")).unwrap();
        let mut l = tar::Builder::new(Vec::new());
        add_file(&mut l, "link/.wh.victim", b"");
        apply_layer(&l.into_inner().unwrap()[..], &root, "evil2").unwrap();
        assert!(dir.path().join("victim").exists());
    }

    #[test]
    fn bad_archives_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("x.tar");
        let mut b = tar::Builder::new(Vec::new());
        add_file(&mut b, "hello", b"x");
        std::fs::write(&archive, b.into_inner().unwrap()).unwrap();
        assert!(!is_image_archive(&archive));
        let e = unpack(&archive, &dir.path().join("r"), &dir.path().join("s")).unwrap_err();
        assert!(e.to_string().contains("index.json"), "{e}");
        assert!(matches!(
            blob_path(dir.path(), "sha256:../../etc"),
            Err(ImageError::Format(_))
        ));
    }
}
