//! The agent's decoding and validation of what the host sends: the protobuf requests as ttrpc delivers
//! them, then the same checks the agent's handlers run before they touch anything: ids, the OCI spec
//! (namespaces, process, rootfs, mounts, resources, sysctls, rootfs propagation), an exec's process,
//! resource updates, storage mount points and options, interfaces, routes and ARP neighbours.
//!
//! Input: a selector byte, then the request (protobuf), or for the JSON-only paths the JSON itself (so
//! the fuzzer mutates JSON directly).
#![no_main]

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use capsa_agent::container::{path, spec, storage};
use capsa_agent::network::parse;
use capsa_proto::agent::{
    AddARPNeighborsRequest, CreateContainerRequest, ExecProcessRequest, Storage,
    UpdateContainerRequest, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use capsa_proto::protobuf::Message;
use libfuzzer_sys::fuzz_target;

/// A rootfs directory that exists, as a rootfs storage's mount point would.
fn rootfs() -> &'static Path {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        let d = capsa_fuzz::scratch_dir("agent").join("rootfs");
        std::fs::create_dir_all(&d).expect("rootfs dir");
        d
    })
}

fn check_spec(json: &[u8], container_id: &str, with_storage: bool) {
    let Ok(mut s) = spec::parse_spec(json) else {
        return;
    };
    let pod = spec::PodNamespaces {
        ipc: "/proc/1/ns/ipc".into(),
        uts: "/proc/1/ns/uts".into(),
        pid: "/proc/1/ns/pid".into(),
    };
    let cg = format!("/capsa/{container_id}");
    let ctx = spec::PrepareContext {
        container_id,
        rootfs_storage: with_storage.then(rootfs),
        pod: &pod,
        cgroup_path: &cg,
        online_cpus: 2,
        online_mems: 1,
    };
    let Ok(sysctls) = spec::take_net_sysctls(&mut s) else {
        return;
    };
    // The agent writes each to /proc/sys/<path>: it must stay under /proc/sys/net, on one line.
    for (rel, value) in &sysctls {
        assert!(rel.starts_with("net"), "sysctl {rel:?}");
        assert!(
            rel.components().all(|c| matches!(c, Component::Normal(_))),
            "sysctl {rel:?} leaves /proc/sys/net"
        );
        assert!(!value.contains(['\n', '\0']), "sysctl value {value:?}");
    }
    if let Ok(s) = spec::prepare_spec(s, &ctx) {
        let _ = spec::is_pod_sandbox(&s);
        let _ = spec::propagated_bind_sources(&s);
        // What the agent hands libcontainer must serialise.
        serde_json_roundtrip(&s);
    }
}

fn serde_json_roundtrip(s: &oci_spec::runtime::Spec) {
    let v = serde_json::to_vec(s).expect("prepared spec serialises");
    let _: oci_spec::runtime::Spec = serde_json::from_slice(&v).expect("prepared spec parses back");
}

fn check_storage(s: &Storage) {
    if let Ok(mp) = storage::mount_point(s) {
        assert!(mp.is_absolute());
        assert!(mp != Path::new("/"));
        for f in ["/proc", "/sys", "/dev"] {
            assert!(!mp.starts_with(f), "mount point {mp:?} under {f}");
        }
    }
    let _ = storage::parse_options(&s.options);
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match sel % 8 {
        0 => {
            let Ok(req) = CreateContainerRequest::parse_from_bytes(body) else {
                return;
            };
            if path::check_id("container", &req.container_id).is_err() {
                return;
            }
            if !req.exec_id.is_empty() && path::check_id("exec", &req.exec_id).is_err() {
                return;
            }
            for s in &req.storages {
                check_storage(s);
            }
            check_spec(
                &req.oci_spec_json,
                &req.container_id,
                !req.storages.is_empty(),
            );
        }
        1 => check_spec(body, "c1", sel & 0x80 != 0),
        2 => {
            let json = match ExecProcessRequest::parse_from_bytes(body) {
                Ok(req) if sel & 0x80 != 0 => {
                    let _ = path::check_id("exec", &req.exec_id);
                    req.oci_process_json
                }
                _ => body.to_vec(),
            };
            if let Ok(p) = spec::parse_process(&json) {
                spec::check_process(&p)
                    .expect("parse_process returned a process check_process refuses");
            }
        }
        3 => {
            let json = match UpdateContainerRequest::parse_from_bytes(body) {
                Ok(req) if sel & 0x80 != 0 => req.linux_resources_json,
                _ => body.to_vec(),
            };
            if let Ok(res) = serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&json) {
                let _ = spec::check_resources(&res, 2, 1);
            }
        }
        4 => {
            if let Ok(s) = Storage::parse_from_bytes(body) {
                check_storage(&s);
            }
        }
        5 => {
            if let Ok(req) = UpdateInterfaceRequest::parse_from_bytes(body) {
                if let Some(i) = req.interface.as_ref() {
                    let _ = parse::parse_interface(i);
                }
            }
        }
        6 => {
            if let Ok(req) = UpdateRoutesRequest::parse_from_bytes(body) {
                let routes = req
                    .routes
                    .as_ref()
                    .map(|r| r.routes.as_slice())
                    .unwrap_or(&[]);
                let _ = parse::parse_routes(routes);
            }
        }
        _ => {
            if let Ok(req) = AddARPNeighborsRequest::parse_from_bytes(body) {
                for (i, n) in req.neighbors.iter().enumerate() {
                    let _ = parse::parse_neighbor(i, n);
                }
            }
        }
    }
});
