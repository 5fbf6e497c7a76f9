#!/bin/bash
# Builds a busybox OCI image archive from Debian's busybox-static, for `ctr image import`.
# Usage: busybox-oci.sh OUT.tar [IMAGE_NAME [CMD_JSON]]   (default name docker.io/library/busybox:capsa,
# default command '["sh"]'; the CRI suite builds its pause image with '["/bin/sleep", "2147483647"]')
set -euo pipefail
out=$(realpath -m "$1")
name=${2:-docker.io/library/busybox:capsa}
cmd=${3:-'["sh"]'}
bb=$(command -v busybox || true)
[ -x /bin/busybox ] && bb=/bin/busybox
# ldd fails on a static binary: a dynamic busybox would not run in the container.
if [ -z "$bb" ] || ldd "$bb" >/dev/null 2>&1; then
  echo "busybox-oci.sh: need Debian's busybox-static (apt-get install busybox-static)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,root,usr/bin,usr/sbin,var}
cp "$bb" "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do
  [ "$a" = busybox ] && continue
  ln "$root/bin/busybox" "$root/bin/$a" 2>/dev/null || true
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
chmod 1777 "$root/tmp"
mkdir -p "$work/oci/blobs/sha256"
tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$root" -cf "$work/layer.tar" .
diffid=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -c "$work/layer.tar" > "$work/layer.tar.gz"
layer=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
layer_size=$(stat -c %s "$work/layer.tar.gz")
mv "$work/layer.tar.gz" "$work/oci/blobs/sha256/$layer"
python3 - "$work/oci" "$diffid" "$layer" "$layer_size" "$name" "$cmd" <<'PY'
import hashlib, json, os, sys
oci, diffid, layer, layer_size, name, cmd = sys.argv[1:]
def blob(obj):
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    d = hashlib.sha256(data).hexdigest()
    open(os.path.join(oci, "blobs/sha256", d), "wb").write(data)
    return d, len(data)
config = {"architecture": "amd64", "os": "linux",
          "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": json.loads(cmd), "WorkingDir": "/"},
          "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diffid]}}
cd, cs = blob(config)
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + layer, "size": int(layer_size)}]}
md, ms = blob(manifest)
index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
         "digest": "sha256:" + md, "size": ms, "platform": {"architecture": "amd64", "os": "linux"},
         "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}]}
json.dump(index, open(os.path.join(oci, "index.json"), "w"))
json.dump({"imageLayoutVersion": "1.0.0"}, open(os.path.join(oci, "oci-layout"), "w"))
PY
tar -C "$work/oci" -cf "$out" oci-layout index.json blobs
echo "$out ($name)"
