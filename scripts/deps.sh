#!/usr/bin/env bash
# Install the Debian packages canopy needs, if any are missing.
# Uses sudo only when not already root. Sourced by demo.sh and test.sh.
set -euo pipefail

CANOPY_PACKAGES=(libzmq3-dev pkg-config gcc passwd util-linux procps iproute2 mpich python3-zmq python3-venv libkrb5-dev clang libclang-dev krb5-kdc krb5-admin-server krb5-user munge slurmctld slurmd slurm-client libpmix-dev)

# The Debian package (scripts/deb.sh, t/tests/package.rs): dpkg-shlibdeps
# for its dependencies, adduser for its maintainer scripts.
CANOPY_PACKAGES+=(dpkg-dev adduser)
# systemd-analyze checks the shipped unit (t/tests/package.rs).
CANOPY_PACKAGES+=(systemd)

canopy_install_deps() {
    local missing=()
    for p in "${CANOPY_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        return 0
    fi
    echo "canopy: installing missing packages: ${missing[*]}" >&2
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "canopy: need root or sudo to install ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

canopy_check_cargo() {
    command -v cargo >/dev/null || { echo "canopy: cargo not found; install Rust (https://rustup.rs) and retry" >&2; exit 1; }
}

# cargo-deb builds the Debian package (scripts/deb.sh, t/tests/package.rs).
canopy_install_cargo_deb() {
    command -v cargo-deb >/dev/null && return 0
    echo "canopy: installing cargo-deb (cargo install cargo-deb --locked)" >&2
    cargo install --locked cargo-deb
}
