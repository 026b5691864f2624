#!/usr/bin/env bash
# Set up obd on Debian 12 and optionally run it:
#
#   ./setup.sh                     install what is missing (Debian packages, .venv, obd in editable mode)
#   ./setup.sh test [PYTEST ARGS]  install, then run the gates (ruff check, ruff format --check, mypy)
#                                  and the test suite: .venv/bin/python -m pytest ARGS
#   ./setup.sh demo [ARGS]         install, then run the demo:        .venv/bin/obd demo ARGS
#
# Run it as root on a fresh machine (apt-get needs root; the tests create device nodes). On a machine
# where everything is in place it only checks, and finishes in well under a second.
set -euo pipefail

# Debian packages the project needs. One per line, with the reason; later work adds to this list
# (nbdkit, qemu, docker-registry, fuse3, ...). tests/helpers/fixtures.py maps programs to these packages.
PACKAGES=(
    python3-venv    # /usr/bin/python3 -m venv: Debian's Python 3.11, the interpreter nbdkit's plugin embeds
    e2fsprogs       # debugfs, e2fsck, mke2fs: read and check ext4 images in tests
    bzip2           # bzip2 for fixtures stored as .bz2 (Python's bz2 module reads them too)
    docker-registry # distribution 2.8: the real registry the registry client tests push to and read from
    apache2-utils   # htpasswd -Bbn: bcrypt password file for the registry's htpasswd-auth tests
    nbdkit          # the NBD server obd's Python plugin runs in
    nbdkit-plugin-python  # nbdkit's Python plugin (embeds Debian's Python 3.11)
    libnbd-bin      # nbdcopy, nbdinfo: NBD clients for tests and benchmarks
    fio             # the 4 KiB random-read and -write load of bench/bench_nbd.py
    python3-libnbd  # libnbd's Python binding, the NBD client of the tests
    qemu-utils      # qemu-img, qemu-io: more NBD clients for tests
    qemu-system-x86 # the microVMs (-M microvm, TCG where KVM is unusable)
    busybox-static  # the shell and tools of obd's initramfs
    debootstrap     # the Debian + python3 image of obd demo, the launcher tests and the benchmarks
    fuse3           # fusermount3 and /dev/fuse setup: obd mount
    libfuse3-dev    # headers pip needs to build pyfuse3 (it ships no wheels)
    pkg-config      # how pyfuse3's build finds libfuse3
    gcc             # compiles pyfuse3's C extension
    python3-dev     # Python.h for the same
)
# Optional dependency groups of pyproject.toml installed into .venv.
EXTRAS="test,plot"

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
VENV="$REPO/.venv"
STAMP="$VENV/.obd-setup-stamp"
SYSTEM_PYTHON=/usr/bin/python3

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" != installed ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        say "Debian packages present (${PACKAGES[*]})"
        return
    fi
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "need root to install: ${missing[*]} (run ./setup.sh as root)"
        sudo=(sudo)
    fi
    say "installing Debian packages: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The venv must run Debian's own interpreter: nbdkit's Python plugin embeds Debian's libpython3.11 and
# imports the engine and its wheels from this venv.
venv_ok() {
    [[ -x "$VENV/bin/python" ]] || return 1
    [[ "$(readlink -f "$VENV/bin/python")" == "$(readlink -f "$SYSTEM_PYTHON")" ]] || return 1
    "$VENV/bin/python" -c 'import sys' 2>/dev/null
}

make_venv() {
    [[ -x "$SYSTEM_PYTHON" ]] || die "$SYSTEM_PYTHON missing (Debian package python3)"
    if venv_ok; then
        return
    fi
    if [[ -e "$VENV" ]]; then
        say "replacing .venv (not a working venv of $SYSTEM_PYTHON)"
        rm -rf "$VENV"
    fi
    say "creating .venv with $SYSTEM_PYTHON ($("$SYSTEM_PYTHON" -c 'import platform; print(platform.python_version())'))"
    "$SYSTEM_PYTHON" -m venv "$VENV"
}

install_project() {
    local want
    want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1) extras=$EXTRAS"
    # Skip pip when pyproject.toml is unchanged since the last install and the editable install still
    # points at this checkout.
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] &&
        "$VENV/bin/python" - "$REPO" <<'EOF' 2>/dev/null; then
import pathlib, sys
import obd
sys.exit(0 if pathlib.Path(obd.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve()) else 1)
EOF
        say ".venv up to date (pyproject.toml unchanged)"
        return
    fi
    say "pip install -e .[$EXTRAS] into .venv"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q -e "$REPO[$EXTRAS]"
    printf '%s\n' "$want" >"$STAMP"
}

main() {
    local action="${1:-install}"
    case "$action" in
        install | test | demo) ;;
        -h | --help | help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    (($# == 0)) || shift
    cd "$REPO"
    install_packages
    make_venv
    install_project
    case "$action" in
        test)
            # The gates first: they take seconds and a failure there is cheaper to see before the suite.
            say "running: .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy"
            "$VENV/bin/ruff" check --quiet .
            "$VENV/bin/ruff" format --check --quiet .
            "$VENV/bin/mypy"
            say "running: .venv/bin/python -m pytest $*"
            exec "$VENV/bin/python" -m pytest "$@"
            ;;
        demo)
            say "running: .venv/bin/obd demo $*"
            exec "$VENV/bin/obd" demo "$@"
            ;;
    esac
    say "done"
}

main "$@"
