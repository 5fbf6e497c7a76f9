//! CRI PortForward (`kubectl port-forward`) for VM pods, host side.
//!
//! containerd 1.6 serves PortForward itself: it enters the pod's network namespace on the host and
//! dials `localhost:PORT` there. In a capsa pod nothing listens in that namespace (the pod's sockets
//! live in the guest), so capsa catches those connections and carries them into the guest:
//!
//! 1. one TCP listener on `127.0.0.1:<ephemeral>`, created inside the pod's namespace (the socket
//!    stays there), and one `nat OUTPUT` rule there redirecting every TCP connection to 127.0.0.1 to
//!    it (`iptables -t nat -A OUTPUT -p tcp -d 127.0.0.1 -j REDIRECT`, tagged with the comment
//!    [`RULE_COMMENT`]). Only processes on the host that entered the namespace can connect: guest
//!    traffic leaves the veth through tc before the namespace's stack sees it;
//! 2. per accepted connection, the original port from `SO_ORIGINAL_DST`, a hybrid-vsock stream to the
//!    agent's forwarder ([`PORT_FORWARD_VSOCK_PORT`]) with the port as its request line, and the
//!    agent's `OK` (or `ERR <reason>`, logged); then bytes both ways until either side closes.
//!
//! Why not an answer from the shim: containerd does not ask the shim about PortForward, and kubelet
//! only talks to containerd. Why iptables: the CNI plugins the pod already depends on (portmap) use
//! it, so a node that runs pods with hostPorts has it; nftables' own tool is not assumed. IPv4 only:
//! containerd tries `tcp4` first, and the v4 redirect answers it.
//!
//! [`PORT_FORWARD_VSOCK_PORT`]: capsa_proto::PORT_FORWARD_VSOCK_PORT

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::socket::sockopt::{Linger, OriginalDst};
use nix::sys::socket::{getsockopt, setsockopt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::netns::run_in_netns_or_undo;
use super::{run_in_netns, NetworkError};
use crate::hybrid_vsock;

/// The comment on capsa's redirect rule, so that a shim that lost its state can find it again.
pub const RULE_COMMENT: &str = "capsa-port-forward";
/// The iptables binary (looked up in PATH).
const IPTABLES: &str = "iptables";
/// How long to wait for the VMM's socket and the agent's answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer line from the agent.
const MAX_ANSWER: usize = 512;
/// Forwarded connections open at once per pod; more wait in the listener's backlog.
const MAX_CONNECTIONS: usize = 256;

/// Why the forwarder could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("network namespace {netns}: cannot listen on 127.0.0.1: {source}")]
    Listen { netns: PathBuf, source: io::Error },
    #[error("`{IPTABLES}` is not installed (in PATH): CRI PortForward needs it, as the portmap CNI plugin does")]
    NoIptables,
    #[error("network namespace {netns}: `{command}` failed: {reason}")]
    Iptables {
        netns: PathBuf,
        command: String,
        reason: String,
    },
    #[error(transparent)]
    Netns(#[from] NetworkError),
}

/// The arguments after `iptables` for capsa's rule, `op` being `-A` or `-D`.
fn rule_args(op: &str, listen_port: u16) -> Vec<String> {
    [
        "-w",
        "5",
        "-t",
        "nat",
        op,
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1/32",
        "-m",
        "comment",
        "--comment",
        RULE_COMMENT,
        "-j",
        "REDIRECT",
        "--to-ports",
    ]
    .into_iter()
    .map(String::from)
    .chain([listen_port.to_string()])
    .collect()
}

/// Runs iptables with `args` in the calling thread's network namespace (the child inherits it).
fn iptables(netns: &Path, args: &[String]) -> Result<String, PortForwardError> {
    let command = format!("{IPTABLES} {}", args.join(" "));
    let fail = |reason: String| PortForwardError::Iptables {
        netns: netns.to_owned(),
        command: command.clone(),
        reason,
    };
    let out = Command::new(IPTABLES)
        .args(args)
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => PortForwardError::NoIptables,
            _ => fail(format!("cannot run it: {e}")),
        })?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The delete commands for every capsa rule in an `iptables -t nat -S OUTPUT` listing.
pub fn delete_args_for_listing(listing: &str) -> Vec<Vec<String>> {
    listing
        .lines()
        .filter(|l| l.starts_with("-A OUTPUT ") && l.contains(RULE_COMMENT))
        .map(|l| {
            let mut args: Vec<String> = ["-w", "5", "-t", "nat"].map(String::from).to_vec();
            args.extend(l.split_whitespace().map(|w| {
                if w == "-A" {
                    "-D".to_owned()
                } else {
                    w.trim_matches('"').to_owned()
                }
            }));
            args
        })
        .collect()
}

/// Removes every capsa port-forward rule in the namespace at `netns` (for a shim that lost its
/// state). Returns how many were removed; a namespace already gone removes none.
pub async fn remove_rules(netns: &Path) -> Result<usize, PortForwardError> {
    let path = netns.to_path_buf();
    let result = run_in_netns(netns, move |_| async move { Ok(remove_rules_here(&path)) }).await;
    match result {
        Ok(r) => r,
        Err(e) if e.is_netns_gone() => Ok(0),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn remove_rules_here(netns: &Path) -> Result<usize, PortForwardError> {
    let listing = match iptables(
        netns,
        &["-w", "5", "-t", "nat", "-S", "OUTPUT"].map(String::from),
    ) {
        Ok(l) => l,
        // Without iptables no rule of capsa's can exist.
        Err(PortForwardError::NoIptables) => return Ok(0),
        Err(e) => return Err(e),
    };
    let deletes = delete_args_for_listing(&listing);
    for args in &deletes {
        iptables(netns, args)?;
    }
    Ok(deletes.len())
}

/// A running forwarder: the listener in the pod's namespace, its redirect rule and the connections.
/// [`PortForwarder::stop`] (or dropping it) closes them all; the rule is removed by `stop`.
#[derive(Debug)]
pub struct PortForwarder {
    netns: PathBuf,
    listen_port: u16,
    task: JoinHandle<()>,
}

impl PortForwarder {
    /// Listens in the namespace at `netns`, adds the redirect rule, and forwards every connection to
    /// the guest behind the VMM's hybrid-vsock socket `vsock_uds`.
    pub async fn start(netns: &Path, vsock_uds: &Path) -> Result<Self, PortForwardError> {
        let path = netns.to_path_buf();
        let undo_path = path.clone();
        let made = run_in_netns_or_undo(
            netns,
            move |_| async move { Ok(listen_and_redirect(&path)) },
            move |_, made: Result<(std::net::TcpListener, u16), PortForwardError>| async move {
                if let Ok((_, port)) = made {
                    let _ = iptables(&undo_path, &rule_args("-D", port));
                }
            },
        )
        .await?;
        let (std_listener, listen_port) = made?;
        let listener = match std_listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(std_listener))
        {
            Ok(l) => l,
            Err(source) => {
                let _ = remove_rules(netns).await;
                return Err(PortForwardError::Listen {
                    netns: netns.to_owned(),
                    source,
                });
            }
        };
        info!(netns = %netns.display(), listen_port, "CRI port-forward ready");
        let task = tokio::spawn(accept_loop(
            listener,
            vsock_uds.to_owned(),
            netns.to_owned(),
        ));
        Ok(PortForwarder {
            netns: netns.to_owned(),
            listen_port,
            task,
        })
    }

    /// The listener's port in the pod's namespace.
    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    /// Closes the listener and every forwarded connection, and removes the rule (a namespace that
    /// is already gone took it along).
    pub async fn stop(self) {
        self.task.abort();
        let path = self.netns.clone();
        let port = self.listen_port;
        let r = run_in_netns(&self.netns, move |_| async move {
            Ok(iptables(&path, &rule_args("-D", port)))
        })
        .await;
        match r {
            Ok(Ok(_)) => debug!(netns = %self.netns.display(), "port-forward rule removed"),
            Err(e) if e.is_netns_gone() => {}
            Ok(Err(e)) => warn!("port-forward teardown: {e}"),
            Err(e) => warn!("port-forward teardown: {e}"),
        }
    }
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        // The listener's socket holds the namespace alive: never outlive the sandbox.
        self.task.abort();
    }
}

/// In the namespace's thread: binds the listener and adds the rule.
fn listen_and_redirect(netns: &Path) -> Result<(std::net::TcpListener, u16), PortForwardError> {
    let listen_err = |source| PortForwardError::Listen {
        netns: netns.to_owned(),
        source,
    };
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(listen_err)?;
    let port = listener.local_addr().map_err(listen_err)?.port();
    iptables(netns, &rule_args("-A", port))?;
    Ok((listener, port))
}

async fn accept_loop(listener: TcpListener, vsock_uds: PathBuf, netns: PathBuf) {
    let mut conns = JoinSet::new();
    loop {
        // Reap finished connections; at the cap, wait for one to end before accepting more.
        while conns.try_join_next().is_some() {}
        if conns.len() >= MAX_CONNECTIONS {
            conns.join_next().await;
            continue;
        }
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(netns = %netns.display(), "port-forward accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let uds = vsock_uds.clone();
        conns.spawn(async move {
            if let Err(e) = forward(tcp, &uds).await {
                info!(%peer, "port-forward connection failed: {e}");
            }
        });
    }
    // Dropping `conns` (when this task is aborted) aborts every connection.
}

/// The port a redirected connection was meant for.
fn original_port(tcp: &TcpStream) -> io::Result<u16> {
    let addr = getsockopt(tcp, OriginalDst).map_err(io::Error::from)?;
    Ok(u16::from_be(addr.sin_port))
}

async fn forward(mut tcp: TcpStream, vsock_uds: &Path) -> Result<(), ForwardError> {
    let port = original_port(&tcp).map_err(ForwardError::OriginalDst)?;
    let mut guest = hybrid_vsock::connect(
        vsock_uds,
        capsa_proto::PORT_FORWARD_VSOCK_PORT,
        CONNECT_TIMEOUT,
    )
    .await?;
    guest
        .write_all(format!("{port}\n").as_bytes())
        .await
        .map_err(ForwardError::Io)?;
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, read_answer(&mut guest))
        .await
        .map_err(|_| ForwardError::Answer {
            port,
            answer: "no answer within 10s".into(),
        })?
        .map_err(ForwardError::Io)?;
    if answer != "OK" {
        // Reset rather than close, so the client sees an error as it would for a refused port
        // instead of an empty answer.
        // (A zero linger sends RST on close without blocking.)
        let reset = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = setsockopt(&tcp, Linger, &reset);
        return Err(ForwardError::Answer { port, answer });
    }
    let (up, down) = tokio::io::copy_bidirectional(&mut tcp, &mut guest)
        .await
        .map_err(ForwardError::Io)?;
    debug!(
        port,
        to_guest = up,
        to_host = down,
        "port-forward connection done"
    );
    Ok(())
}

/// Reads the agent's answer line byte by byte (payload may follow it).
async fn read_answer(s: &mut tokio::net::UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the forward before answering",
            ));
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() >= MAX_ANSWER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the agent's answer line is too long",
            ));
        }
        line.push(b[0]);
    }
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("SO_ORIGINAL_DST: {0}")]
    OriginalDst(io::Error),
    #[error(transparent)]
    Vsock(#[from] hybrid_vsock::HybridVsockError),
    #[error("guest refused port {port}: {answer}")]
    Answer { port: u16, answer: String },
    #[error("{0}")]
    Io(io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_and_its_deletion_from_a_listing() {
        let add = rule_args("-A", 40123);
        assert_eq!(
            add.join(" "),
            "-w 5 -t nat -A OUTPUT -p tcp -d 127.0.0.1/32 -m comment --comment capsa-port-forward \
             -j REDIRECT --to-ports 40123"
        );
        // What `iptables -t nat -S OUTPUT` prints (iptables-nft and legacy alike).
        let listing = "-P OUTPUT ACCEPT\n\
            -A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n\
            -A OUTPUT -d 127.0.0.1/32 -p tcp -m comment --comment capsa-port-forward -j REDIRECT --to-ports 40123\n";
        let dels = delete_args_for_listing(listing);
        assert_eq!(dels.len(), 1);
        assert_eq!(
            dels[0].join(" "),
            "-w 5 -t nat -D OUTPUT -d 127.0.0.1/32 -p tcp -m comment --comment capsa-port-forward \
             -j REDIRECT --to-ports 40123"
        );
        assert!(delete_args_for_listing("-P OUTPUT ACCEPT\n").is_empty());
    }
}
