//! A private containerd with its CRI plugin (runtimes `capsa` and `runc`), and a small CRI runtime.v1
//! client (tonic + k8s-cri) for the CRI suite and the pod-start benchmark.
//!
//! [`CriContainerd::start`] writes a version-2 config under a fresh directory in /tmp (its own root on a
//! tmpfs, state and socket), builds and imports a busybox image and a pause image (busybox `sleep`) into
//! the `k8s.io` namespace, and waits until CRI sees them. Pods use the host network (no CNI). Dropping it
//! kills containerd and whatever shims and VMMs it left, unmounts everything under its directory and
//! removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::{workspace_root, Inputs};

pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:capsa";
pub const PAUSE_IMAGE: &str = "capsa.local/pause:1";

/// containerd with CRI, running under a temporary directory.
pub struct CriContainerd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub sock: PathBuf,
    /// Where capsa's shim keeps its sandbox directories.
    pub capsa_state: PathBuf,
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// True when containerd and ctr are installed; otherwise prints why the caller skips.
pub fn containerd_available(test: &str) -> bool {
    if have("containerd") && have("ctr") {
        return true;
    }
    eprintln!("SKIPPED {test}: containerd/ctr not installed (apt-get install containerd runc)");
    false
}

/// The directory holding containerd-shim-capsa-v2 (the test binaries' profile, else target/release).
pub fn shim_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dirs: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(Path::to_path_buf)
        .collect();
    dirs.push(workspace_root().join("target/release"));
    dirs.into_iter()
        .find(|d| d.join("containerd-shim-capsa-v2").exists())
        .unwrap_or_else(|| {
            panic!("containerd-shim-capsa-v2 not built (cargo build --release -p capsa-runtime)")
        })
}

fn containerd_config(dir: &Path, sock: &Path, capsa_cfg: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.capsa]
      runtime_type = "io.containerd.capsa.v2"
      pod_annotations = ["capsa.io/*"]
      privileged_without_host_devices = true
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.capsa.options]
        ConfigPath = "{capsa}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#,
        sock = sock.display(),
        capsa = capsa_cfg.display(),
    )
}

fn run_ok(cmd: &mut Command, what: &str) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Mount points under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Pids whose command line mentions `needle`.
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
                .filter(|&pid| pid != me)
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).contains(needle))
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of processes whose command line's first word ends with `program` and that mention `needle`.
pub fn pids_of(program: &str, needle: &str) -> Vec<i32> {
    pids_mentioning(needle)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    c.split(|b| *b == 0)
                        .next()
                        .is_some_and(|a| a.ends_with(program.as_bytes()))
                })
                .unwrap_or(false)
        })
        .collect()
}

impl CriContainerd {
    /// Starts containerd and imports the images. Panics (after cleaning up) when it cannot.
    pub fn start(inputs: &Inputs) -> Self {
        Self::start_with_cni(inputs, None)
    }

    /// [`start`](Self::start) with `conflist` (a CNI network configuration list) installed in
    /// `<dir>/cni` before containerd starts: pods with a network namespace get that network.
    pub fn start_with_cni(inputs: &Inputs, conflist: Option<&str>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cri")
            .tempdir_in("/tmp")
            .expect("tempdir")
            .keep();
        let sock = dir.join("c.sock");
        let capsa_state = dir.join("capsa");
        let mut c = CriContainerd {
            child: None,
            dir: dir.clone(),
            sock: sock.clone(),
            capsa_state: capsa_state.clone(),
        };
        // containerd's root on a tmpfs (the test host's / is an overlay; snapshots want a plain fs).
        std::fs::create_dir_all(dir.join("root")).unwrap();
        std::fs::create_dir_all(dir.join("cni")).unwrap();
        if let Some(conflist) = conflist {
            std::fs::write(dir.join("cni/10-capsa-e2e.conflist"), conflist).unwrap();
        }
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=2g", "tmpfs"])
                .arg(dir.join("root")),
            "mount tmpfs",
        );
        let capsa_cfg = dir.join("capsa.toml");
        std::fs::write(
            &capsa_cfg,
            format!(
                "[hypervisor]\npath = \"{}\"\nkernel = \"{}\"\ninitrd = \"{}\"\ndefault_memory_mib = 256\n[runtime]\nlog_level = \"debug\"\nstate_dir = \"{}\"\n",
                inputs.vmm.display(),
                inputs.kernel.display(),
                inputs.initrd.display(),
                capsa_state.display()
            ),
        )
        .unwrap();
        let cfg = dir.join("containerd.toml");
        std::fs::write(&cfg, containerd_config(&dir, &sock, &capsa_cfg)).unwrap();
        let path = format!(
            "{}:{}",
            shim_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("-c")
            .arg(&cfg)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        c.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                c.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let script = workspace_root().join("tests/e2e/scripts/busybox-oci.sh");
        for (name, cmd) in [
            (BUSYBOX_IMAGE, r#"["sh"]"#),
            (PAUSE_IMAGE, r#"["/bin/sleep", "2147483647"]"#),
        ] {
            let tar = dir.join("image.tar");
            run_ok(
                Command::new("bash")
                    .arg(&script)
                    .arg(&tar)
                    .arg(name)
                    .arg(cmd),
                "busybox-oci.sh",
            );
            let o = c.ctr(&["-n", "k8s.io", "images", "import", &tar.to_string_lossy()]);
            assert!(
                o.status.success(),
                "ctr import {name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let _ = std::fs::remove_file(&tar);
        }
        c
    }

    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// A connected CRI client.
    pub async fn client(&self) -> Cri {
        let sock = self.sock.clone();
        let channel = Endpoint::try_from("http://[::]:50051")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }))
            .await
            .expect("connect to containerd's CRI socket");
        let cri = Cri {
            rt: RuntimeServiceClient::new(channel.clone()),
            img: ImageServiceClient::new(channel),
        };
        // CRI learns about imported images from containerd's events: wait until both are visible.
        let deadline = Instant::now() + Duration::from_secs(30);
        for image in [BUSYBOX_IMAGE, PAUSE_IMAGE] {
            loop {
                let st = cri
                    .img
                    .clone()
                    .image_status(cri::ImageStatusRequest {
                        image: Some(cri::ImageSpec {
                            image: image.into(),
                            ..Default::default()
                        }),
                        verbose: false,
                    })
                    .await;
                if matches!(&st, Ok(r) if r.get_ref().image.is_some()) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "CRI does not see {image}: {st:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        cri
    }

    /// Directory for a pod's container logs.
    pub fn log_dir(&self, pod: &str) -> PathBuf {
        self.dir.join("logs").join(pod)
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims and VMMs outlive containerd: kill the ones that belong to this instance.
        for needle in [
            self.sock.to_string_lossy().into_owned(),
            self.capsa_state.to_string_lossy().into_owned(),
        ] {
            for pid in pids_mentioning(&needle) {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        for m in mounts_under(&self.dir) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The CRI runtime and image services.
#[derive(Clone)]
pub struct Cri {
    pub rt: RuntimeServiceClient<Channel>,
    pub img: ImageServiceClient<Channel>,
}

/// What a pod's sandbox looks like: host network (no CNI), logs under `log_dir`.
pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        // Like the kubelet: no hostname for a host-network pod (it has the node's UTS namespace).
        hostname: String::new(),
        log_directory: log_dir.to_string_lossy().into_owned(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn container_config(name: &str, args: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: BUSYBOX_IMAGE.into(),
            ..Default::default()
        }),
        command: args.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

impl Cri {
    pub async fn run_pod(
        &self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        Ok(self
            .rt
            .clone()
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id)
    }

    /// CreateContainer + StartContainer.
    pub async fn run_container(
        &self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> Result<String, tonic::Status> {
        let id = self
            .rt
            .clone()
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        self.rt
            .clone()
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        Ok(id)
    }

    pub async fn status(&self, id: &str) -> Result<cri::ContainerStatus, tonic::Status> {
        self.rt
            .clone()
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .ok_or_else(|| tonic::Status::not_found("no status"))
    }

    /// Polls ContainerStatus until the container exited; returns its exit code.
    pub async fn wait_exit(&self, id: &str, timeout: Duration) -> Result<i32, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status(id).await.map_err(|e| e.to_string())?;
            if st.state == cri::ContainerState::ContainerExited as i32 {
                return Ok(st.exit_code);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "container {id} still in state {} after {timeout:?}",
                    st.state
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        self.exec_sync_timeout(id, cmd, 60).await
    }

    /// ExecSync with a timeout of `timeout_s` seconds (0: none).
    pub async fn exec_sync_timeout(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_s: i64,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        Ok(self
            .rt
            .clone()
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout_s,
            })
            .await?
            .into_inner())
    }

    /// StopPodSandbox + RemovePodSandbox.
    pub async fn remove_pod(&self, pod: &str) -> Result<(), tonic::Status> {
        self.rt
            .clone()
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await?;
        self.rt
            .clone()
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.into(),
            })
            .await?;
        Ok(())
    }
}

/// The stdout lines of a CRI log file (`<time> stdout F <line>`), in order.
pub fn log_lines(path: &Path, stream: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(4, ' ');
            let (_time, s, _tag, rest) =
                (it.next()?, it.next()?, it.next()?, it.next().unwrap_or(""));
            (s == stream).then(|| rest.to_owned())
        })
        .collect()
}

/// What an interactive CRI Exec (`kubectl exec -it`) saw.
#[derive(Debug, Default, Clone)]
pub struct TtyExec {
    /// Everything the terminal printed (the tty echoes what was typed, with `\r\n` line ends).
    pub output: String,
    /// Exit code from the stream's status message (v4.channel.k8s.io).
    pub exit_code: i32,
}

/// CRI Exec with `tty` and `stdin`, the way `kubectl exec -it` drives it: the URL containerd's streaming server
/// answers is opened as a websocket with Kubernetes' `v4.channel.k8s.io` protocol (first byte of every message
/// = channel: 0 stdin, 1 stdout, 3 status, 4 resize). Sends a resize to `rows`x`cols`, then `input` on stdin,
/// and reads until the status message. Bounded by `timeout`.
pub async fn exec_tty(
    cri: &Cri,
    id: &str,
    cmd: &[&str],
    rows: u16,
    cols: u16,
    input: &str,
    timeout: Duration,
) -> Result<TtyExec, String> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let url = cri
        .rt
        .clone()
        .exec(cri::ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty: true,
            stdin: true,
            stdout: true,
            stderr: false,
        })
        .await
        .map_err(|e| format!("Exec: {e}"))?
        .into_inner()
        .url;
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("exec URL {url:?}: {e}"))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v4.channel.k8s.io".parse().map_err(|e| format!("{e}"))?,
    );
    let run = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| format!("websocket to {ws_url}: {e}"))?;
        let frame = |chan: u8, data: &[u8]| {
            let mut v = vec![chan];
            v.extend_from_slice(data);
            Message::Binary(v.into())
        };
        let resize = format!(r#"{{"Width":{cols},"Height":{rows}}}"#);
        ws.send(frame(4, resize.as_bytes()))
            .await
            .map_err(|e| format!("resize: {e}"))?;
        ws.send(frame(0, input.as_bytes()))
            .await
            .map_err(|e| format!("stdin: {e}"))?;
        let mut out = TtyExec::default();
        let mut status = None;
        while let Some(msg) = ws.next().await {
            let data = match msg.map_err(|e| format!("reading the exec stream: {e}"))? {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            match data.split_first() {
                Some((1, rest)) => out.output.push_str(&String::from_utf8_lossy(rest)),
                Some((3, rest)) if !rest.is_empty() => {
                    status = Some(String::from_utf8_lossy(rest).into_owned())
                }
                _ => {}
            }
        }
        let status = status.ok_or_else(|| format!("no exit status; output {:?}", out.output))?;
        let v: serde_json::Value =
            serde_json::from_str(&status).map_err(|e| format!("status {status:?}: {e}"))?;
        out.exit_code = if v["status"] == "Success" {
            0
        } else {
            v["details"]["causes"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["reason"] == "ExitCode"))
                .and_then(|c| c["message"].as_str())
                .and_then(|m| m.parse().ok())
                .ok_or_else(|| format!("status without an exit code: {status}"))?
        };
        Ok::<_, String>(out)
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("tty exec did not finish within {timeout:?}"))?
}

/// What a CRI PortForward stream carried (see [`port_forward`]).
#[derive(Debug, Default)]
pub struct PortForwardResult {
    /// Bytes from the pod's port (data channel, after its two-byte port header).
    pub data: Vec<u8>,
    /// Text on the error channel (after its port header): why the runtime could not forward.
    pub error: String,
}

/// CRI PortForward to `port` of pod `pod_id`, as `kubectl port-forward` does it: the URL containerd
/// answers is opened as a websocket with the `v4.channel.k8s.io` protocol and `?port=PORT`; channel 0
/// carries data, channel 1 errors, each starting with the port as two little-endian bytes. Sends
/// `request`, then reads until the stream closes, `want` appears in the data, or `timeout`.
pub async fn port_forward(
    cri: &Cri,
    pod_id: &str,
    port: u16,
    request: &[u8],
    want: &[u8],
    timeout: Duration,
) -> Result<PortForwardResult, String> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let url = cri
        .rt
        .clone()
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod_id.into(),
            port: vec![i32::from(port)],
        })
        .await
        .map_err(|e| format!("PortForward: {e}"))?
        .into_inner()
        .url;
    let ws_url = format!("{}?port={port}", url.replacen("http://", "ws://", 1));
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("port-forward URL {url:?}: {e}"))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v4.channel.k8s.io".parse().map_err(|e| format!("{e}"))?,
    );
    let mut out = PortForwardResult::default();
    let run = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| format!("websocket to {ws_url}: {e}"))?;
        let mut frame = vec![0u8];
        frame.extend_from_slice(request);
        ws.send(Message::Binary(frame.into()))
            .await
            .map_err(|e| format!("sending on the data channel: {e}"))?;
        let (mut data_header, mut error_header) = (2usize, 2usize);
        while let Some(msg) = ws.next().await {
            let bytes = match msg {
                Ok(Message::Binary(b)) => b.to_vec(),
                Ok(Message::Text(t)) => t.as_bytes().to_vec(),
                Ok(Message::Close(_)) => break,
                Ok(_) => continue,
                // A reset after the answer is how a forward may end.
                Err(e) => {
                    out.error.push_str(&format!("[websocket: {e}]"));
                    break;
                }
            };
            let Some((chan, mut rest)) = bytes.split_first() else {
                continue;
            };
            let header = if *chan == 0 {
                &mut data_header
            } else {
                &mut error_header
            };
            let skip = (*header).min(rest.len());
            *header -= skip;
            rest = &rest[skip..];
            match chan {
                0 => out.data.extend_from_slice(rest),
                _ => out.error.push_str(&String::from_utf8_lossy(rest)),
            }
            if !want.is_empty() && out.data.windows(want.len()).any(|w| w == want) {
                break;
            }
        }
        Ok::<_, String>(())
    };
    let finished = tokio::time::timeout(timeout, run).await;
    match finished {
        Ok(r) => r.map(|()| out),
        Err(_) => Err(format!(
            "port-forward did not end within {timeout:?}; got {} data bytes, error {:?}",
            out.data.len(),
            out.error
        )),
    }
}
