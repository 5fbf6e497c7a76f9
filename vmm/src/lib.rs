//! capsa-vmm: a KVM virtual machine monitor for capsa's microVMs.
//!
//! [`Vmm::new`] builds a VM from a [`VmConfig`] (guest memory, in-kernel irqchip and PIT, legacy devices,
//! virtio-mmio devices, kernel and initrd, vCPUs); [`Vmm::run`] runs it until the guest stops it
//! ([`ExitReason`]), the host asks it to stop ([`Vmm::stop_flag`]) or something fails ([`Error`]).

pub mod arch;
pub mod bus;
pub mod config;
pub mod devices;
pub mod layout;
pub mod log_limit;
pub mod memory;
pub mod seccomp;
pub mod vcpu;
pub mod virtio_wiring;
pub mod vmm;

pub use config::{Cli, ConfigError, DiskConfig, FsConfig, VmConfig, VsockConfig};
pub use vmm::{Error, ExitReason, Vmm, VmmOptions};
