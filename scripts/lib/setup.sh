# Shared set-up for scripts/quickstart.sh, scripts/test.sh and scripts/bench: installs the
# Debian packages and the Python virtualenv (.venv) chunkfs needs. Idempotent and quiet
# when everything is already there. Source it; do not run it.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${CHUNKFS_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root to run: $*"; fi
}

# install_debian PKG...: installs the Debian packages that are missing.
install_debian() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# setup_venv EXTRAS: creates .venv and installs chunkfs (editable) with the given extras.
setup_venv() {
    local extras="$1"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "chunkfs needs Python 3.11 or newer"
    if [ ! -x "$PY" ]; then
        say "creating virtualenv $VENV"
        python3 -m venv "$VENV"
        "$PY" -m pip install -q --upgrade pip >/dev/null
    fi
    local stamp="$VENV/.chunkfs-installed-$extras"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        say "installing chunkfs[$extras] into $VENV"
        "$PY" -m pip install -q -e "$ROOT[$extras]" 2>&1 | grep -vE "^(WARNING: Location|  )" >&2 || true
        "$PY" -c "import chunkfs, pyfuse3" || die "chunkfs did not install"
        touch "$stamp"
    fi
}

FUSE_PACKAGES=(fuse3 libfuse3-dev pkg-config)
