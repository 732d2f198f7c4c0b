#!/usr/bin/env bash
# `make image`: the deploy/Dockerfile's image built without a container registry (none is
# reachable here): a Debian bookworm root made by debootstrap from Debian's own mirror, the
# binaries and libtorch's libraries added as the Dockerfile adds them, packed as an OCI
# image layout by umoci, then unpacked and its entrypoint run once as its user; with
# IMDB_DATA, the pods of deploy/overlays/cpu then run from it (deploy/tests/run_pods.py).
#
#   scripts/image.sh [BIN_DIR]     (default target/release; needs root, debootstrap, umoci)
#
# Writes target/image/oci (tag imdb-ddp:0.1.0); `skopeo copy oci:target/image/oci:0.1.0
# docker://REGISTRY/imdb-ddp:0.1.0` pushes it where a registry is reachable. The Debian root
# is cached in target/image/rootfs.tar (delete it to refresh).
#
# Unlike deploy/Dockerfile, libtorch's CUDA wheels (nvidia-*) are not added here: this
# image is CPU-only, from the project's bootstrap libtorch (.libtorch/torch/lib).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN_DIR="${1:-target/release}"
OUT=target/image
TAG=0.1.0
LIBTORCH_DIR=/opt/imdb-ddp/.libtorch/torch/lib

for tool in debootstrap umoci setpriv chroot; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "image: skipped: $tool not found (Debian: apt-get install debootstrap umoci)"
    exit 0
  fi
done
if [[ $(id -u) != 0 ]]; then
  echo "image: skipped: debootstrap needs root"
  exit 0
fi
for b in coordinator worker; do
  [[ -x "$BIN_DIR/$b" ]] || { echo "image: $BIN_DIR/$b is missing (make build)" >&2; exit 1; }
done

mkdir -p "$OUT"
work="$(mktemp -d "$OUT/work.XXXXXX")"
trap 'rm -rf "$work"' EXIT

if [[ ! -f "$OUT/rootfs.tar" ]]; then
  echo "image: debootstrap bookworm (minbase) from deb.debian.org"
  debootstrap --variant=minbase --include=ca-certificates,libgomp1 bookworm "$work/base" \
    http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work/base/var/cache/apt/archives/"*.deb "$work/base/var/lib/apt/lists/"*
  tar -C "$work/base" -cf "$OUT/rootfs.tar" .
  rm -rf "$work/base"
fi

echo "image: an OCI layout with the Debian root, the binaries and libtorch"
rm -rf "$OUT/oci"
umoci init --layout "$OUT/oci"
umoci new --image "$OUT/oci:$TAG"
umoci unpack --image "$OUT/oci:$TAG" "$work/bundle" >/dev/null
root="$work/bundle/rootfs"
tar -C "$root" -xf "$OUT/rootfs.tar"
install -d "$root/usr/local/bin" "$root$LIBTORCH_DIR" "$root/etc/imdb-ddp" "$root/var/cache/imdb-ddp"
for b in coordinator worker; do
  # Debug symbols stay out of the image.
  objcopy --strip-debug "$BIN_DIR/$b" "$root/usr/local/bin/$b"
done
cp -a .libtorch/torch/lib/. "$root$LIBTORCH_DIR/"
rm -f "$root$LIBTORCH_DIR/libtorch_python.so"
cp -a configs "$root/etc/imdb-ddp/configs"
echo "trainer:x:10001:" >>"$root/etc/group"
echo "trainer:x:10001:10001:trainer:/tmp:/usr/sbin/nologin" >>"$root/etc/passwd"
umoci repack --image "$OUT/oci:$TAG" "$work/bundle"
umoci config --image "$OUT/oci:$TAG" \
  --config.user 10001:10001 --config.workingdir /tmp \
  --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --config.env "LD_LIBRARY_PATH=$LIBTORCH_DIR" \
  --config.env "IMDB_CACHE_DIR=/var/cache/imdb-ddp" --config.env "HOME=/tmp" \
  --config.exposedports 50051/tcp --config.exposedports 29500/tcp \
  --config.cmd /usr/local/bin/coordinator --config.cmd --help
umoci gc --layout "$OUT/oci"

echo "image: run its entrypoint once, from the image, as its user"
umoci unpack --image "$OUT/oci:$TAG" "$work/run" >/dev/null
# A private mount namespace for /proc, so that nothing is left mounted afterwards.
run() {
  unshare --mount --propagation private -- sh -c 'mount -t proc proc "$0/proc" && exec "$@"' \
    "$work/run/rootfs" chroot "$work/run/rootfs" setpriv --reuid=10001 --regid=10001 --clear-groups \
    --no-new-privs --inh-caps=-all --bounding-set=-all env -i HOME=/tmp LD_LIBRARY_PATH="$LIBTORCH_DIR" "$@"
}
run /usr/local/bin/coordinator --help | head -3
run /usr/local/bin/worker --version
# libtorch loads and trains a step in the image (a synthetic batch, no corpus needed).
run /usr/local/bin/worker bench-memory --steps 1 --seq-len 20 --vocab 100 --batch-size 4 | tail -2
# The pods of deploy/overlays/cpu from this image, in network namespaces (deploy/tests).
if [[ -n "${IMDB_DATA:-}" ]]; then
  python3 deploy/tests/run_pods.py --image-bundle "$work/run" --workers 2 --kill-worker
else
  echo "image: the pods were not run from the image: IMDB_DATA not set"
fi
size=$(du -sh "$OUT/oci" | cut -f1)
echo "image: $OUT/oci:$TAG ($size) built and run"
