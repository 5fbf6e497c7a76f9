//! capsa agent API: the protobuf messages and the async ttrpc client/server generated from
//! `agent.proto` (package `capsa.agent.v1`, service `AgentService`).
//!
//! - [`agent`]: messages (`CheckRequest`, `GuestDetailsResponse`, ...).
//! - [`agent_ttrpc`]: `AgentServiceClient`, the `AgentService` server trait and
//!   `create_agent_service` to register an implementation with a `ttrpc::asynchronous::Server`.
//!
//! The ttrpc and protobuf crates are re-exported so users build against the same versions.

pub use protobuf;
pub use ttrpc;

/// Guest vsock port the agent's ttrpc server listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host vsock port the agent connects to (and closes at once) when its server is listening, so the host
/// learns the agent is up without polling the guest while it boots. With hybrid vsock the connection arrives
/// at the Unix socket `<vsock socket>_1025`. Nobody listening there is fine: the host then polls.
pub const READY_NOTIFY_VSOCK_PORT: u32 = 1025;

/// Guest vsock port of the agent's port forwarder (CRI PortForward): the host writes a TCP port and
/// `\n`, the agent answers `OK\n` (or `ERR <reason>\n`) and joins the stream to `127.0.0.1:PORT` in the
/// guest.
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1026;

/// Fully qualified ttrpc service name.
pub const AGENT_SERVICE_NAME: &str = "capsa.agent.v1.AgentService";

/// Protobuf messages of `agent.proto`.
#[allow(
    clippy::all,
    clippy::pedantic,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    trivial_casts,
    unused_attributes,
    unused_mut,
    unused_results,
    unknown_lints
)]
#[rustfmt::skip]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// ttrpc client and server for `AgentService` (async).
#[allow(
    clippy::all,
    clippy::pedantic,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    trivial_casts,
    unsafe_code,
    unused_imports,
    unused_results,
    unknown_lints
)]
#[rustfmt::skip]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use agent_ttrpc::{create_agent_service, AgentService, AgentServiceClient};

#[cfg(test)]
mod tests {
    use super::agent::{CheckResponse, GuestDetailsResponse};
    use protobuf::Message;

    #[test]
    fn messages_round_trip() {
        let mut d = GuestDetailsResponse::new();
        d.kernel_release = "6.1.0".into();
        d.online_cpus = 2;
        d.mem_total_bytes = 128 << 20;
        let bytes = d.write_to_bytes().expect("encode");
        let back = GuestDetailsResponse::parse_from_bytes(&bytes).expect("decode");
        assert_eq!(back, d);

        let mut c = CheckResponse::new();
        c.status = super::agent::check_response::ServingStatus::SERVING.into();
        let back =
            CheckResponse::parse_from_bytes(&c.write_to_bytes().expect("encode")).expect("decode");
        assert_eq!(
            back.status.enum_value(),
            Ok(super::agent::check_response::ServingStatus::SERVING)
        );
    }
}
