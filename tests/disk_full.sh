#!/usr/bin/env bash
# The real `tally` binary with its data directory on a small tmpfs that fills up under
# load (tests/it/disk_full.rs): 503 while full, checks still answer, nothing acknowledged
# lost, writes resume by themselves once space is freed. Mounting needs root, so this
# runs from .ci/run and not from `cargo test --workspace`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Room for the database, the 2 MiB ballast the test deletes, and little else.
SIZE=${TALLY_DISK_FULL_SIZE:-4m}

if [ "$(id -u)" != 0 ]; then
    echo "tests/disk_full.sh: needs root to mount a tmpfs (CI runs as root)" >&2
    exit 1
fi
mnt=$(mktemp -d /tmp/tally-disk-full.XXXXXX)
cleanup() {
    umount "$mnt" 2>/dev/null || true
    rmdir "$mnt"
}
trap cleanup EXIT
mount -t tmpfs -o "size=$SIZE,mode=0700" tmpfs "$mnt"
TALLY_DISK_FULL_DIR="$mnt" cargo test -p tally-tests --test it -- \
    --ignored --exact disk_full::writes_stop_while_the_disk_is_full_and_resume_when_space_returns \
    --nocapture
