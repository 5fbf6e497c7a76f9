//! Pods on a CNI network: a bridge + host-local (+ portmap) conflist for [`CriContainerd::start_with_cni`],
//! pod configs with a pod network namespace, and the CRI calls the network suite and the network benchmark
//! both need (NetworkReady, the pod's IP and netns, ExecSync with its output).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;

use crate::cri::{pod_config, Cri, CriContainerd};

/// A CNI bridge network: containerd's CNI runs Debian's `bridge` (with `host-local` IPAM, the gateway on
/// the bridge) and `portmap` plugins for every pod that asks for a pod network namespace.
#[derive(Debug, Clone, Copy)]
pub struct BridgeNet {
    /// The network's name (host-local keeps its allocations under `/var/lib/cni/networks/<name>`).
    pub name: &'static str,
    /// The host's bridge device.
    pub bridge: &'static str,
    pub subnet: &'static str,
    /// The bridge's IP: the pods' default gateway, and the host's address as the pods see it.
    pub gateway: &'static str,
    pub mtu: u32,
}

impl BridgeNet {
    /// The conflist to hand to [`CriContainerd::start_with_cni`].
    pub fn conflist(&self) -> String {
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "mtu": self.mtu,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet, "gateway": self.gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
        .to_string()
    }

    /// Where host-local records the IPs it handed out on this network.
    pub fn ip_allocations_dir(&self) -> PathBuf {
        Path::new("/var/lib/cni/networks").join(self.name)
    }

    /// Deletes the bridge (CNI DEL leaves it behind); call after containerd has gone.
    pub fn remove_bridge(&self) {
        let _ = Command::new("ip")
            .args(["link", "del", self.bridge])
            .status();
    }
}

/// The CNI plugins the conflist needs that are not installed (`apt-get install containernetworking-plugins`).
pub fn missing_cni_plugins() -> Vec<&'static str> {
    ["bridge", "host-local", "portmap", "loopback"]
        .into_iter()
        .filter(|p| !Path::new("/usr/lib/cni").join(p).exists())
        .collect()
}

/// [`pod_config`] with a pod network namespace (CNI gives it its IP) and `name` as the pod's hostname.
pub fn net_pod_config(c: &CriContainerd, name: &str) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(name, &c.log_dir(name));
    cfg.hostname = name.into();
    if let Some(ns) = cfg
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.network = cri::NamespaceMode::Pod as i32;
    }
    cfg
}

/// Waits (up to 30 s) until CRI's Status reports NetworkReady (containerd loaded the conflist).
pub async fn wait_network_ready(cri: &Cri) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = cri
            .rt
            .clone()
            .status(cri::StatusRequest { verbose: false })
            .await
            .map_err(|e| format!("Status: {e}"))?
            .into_inner();
        let ready = st
            .status
            .as_ref()
            .map(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "NetworkReady" && c.status)
            })
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("CRI never reported NetworkReady: {:?}", st.status));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pod IP and network namespace path CRI reports for `pod`.
pub async fn pod_network(cri: &Cri, pod: &str) -> Result<(String, Option<PathBuf>), String> {
    let r = cri
        .rt
        .clone()
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: true,
        })
        .await
        .map_err(|e| format!("PodSandboxStatus: {e}"))?
        .into_inner();
    let ip = r
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    let info: serde_json::Value = r
        .info
        .get("info")
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or_default();
    let netns = info["netNamespacePath"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            info["runtimeSpec"]["linux"]["namespaces"]
                .as_array()?
                .iter()
                .find(|n| n["type"] == "network")?["path"]
                .as_str()
                .map(PathBuf::from)
        });
    Ok((ip, netns))
}

/// ExecSync in container `cid`: its stdout, or an error with the exit code and output.
pub async fn exec(cri: &Cri, cid: &str, cmd: &[&str]) -> Result<String, String> {
    let r = cri
        .exec_sync(cid, cmd)
        .await
        .map_err(|e| format!("ExecSync {cmd:?}: {e}"))?;
    if r.exit_code != 0 {
        return Err(format!(
            "{cmd:?} exited {}: {}{}",
            r.exit_code,
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&r.stdout).into_owned())
}
