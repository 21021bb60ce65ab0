#!/usr/bin/env bash
# Installs everything the tests need and runs the whole suite: lint, units, layers against
# real servers, and real FUSE mounts. Extra arguments go to pytest (e.g. -k mount -x).
set -euo pipefail
source "$(dirname "$0")/lib/setup.sh"
cd "$ROOT"

# mmdebstrap and buildah build and run the node image (tests/test_image.py); Debian's python3.11
# and setpriv (util-linux) run the CLI as an unprivileged user (tests/test_cli.py)
install_debian "${FUSE_PACKAGES[@]}" redis-server redis-tools openssl mmdebstrap buildah python3.11 util-linux
setup_venv test

say "ruff"
"$VENV/bin/ruff" check chunkfs csi tests scripts
say "mypy"
"$VENV/bin/mypy" chunkfs csi scripts/*.py
say "pytest"
"$PY" -m pytest -p no:cacheprovider "$@"
