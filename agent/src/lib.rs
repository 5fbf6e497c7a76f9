//! capsa-agent: the guest's PID 1 (`/init` in the initrd) and the ttrpc server the host talks to
//! over virtio-vsock (`capsa.agent.v1.AgentService`, port 1024).
//!
//! One module per concept:
//! - [`boot_timer`]: the I/O-port write that timestamps agent start for the VMM.
//! - [`init`]: PID-1 duties (mounts, console stdio, cgroup v2 controllers, `lo`).
//! - [`logging`]: tracing to /dev/console, level from `capsa.log=` on the kernel command line.
//! - [`reaper`]: SIGCHLD reaping and the child-exit registry keyed by pid.
//! - [`guest_details`]: kernel, vCPUs, memory, boot time.
//! - [`sandbox`]: sandbox lifecycle (DestroySandbox's power-off).
//! - [`server`]: the ttrpc service and its listener.
//!
//! - [`container`]: OCI containers (libcontainer), storages, stdio streaming, cgroups, OOM events.
//! - [`network`]: interfaces, routes and neighbours of the guest's (= the pod's) network namespace, over
//!   rtnetlink.
//! - [`port_forward`]: CRI PortForward's guest end (vsock port 1026 → `127.0.0.1:PORT`).

pub mod boot_timer;
pub mod container;
pub mod guest_details;
pub mod init;
pub mod logging;
pub mod network;
pub mod port_forward;
pub mod reaper;
pub mod sandbox;
pub mod server;
