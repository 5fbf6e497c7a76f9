#!/usr/bin/env python3
"""Prints the integration-test executables of one workspace member from `cargo test --no-run
--message-format=json` output.

usage: list-test-binaries.py ARTIFACTS.json MEMBER_DIR   (MEMBER_DIR relative to the workspace, e.g. tests/e2e)
"""
import json
import os
import sys

artifacts, member = sys.argv[1], sys.argv[2].strip("/")
suffix = os.sep + os.path.join(member, "Cargo.toml")
with open(artifacts) as f:
    for line in f:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if (m.get("reason") == "compiler-artifact" and m.get("executable")
                and m["target"]["kind"] == ["test"] and m["manifest_path"].endswith(suffix)):
            print(m["executable"])
