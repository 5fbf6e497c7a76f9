//! capsa host runtime library: the pieces the `capsa` CLI and (later) the containerd shim share.
//!
//! - [`hybrid_vsock`]: reach a guest port through the VMM's hybrid-vsock Unix socket.
//! - [`agent_client`]: the ttrpc client of the in-guest agent.
//! - [`vm`]: the hypervisor side: spawn `capsa-vmm`, wait for the agent, stop, clean up.
//! - [`virtiofsd`]: the virtio-fs backend of a sandbox's shared directory.
//! - [`supervise`]: a helper the guest depends on (virtiofsd) that dies takes the VM down (pidfds).
//! - [`jail`]: the VMM's jail (own uid, no capabilities, own root and namespaces) and the pod cgroup.
//! - [`check`]: host capability checks.
//! - [`network`]: a pod network namespace joined to tap devices for the VMM (tc redirects, as Kata).
//! - [`artifacts`]: where the VMM, guest kernel and initrd are found.
//! - [`run`]: `capsa run`, one container in a fresh microVM; [`oci_image`] unpacks image archives for it.

pub mod agent_client;
pub mod artifacts;
pub mod check;
pub mod hybrid_vsock;
pub mod jail;
pub mod metrics;
pub mod network;
pub mod oci_image;
pub mod run;
pub mod sandboxes;
pub mod shim;
pub mod supervise;
pub mod timeline;
pub mod virtiofsd;
pub mod vm;
