#!/usr/bin/env bash
# The benchmark: chunkstream against rclone on one loopback S3 server (s3s-fs),
# plus memory, polling and Redis cost. A harness, not a test: it prints figures
# and never fails on speed.
#
#   scripts/bench.sh                 # everything, prints the table
#   scripts/bench.sh --write-doc     # ... and updates docs/benchmarks.md
#   scripts/bench.sh --quick         # small data sets, to try the harness
#   scripts/bench.sh throughput      # one part: throughput, instructions, burst,
#                                    # growing, memory, polling, bandwidth
#   BENCH_BINARY=/path/to/chunkstream scripts/bench.sh ...   # measure another build
#   TMPDIR=/dev/shm scripts/bench.sh throughput burst        # the S3 server's
#                                    # files (and the sources) on tmpfs: the
#                                    # figures docs/benchmarks.md reports for
#                                    # these parts; ext4's inode allocation in
#                                    # s3s-fs otherwise dominates a burst
#
# Needs what scripts/test.sh installs, plus rclone, curl and valgrind
# (apt-get, installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

missing=""
for tool in rclone curl valgrind; do
  command -v "$tool" >/dev/null || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
for tool in redis-server s3s-fs rclone curl valgrind; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing; run scripts/test.sh once" >&2; exit 1; }
done

cargo build --release --locked
cargo run --release --locked --example bench -- "$@"
