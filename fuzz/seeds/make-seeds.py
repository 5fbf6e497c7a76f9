#!/usr/bin/env python3
"""Writes the hand-made seed inputs of each fuzz target into fuzz/corpus/<target>/seed-*: valid requests
and packets in each target's input format (see the comment at the top of each fuzz_targets/*.rs), from
which the fuzzer mutates. Run again after changing a target's input format."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes(data))


u8 = lambda v: struct.pack("<B", v)
u16 = lambda v: struct.pack("<H", v)
u32 = lambda v: struct.pack("<I", v)
u64 = lambda v: struct.pack("<Q", v)

# --- vsock_tx: ops 0 tx packet, 1 rx buffer, 2 step, 3 host service writes, 4 host connects, 5 host reads
# and hangs up, 6 shutdown.
def pkt(op, payload=b"", src=0, flags=0, split=0, buf_alloc=65536, fwd=0, dst_plus=0):
    # header mode byte: bit 0 clear = built header, bit 7 = destination port 1025 instead of 1024.
    return (u8(0) + u8(dst_plus << 7) + u8(src) + u8(op) + u8(flags) + u32(buf_alloc) + u32(fwd)
            + u16(len(payload)) + payload + u8(split))

rx = lambda n: u8(1) + u16(n)
step = u8(2)
host_write = lambda b: u8(3) + u8(len(b)) + b
put("vsock_tx", "connect-rw-close",
    rx(4096) + rx(4096) + pkt(1) + step + host_write(b"hello") + step + pkt(5, b"ping", split=1) + b"\x20"
    + step + u8(5) + u8(1) + pkt(6) + pkt(4, flags=3) + step + pkt(3) + step)
put("vsock_tx", "refused-port", rx(512) + pkt(1, dst_plus=1) + step + pkt(5, b"x" * 100) + step)
put("vsock_tx", "host-connect",
    rx(4096) + u8(4) + u8(11) + b"CONNECT 52\n" + step + u8(4) + u8(9) + b"CONNECT x" + step
    + pkt(2, src=1) + step + u8(6) + u8(2) + step)
raw_hdr = u64(3) + u64(2) + u32(0x4000) + u32(1024) + u32(0xffff) + u16(1) + u16(5) + u32(0) + u32(0) + u32(0)
put("vsock_tx", "raw-header-lying-len", rx(64) + u8(0) + u8(1) + raw_hdr + u16(16) + b"A" * 16 + u8(0x06) + u8(3) + u8(9) + step)

# --- blk_request: flags (bit 0 read-only), then requests: kind (bits 0-2 type index IN OUT FLUSH GET_ID ...,
# bit 3 raw type u32, bit 4 header length byte, bits 5-6 data descriptors, bit 7 raw descriptors).
def req(type_idx, sector, datas, status=1, ndata=None, extra=b""):
    ndata = len(datas) if ndata is None else ndata
    b = u8(type_idx | (ndata << 5)) + extra + u64(sector)
    for (lenfield, fill) in datas:
        b += u16(lenfield) + fill
    return b + u8(status)

put("blk_request", "in-out-flush-id",
    u8(0) + req(0, 0, [(1, b"")]) + req(1, 3, [(2, bytes(range(256)) * 4)]) + req(2, 0, [])
    + req(3, 0, [(0x8000 | 20, b"")]) + req(0, 2, [(1, b""), (1, b"")]))
put("blk_request", "readonly-write", u8(1) + req(1, 0, [(1, b"\x55" * 512)]) + req(0, 63, [(1, b"")]))
put("blk_request", "past-end-partial", u8(0) + req(0, 64, [(1, b"")]) + req(0, 0, [(0x8000 | 100, b"")]) + req(5, 0, []))
raw = lambda addr, ln, flags, nxt: u64(addr) + u32(ln) + u16(flags) + u16(nxt)
put("blk_request", "raw-loop",
    u8(0) + u8(0x81) + raw(0x10000, 16, 1, 1) + raw(0x10100, 1, 3, 0)
    + u8(0x80) + raw(0x200000, 16, 0, 0))

# --- desc_chain: size selector, avail idx, max_bytes, then guest memory from 0: descriptor table at 0,
# avail ring at 0x1000 (idx is set from the header), data after 0x3000.
def memimg(descs, ring, extra=()):
    m = bytearray(0x1000 + 4 + 2 * len(ring))
    for i, (addr, ln, flags, nxt) in enumerate(descs):
        m[16 * i:16 * i + 16] = raw(addr, ln, flags, nxt)
    for i, h in enumerate(ring):
        m[0x1004 + 2 * i:0x1006 + 2 * i] = u16(h)
    for (at, data) in extra:
        if len(m) < at + len(data):
            m.extend(bytes(at + len(data) - len(m)))
        m[at:at + len(data)] = data
    return bytes(m)

hdr = lambda sel, idx, maxb: u8(sel) + u16(idx) + u32(maxb)
put("desc_chain", "read-write", hdr(4, 2, 0x10000) + memimg(
    [(0x3000, 16, 1, 1), (0x3100, 8, 3, 2), (0x3200, 1, 2, 0), (0x3300, 64, 0, 0)], [0, 3]))
put("desc_chain", "loop", hdr(3, 1, 0x10000) + memimg([(0x3000, 16, 1, 1), (0x3100, 16, 1, 0)], [0]))
put("desc_chain", "indirect", hdr(2, 1, 0x10000) + memimg(
    [(0x4000, 48, 4, 0)], [0],
    [(0x4000, raw(0x3000, 16, 1, 1) + raw(0x10000, 32, 3, 2) + raw(0x3400, 4, 2, 0))]))
put("desc_chain", "across-hole-readafterwrite", hdr(4, 3, 0x100) + memimg(
    [(0x7ff0, 0x100, 0, 0), (0x3000, 8, 3, 2), (0x3100, 8, 0, 0), (0x3000, 0x200, 0, 0)], [0, 1, 3]))

# --- mmio: flags, then ops: 0 read, 1 register write, 2 any write, 3 guest memory write, 4 driver init,
# 5 notify.
chain_mem = u8(3) + u16(0x1000) + u8(32) + raw(0x8000, 16, 1, 1) + raw(0x8100, 16, 2, 0)
ring_mem = u8(3) + u16(0x2000) + u8(6) + u16(0) + u16(1) + u16(0)
init = u8(4) + u32(0) + (u16(16) + u16(0x1000) + u16(0x2000) + u16(0x3000)) \
    + (u16(16) + u16(0x4000) + u16(0x5000) + u16(0x6000)) + (u16(1) + u16(0x7000) + u16(0x7100) + u16(0x7200))
read = lambda off, n: u8(0) + u16(off) + u8(n)
put("mmio", "init-notify-reset", u8(0) + chain_mem + ring_mem + init + u8(5) + u8(0) + read(0x70, 4)
    + read(0x100, 8) + u8(2) + u16(0x104) + u8(2) + b"\x01\x02" + u8(1) + u8(8) + u32(0) + read(0x34, 4))
put("mmio", "no-reset-device", u8(1) + init + u8(1) + u8(8) + u32(0) + init)
put("mmio", "bad-widths", u8(0) + read(0x70, 2) + read(0x71, 4) + read(0xfff, 8) + u8(2) + u16(0x70) + u8(8) + u64(15))

# --- agent_requests: selector, then a protobuf request or JSON.
def pb_bytes(field, data):
    return varint(field << 3 | 2) + varint(len(data)) + data

def pb_varint(field, v):
    return varint(field << 3) + varint(v)

def varint(v):
    out = b""
    while True:
        b = v & 0x7f
        v >>= 7
        if v:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])

spec = (b'{"ociVersion":"1.0.2","process":{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},'
        b'"rlimits":[{"type":"RLIMIT_NOFILE","soft":1024,"hard":4096}]},"root":{"path":"/run/rootfs"},'
        b'"hostname":"c1","mounts":[{"destination":"/proc","type":"proc","source":"proc"},'
        b'{"destination":"/data","type":"bind","source":"/tmp","options":["rbind","ro"]}],'
        b'"linux":{"namespaces":[{"type":"pid"},{"type":"ipc","path":"/proc/9/ns/ipc"},{"type":"mount"},'
        b'{"type":"network"}],"resources":{"memory":{"limit":67108864},"cpu":{"shares":512,"quota":50000,'
        b'"period":100000,"cpus":"0-1"},"pids":{"limit":100}},"sysctl":{"net.ipv4.ip_forward":"1",'
        b'"kernel.msgmax":"8192"},"rootfsPropagation":"rslave"},'
        b'"annotations":{"io.kubernetes.cri.container-type":"sandbox"}}')
storage = (pb_varint(1, 2) + pb_bytes(3, b"capsa-shared") + pb_bytes(4, b"virtiofs")
           + pb_bytes(5, b"ro") + pb_bytes(5, b"nodev") + pb_bytes(6, b"/run/capsa/shared"))
put("agent_requests", "create-container",
    u8(0) + pb_bytes(1, b"c1") + pb_bytes(2, b"c1") + pb_bytes(3, spec) + pb_bytes(4, storage))
put("agent_requests", "spec-json", u8(0x81) + spec)
put("agent_requests", "exec-process", u8(2) + b'{"args":["ls","-l"],"cwd":"/","env":["A=b"],"terminal":true,'
    b'"user":{"uid":1000,"gid":1000},"noNewPrivileges":false,"capabilities":{"bounding":["CAP_KILL"]}}')
put("agent_requests", "update-resources", u8(3) + b'{"memory":{"limit":-1,"swap":1000},"cpu":{"cpus":"0","mems":"0"},'
    b'"blockIO":{"weight":100},"hugepageLimits":[{"pageSize":"2MB","limit":0}]}')
put("agent_requests", "storage-blk", u8(4) + pb_varint(1, 1) + pb_bytes(3, b"/dev/vda") + pb_bytes(5, b"rbind")
    + pb_bytes(6, b"/run/kata-containers/../x") + pb_varint(7, 1000))
ipaddr = lambda fam, a, m: pb_varint(1, fam) + pb_bytes(2, a) + pb_bytes(3, m)
iface = (pb_bytes(1, b"eth0") + pb_bytes(2, b"eth0") + pb_bytes(3, ipaddr(0, b"10.88.0.5", b"16"))
         + pb_bytes(3, ipaddr(1, b"fd00::5", b"64")) + pb_varint(4, 1500) + pb_bytes(5, b"02:42:ac:11:00:02"))
put("agent_requests", "update-interface", u8(5) + pb_bytes(1, iface))
route = lambda d, g, dev, fam: pb_bytes(1, d) + pb_bytes(2, g) + pb_bytes(3, dev) + pb_varint(6, fam)
routes = pb_bytes(1, route(b"", b"10.88.0.1", b"eth0", 0)) + pb_bytes(1, route(b"10.88.0.0/16", b"", b"eth0", 0)) \
    + pb_bytes(1, route(b"fd00::/64", b"", b"eth0", 1)) + pb_bytes(1, route(b"default", b"fe80::1", b"eth0", 1))
put("agent_requests", "update-routes", u8(6) + pb_bytes(1, routes))
neigh = pb_bytes(1, ipaddr(0, b"10.88.0.7", b"")) + pb_bytes(2, b"eth0") + pb_bytes(3, b"aa:bb:cc:dd:ee:ff") + pb_varint(4, 128)
put("agent_requests", "arp-neighbors", u8(7) + pb_bytes(1, neigh))
