#!/usr/bin/env bash
# Install everything pytest-microvm needs on Debian 12 (as root, or with sudo
# available), into ./.venv, build the reference guests, and run the example
# suite on the default guest with both backends (our VMM and QEMU microvm).
#
#   sudo bash scripts/install.sh            # install + run the examples
#   sudo bash scripts/install.sh --no-run   # install only
set -euo pipefail
cd "$(dirname "$0")/.."

run_examples=1
[ "${1:-}" = "--no-run" ] && run_examples=0

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi

echo "==> Debian packages"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev python3-pip gcc binutils make libc6-dev linux-libc-dev \
    qemu-system-x86 busybox-static iproute2 acpica-tools xz-utils zstd ca-certificates >/dev/null

if [ ! -e /dev/kvm ]; then
    echo "error: /dev/kvm does not exist: this machine cannot run VMs (enable virtualization," \
         "or nested virtualization on a cloud VM, and load kvm_intel or kvm_amd)" >&2
    exit 1
fi

PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
echo "==> Python environment in .venv ($($PY --version))"
[ -x .venv/bin/python ] || $PY -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,fuzz]'

echo "==> reference guests"
.venv/bin/microvm guest build >/dev/null
.venv/bin/microvm host-info

if [ "$run_examples" = 1 ]; then
    echo "==> examples on the default tiny guest: our VMM, then QEMU microvm"
    .venv/bin/python -m pytest examples/ -q
    .venv/bin/python -m pytest examples/ -q --microvm-backend=qemu
fi
