#!/usr/bin/env bash
# Records a real MP4 in real time into input-videos/, like a camera would, so
# you can watch chunkstream upload a growing file.
#
#   scripts/simulate-recording.sh [--fragmented | --faststart] [NAME] [SECONDS]
#
#   NAME      file name without extension (default: camera-<time>)
#   SECONDS   length of the recording (default: 60)
#   --fragmented  fragmented MP4 (append-only, like many IP cameras)
#   --faststart   moov moved to the front at the end (rewrites the whole file)
#
# Uses ffmpeg's test pattern and a sine tone, encoded with libx264 + AAC at
# about 4 Mbit/s. Set INPUT_DIR to record somewhere else.
set -euo pipefail
cd "$(dirname "$0")/.."

movflags=()
case "${1:-}" in
  --fragmented) movflags=(-movflags frag_keyframe+empty_moov+default_base_moof); shift ;;
  --faststart) movflags=(-movflags +faststart); shift ;;
  -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
esac
name=${1:-camera-$(date +%H%M%S)}
seconds=${2:-60}
dir=${INPUT_DIR:-input-videos}

command -v ffmpeg >/dev/null || { echo "ffmpeg is required (apt-get install ffmpeg)" >&2; exit 1; }
[[ $seconds =~ ^[0-9]+$ ]] || { echo "SECONDS must be a whole number, got '$seconds'" >&2; exit 2; }
mkdir -p "$dir"
out="$dir/$name.mp4"
echo "recording $seconds s into $out (Ctrl-C stops early; the file is then truncated)"
ffmpeg -hide_banner -loglevel warning -y -re \
  -f lavfi -i "testsrc=size=1280x720:rate=25" \
  -f lavfi -i "sine=frequency=440:sample_rate=48000" \
  -t "$seconds" \
  -c:v libx264 -preset veryfast -g 50 -b:v 4M -maxrate 4M -bufsize 8M -pix_fmt yuv420p \
  -c:a aac -b:a 128k \
  "${movflags[@]}" \
  "$out"
echo "done: $out ($(stat -c %s "$out") bytes); chunkstream completes it after STREAM_TIMEOUT"
