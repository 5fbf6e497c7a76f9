//! The shim v2 bootstrap protocol as containerd 1.6 speaks it.
//!
//! containerd-shim 0.12 targets containerd 2.x (a JSON or protobuf reply to `start`, the task API as
//! `containerd.task.v3.Task`); containerd 1.6 reads a bare address and calls `containerd.task.v2.Task`.
//! So capsa does its own bootstrap here and keeps the crate for flags, the generated task service,
//! socket naming and event publishing.
//!
//! - `start`: group by the pod (`io.kubernetes.cri.sandbox-id`, else the container id), hash the group
//!   into `unix:///run/containerd/s/<sha256>`; if a shim already serves it, print that address;
//!   otherwise spawn the daemon (`-socket <address>`), wait until it closed its stdout (it does so once
//!   it listens), write `address` in the bundle, print the address.
//! - `delete`: the shim is gone (or containerd gave up on it): clean up what the container left on the
//!   host and print a `DeleteResponse`.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use containerd_shim::Flags;

/// Annotation CRI puts on every container of a pod (the pod's own sandbox container included).
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// Annotation CRI uses to tell a pod's sandbox container from its other containers.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// runc's grouping annotation, honoured as well.
pub const RUNC_GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";
/// Longest path a Unix socket address may have (sun_path is 108 bytes, NUL included).
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bundle config.json is not valid JSON: {0}")]
    Spec(#[from] serde_json::Error),
    #[error("shim socket path {0} is longer than a Unix socket address may be")]
    SocketTooLong(String),
    #[error("missing -{0} flag")]
    MissingFlag(&'static str),
    #[error("shim daemon failed to start: {0}")]
    Daemon(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BootstrapError {
    let path = path.to_owned();
    move |source| BootstrapError::Io { what, path, source }
}

/// The annotations of the bundle's `config.json` (empty when it has none).
pub fn read_annotations(bundle: &Path) -> Result<HashMap<String, String>, BootstrapError> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
    let spec: serde_json::Value = serde_json::from_str(&text)?;
    Ok(annotations_of(&spec))
}

/// The `annotations` object of an OCI spec; values that are not strings are ignored.
pub fn annotations_of(spec: &serde_json::Value) -> HashMap<String, String> {
    spec.get("annotations")
        .and_then(|a| a.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The group a container's shim serves: its pod for CRI containers, else itself.
pub fn grouping(id: &str, annotations: &HashMap<String, String>) -> String {
    annotations
        .get(SANDBOX_ID_ANNOTATION)
        .or_else(|| annotations.get(RUNC_GROUP_ANNOTATION))
        .filter(|g| !g.is_empty())
        .cloned()
        .unwrap_or_else(|| id.to_owned())
}

/// The shim's ttrpc address for a group, as containerd's own shims compute it.
pub fn shim_address(
    containerd_address: &str,
    namespace: &str,
    group: &str,
) -> Result<String, BootstrapError> {
    let address = containerd_shim::socket_address(containerd_address, namespace, group);
    if socket_path(&address).len() > MAX_SOCKET_PATH {
        return Err(BootstrapError::SocketTooLong(address));
    }
    Ok(address)
}

/// `unix:///a/b` → `/a/b`.
pub fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Whether a live server accepts connections at `address`.
pub fn socket_in_use(address: &str) -> bool {
    std::os::unix::net::UnixStream::connect(socket_path(address)).is_ok()
}

/// The runtime options containerd pipes to `start` (`runtimeoptions.v1.Options` inside an `Any`, from
/// the CRI runtime's `options.ConfigPath`): returns `config_path` when present.
pub fn config_path_from_options(input: &[u8]) -> Option<PathBuf> {
    use containerd_shim_protos::protobuf::{well_known_types::any::Any, Message};
    if input.is_empty() {
        return None;
    }
    let any = Any::parse_from_bytes(input).ok()?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    // message Options { string type_url = 1; string config_path = 2; }
    let fields = parse_string_fields(&any.value)?;
    fields
        .into_iter()
        .find(|(n, _)| *n == 2)
        .map(|(_, v)| PathBuf::from(v))
        .filter(|p| !p.as_os_str().is_empty())
}

/// Length-delimited string fields of a protobuf message (other wire types are skipped).
fn parse_string_fields(mut b: &[u8]) -> Option<Vec<(u64, String)>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let tag = varint(&mut b)?;
        match tag & 7 {
            0 => {
                varint(&mut b)?;
            }
            1 => b = b.get(8..)?,
            5 => b = b.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut b)?).ok()?;
                let data = b.get(..len)?;
                b = &b[len..];
                out.push((tag >> 3, String::from_utf8_lossy(data).into_owned()));
            }
            _ => return None,
        }
    }
    Some(out)
}

/// `start`: returns the address to print. `stdin` is what containerd piped in.
pub fn start(flags: &Flags, stdin: &[u8]) -> Result<String, BootstrapError> {
    let launched = std::time::SystemTime::now();
    if flags.id.is_empty() {
        return Err(BootstrapError::MissingFlag("id"));
    }
    if flags.namespace.is_empty() {
        return Err(BootstrapError::MissingFlag("namespace"));
    }
    let bundle = std::env::current_dir().map_err(io_err("current directory", Path::new(".")))?;
    let annotations = read_annotations(&bundle)?;
    let group = grouping(&flags.id, &annotations);
    let address = shim_address(&flags.address, &flags.namespace, &group)?;

    if !socket_in_use(&address) {
        // A stale socket from a shim that died: remove it so the daemon can bind.
        let path = socket_path(&address);
        match std::fs::remove_file(path) {
            Ok(()) => tracing::warn!(path, "removed a stale shim socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale socket", Path::new(path))(e)),
        }
        spawn_daemon(flags, &address, config_path_from_options(stdin), launched)?;
    }
    write_address_file(&bundle, &address)?;
    Ok(address)
}

/// Writes `<bundle>/address` (containerd reads it to reconnect after a restart).
pub fn write_address_file(bundle: &Path, address: &str) -> Result<(), BootstrapError> {
    let path = bundle.join("address");
    let tmp = bundle.join(".address.tmp");
    std::fs::write(&tmp, address).map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("rename to", &path))
}

/// Starts the long-running shim in its own session, and returns once it listens on `address` (it
/// closes its stdout then) or has died.
fn spawn_daemon(
    flags: &Flags,
    address: &str,
    config_path: Option<PathBuf>,
    launched: std::time::SystemTime,
) -> Result<(), BootstrapError> {
    let exe =
        std::env::current_exe().map_err(io_err("current exe", Path::new("/proc/self/exe")))?;
    let mut cmd = Command::new(&exe);
    cmd.args(["-namespace", &flags.namespace, "-id", &flags.id])
        .args(["-address", &flags.address, "-socket", address])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    if let Some(p) = config_path {
        cmd.env(super::config::CONFIG_ENV, p);
    }
    // For the pod-start timeline's `shim_start` step, logged by the daemon once its log is open.
    cmd.env(
        crate::timeline::SHIM_START_ENV,
        crate::timeline::unix_us(launched).to_string(),
    );
    // SAFETY: setsid is async-signal-safe; the daemon must not die with containerd's process group.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io_err("spawn", &exe))?;
    let mut out = Vec::new();
    if let Some(mut stdout) = child.stdout.take() {
        // EOF once the daemon listens (it redirects stdout away) or when it dies.
        let _ = stdout.read_to_end(&mut out);
    }
    match child.try_wait() {
        Ok(Some(status)) => {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            Err(BootstrapError::Daemon(format!(
                "exited with {status}: {}",
                err.trim()
            )))
        }
        _ => {
            // Running: nothing waits for it; it reparents to the subreaper or init.
            drop(child);
            Ok(())
        }
    }
}

/// What `delete` prints: containerd 1.6 reads a `DeleteResponse`.
pub fn delete_response(exit_status: u32) -> containerd_shim_protos::api::DeleteResponse {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut resp = containerd_shim_protos::api::DeleteResponse::new();
    resp.exit_status = exit_status;
    let mut ts = containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp::new();
    ts.seconds = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(now.subsec_nanos()).unwrap_or(0);
    resp.exited_at = Some(ts).into();
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::{well_known_types::any::Any, Message};

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn containers_of_a_pod_share_one_shim_address_and_others_get_their_own() {
        let a = ann(&[(SANDBOX_ID_ANNOTATION, "pod1")]);
        assert_eq!(grouping("c1", &a), "pod1");
        assert_eq!(grouping("c2", &a), "pod1");
        assert_eq!(grouping("solo", &ann(&[])), "solo");
        assert_eq!(grouping("r", &ann(&[(RUNC_GROUP_ANNOTATION, "g")])), "g");
        let sock = "/run/containerd/containerd.sock";
        let p1 = shim_address(sock, "k8s.io", &grouping("c1", &a)).unwrap();
        let p2 = shim_address(sock, "k8s.io", &grouping("c2", &a)).unwrap();
        let solo = shim_address(sock, "k8s.io", "solo").unwrap();
        assert_eq!(p1, p2);
        assert_ne!(p1, solo);
        // Different namespaces never share a shim.
        assert_ne!(p1, shim_address(sock, "default", "pod1").unwrap());
        assert!(p1.starts_with("unix:///run/containerd/s/"), "{p1}");
        assert!(socket_path(&p1).len() <= MAX_SOCKET_PATH);
    }

    #[test]
    fn address_matches_containerds_own_hash() {
        // sha256("/run/containerd/containerd.sock/default/123"), as containerd computes it.
        assert_eq!(
            shim_address("/run/containerd/containerd.sock", "default", "123").unwrap(),
            "unix:///run/containerd/s/0ddfbd72d02b3551e75f3a0ed90b9965b533401be618f43a568bc522764e0ad0"
        );
    }

    #[test]
    fn annotations_read_from_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.sandbox-id":"p","n":5}}"#,
        )
        .unwrap();
        let a = read_annotations(dir.path()).unwrap();
        assert_eq!(a.get(SANDBOX_ID_ANNOTATION).map(String::as_str), Some("p"));
        assert!(!a.contains_key("n"));
        std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
        assert!(matches!(
            read_annotations(dir.path()),
            Err(BootstrapError::Spec(_))
        ));
    }

    #[test]
    fn address_file_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        write_address_file(dir.path(), "unix:///run/containerd/s/abc").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("address")).unwrap(),
            "unix:///run/containerd/s/abc"
        );
        assert!(!dir.path().join(".address.tmp").exists());
    }

    #[test]
    fn config_path_comes_from_cri_runtime_options() {
        // runtimeoptions.v1.Options{type_url: "x", config_path: "/etc/capsa/c.toml"}
        let mut value = vec![0x0a, 1, b'x', 0x12];
        let p = b"/etc/capsa/c.toml";
        value.push(p.len() as u8);
        value.extend_from_slice(p);
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        let bytes = any.write_to_bytes().unwrap();
        assert_eq!(
            config_path_from_options(&bytes),
            Some(PathBuf::from("/etc/capsa/c.toml"))
        );
        assert_eq!(config_path_from_options(&[]), None);
        assert_eq!(config_path_from_options(&[0xff, 0xff, 0xff]), None);
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![0x12, 1, b'a'],
            ..Default::default()
        };
        assert_eq!(
            config_path_from_options(&other.write_to_bytes().unwrap()),
            None
        );
    }

    #[test]
    fn socket_in_use_tells_a_live_listener_from_a_stale_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let addr = format!("unix://{}", path.display());
        assert!(!socket_in_use(&addr));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(socket_in_use(&addr));
        drop(listener);
        // The file is left behind but nobody listens.
        assert!(path.exists());
        assert!(!socket_in_use(&addr));
    }

    #[test]
    fn delete_response_has_an_exit_time() {
        let r = delete_response(137);
        assert_eq!(r.exit_status, 137);
        assert!(r.exited_at.seconds > 1_600_000_000);
    }
}
