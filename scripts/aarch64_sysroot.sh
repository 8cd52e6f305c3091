#!/usr/bin/env bash
# Cached aarch64 sysroot for running aarch64 TVM libraries on x86-64 under qemu-user:
# Debian's python3.11:arm64 (dpkg -x) plus aarch64 wheels from PyPI. Installs the cross
# toolchain and qemu-user if missing. Idempotent; prints the wrapper SYSROOT/bin/python last.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${IBERT_TVM_CACHE:-$HOME/.cache/ibert-tvm}
SYSROOT=$CACHE/aarch64-sysroot
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# Runtime deps of `import tvm` and the runner (psutil, cloudpickle, tornado: tvm's rpc extra).
WHEELS=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy ml_dtypes typing_extensions
        tokenizers safetensors psutil cloudpickle tornado)
# pip 23 does not widen --platform to older manylinux tags, so name every one the wheels use.
PLATFORMS=(manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux_2_24_aarch64
           manylinux_2_17_aarch64 manylinux2014_aarch64)
STAMP=$(sha256sum "$0" | cut -c1-16)  # a changed recipe rebuilds the sysroot

export DEBIAN_FRONTEND=noninteractive
for tool in qemu-aarch64 aarch64-linux-gnu-gcc aarch64-linux-gnu-g++; do
  command -v "$tool" >/dev/null || missing=1
done
if [ -n "${missing:-}" ]; then
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user >&2
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/aarch64-sysroot.lock"
flock 9  # concurrent callers (pytest workers) wait for one build
if [ "$(cat "$SYSROOT/.stamp" 2>/dev/null)" != "$STAMP" ]; then
  rm -rf "$CACHE"/aarch64-sysroot.tmp.*  # left by a killed run
  TMP=$(mktemp -d "$CACHE/aarch64-sysroot.tmp.XXXXXX")
  trap 'rm -rf "$TMP"' EXIT
  echo "building $SYSROOT" >&2
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -qq >&2
  # libstdc++6: TVM's libraries need it and python3.11 does not depend on it.
  PKGS=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
           --no-replaces --no-enhances python3.11:arm64 libstdc++6:arm64 | grep -E '^[a-z0-9.+-]+:arm64$' | sort -u)
  mkdir "$TMP/debs" "$TMP/root"
  # As root, apt would download as _apt, which cannot enter the 0700 temp dir.
  (cd "$TMP/debs" && apt-get download -qq -o APT::Sandbox::User=root $PKGS >&2)
  for deb in "$TMP"/debs/*.deb; do dpkg -x "$deb" "$TMP/root"; done
  # Debian ships no stdlib .pyc (postinst makes them); compiling under emulation would be slow
  # and PYTHONDONTWRITEBYTECODE may forbid caching it. Same Python minor, so the x86 .pyc fit.
  "$PY" -m compileall -q -j0 "$TMP/root/usr/lib/python3.11" >&2
  # With argv[0] = bin/python, Python looks for its stdlib under SYSROOT/lib (see the wrapper).
  ln -s ../usr/lib/python3.11 "$TMP/root/lib/python3.11"
  platform_args=()
  for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
  "$PY" -m pip download -q -d "$TMP/wheels" "${platform_args[@]}" --python-version 3.11 \
    --implementation cp --only-binary=:all: "${WHEELS[@]}" >&2
  "$PY" -m pip install -q --no-index --no-deps --target "$TMP/root/site" "${platform_args[@]}" \
    --python-version 3.11 --implementation cp --only-binary=:all: "$TMP"/wheels/*.whl >&2
  mkdir -p "$TMP/root/bin"
  # -0 makes the wrapper the guest's argv[0], so sys.executable is the wrapper and a
  # re-exec of sys.executable (multiprocessing, TVM's RPC/popen pools) goes through qemu again.
  cat >"$TMP/root/bin/python" <<EOF
#!/bin/sh
exec qemu-aarch64 -L "$SYSROOT" -0 "$SYSROOT/bin/python" \\
  -E PYTHONPATH="$SYSROOT/site\${PYTHONPATH:+:\$PYTHONPATH}" "$SYSROOT/usr/bin/python3.11" "\$@"
EOF
  chmod +x "$TMP/root/bin/python"
  rm -rf "$TMP/debs" "$TMP/wheels"
  echo "$STAMP" >"$TMP/root/.stamp"
  rm -rf "$SYSROOT"
  mv "$TMP/root" "$SYSROOT"
fi
echo "$SYSROOT/bin/python"
