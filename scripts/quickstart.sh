#!/usr/bin/env bash
# The main job on the embedded default (SQLite metadata + a local block directory):
# installs what it needs, builds a small safetensors model, imports it into a chunkfs
# volume, mounts it read-only, loads it through the mount with the safetensors library
# (checking every tensor), prints the load time and unmounts.
#
#   scripts/quickstart.sh                    # 512 MiB model under /tmp/chunkfs-quickstart
#   CHUNKFS_MODEL_SIZE=2G scripts/quickstart.sh
set -euo pipefail
source "$(dirname "$0")/lib/setup.sh"
cd "$ROOT"

install_debian "${FUSE_PACKAGES[@]}"
setup_venv model

WORK="${CHUNKFS_QUICKSTART_DIR:-/tmp/chunkfs-quickstart}"
SIZE="${CHUNKFS_MODEL_SIZE:-512M}"
META="sqlite://$WORK/models.db"
CHUNKFS="$VENV/bin/chunkfs"

if grep -qs " $WORK/mnt " /proc/self/mountinfo; then "$CHUNKFS" umount --lazy "$WORK/mnt"; fi
rm -rf "$WORK"
mkdir -p "$WORK/mnt"

say "generating a $SIZE synthetic safetensors model in $WORK/model"
"$PY" scripts/make_model.py "$WORK/model" --size "$SIZE" --shards 2 >/dev/null

say "chunkfs format $META --storage file://$WORK/blocks"
"$CHUNKFS" format "$META" --storage "file://$WORK/blocks"
say "chunkfs import $META $WORK/model /demo-model"
"$CHUNKFS" import "$META" "$WORK/model" /demo-model
"$CHUNKFS" status "$META"

say "chunkfs mount $META $WORK/mnt --read-only --background"
"$CHUNKFS" mount "$META" "$WORK/mnt" --read-only --cache-dir "$WORK/cache" --background \
    --log-file "$WORK/mount.log"
trap 'grep -qs " $WORK/mnt " /proc/self/mountinfo && "$CHUNKFS" umount --lazy "$WORK/mnt"' EXIT
ls -l "$WORK/mnt/demo-model"

say "loading the model through the mount (cold: blocks come from the store)"
"$PY" scripts/load_model.py "$WORK/mnt/demo-model" --compare "$WORK/model"

say "chunkfs umount $WORK/mnt"
"$CHUNKFS" umount "$WORK/mnt"
say "done"
