//! `containerd-shim-capsa-v2`: containerd's shim v2 for capsa (one shim and one microVM per pod).
//!
//! - [`bootstrap`]: the `start`/`delete` protocol of containerd 1.6.
//! - [`config`]: `/etc/capsa/configuration.toml` and the sizing annotations.
//! - [`task`]: the Task service, mapped onto the agent through [`sandbox::Sandbox`].
//! - [`stdio`]: containerd's FIFOs ⇄ the agent's stream calls.
//! - [`events`]: task events to containerd.

pub mod bootstrap;
pub mod cleanup;
pub mod config;
pub mod debug_console;
pub mod events;
pub mod install;
pub mod log_binary;
pub mod sandbox;
pub mod shared_fs;
pub mod stdio;
pub mod task;
pub mod vm_sandbox;
