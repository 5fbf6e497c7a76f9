//! Generates the protobuf messages and the async ttrpc client/server for `agent.proto` into OUT_DIR.

use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    println!("cargo:rerun-if-changed=agent.proto");
    println!("cargo:rerun-if-changed=build.rs");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    Codegen::new()
        .out_dir(&out_dir)
        .input("agent.proto")
        .include(".")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc-codegen failed on agent.proto");

    // The generated files start with inner attributes (`#![allow(..)]`) and inner doc comments,
    // which `include!` cannot take inside a module. Strip them; lib.rs puts the allows on the
    // wrapping modules instead.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out_dir.join(name);
        let text = std::fs::read_to_string(&path).expect("read generated file");
        let kept: String = text
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                !(t.starts_with("#![") || t.starts_with("//!"))
            })
            .flat_map(|l| [l, "\n"])
            .collect();
        std::fs::write(&path, kept).expect("write generated file");
    }
}
