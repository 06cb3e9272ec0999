#!/usr/bin/env bash
# The benchmark: chunkstream against rclone on one loopback S3 server (s3s-fs),
# plus memory, polling and Redis cost. A harness, not a test: it prints figures
# and never fails on speed.
#
#   scripts/bench.sh                 # everything, prints the table
#   scripts/bench.sh --write-doc     # ... and updates docs/benchmarks.md
#   scripts/bench.sh --quick         # small data sets, to try the harness
#   scripts/bench.sh throughput      # one part: throughput, growing, memory, polling, bandwidth
#
# Needs what scripts/test.sh installs, plus rclone (apt-get, installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v rclone >/dev/null; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends rclone >/dev/null
fi
for tool in redis-server s3s-fs rclone; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing; run scripts/test.sh once" >&2; exit 1; }
done

cargo build --release --locked
cargo run --release --locked --example bench -- "$@"
