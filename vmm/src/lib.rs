//! capsa-vmm: a KVM virtual machine monitor for capsa's microVMs.

pub mod devices;
