#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs the checks.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -- NAME    # only tests whose name contains NAME
#
# Installs, when missing: redis-server, redis-sentinel, ffmpeg/ffprobe, openssl,
# promtool (Debian package prometheus), stunnel4, Ceph RGW (radosgw, ceph-mon,
# ceph-osd, ceph-common) and the network file system test bed's sshd, ssh, sshfs and
# fusermount3 (openssh-server openssh-client sshfs fuse3) and chromium with
# apt-get; the S3 test servers s3s-fs 0.14.1 (cargo install) and moto server
# (pip), and the Python package playwright (pip; never `playwright install`). The netfs
# test bed also needs /dev/fuse. With CI=true a tool that is still missing
# afterwards is a failure, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

S3S_FS_VERSION=0.14.1
MOTO_VERSION=5.2.1
PLAYWRIGHT_VERSION=1.65.2
export PATH="$HOME/.cargo/bin:$PATH"

apt_packages=()
command -v redis-server >/dev/null || apt_packages+=(redis-server)
command -v redis-sentinel >/dev/null || apt_packages+=(redis-sentinel)
{ command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null; } || apt_packages+=(ffmpeg)
command -v promtool >/dev/null || apt_packages+=(prometheus)
# A private CA for the TLS tests (tests/tls.rs), and stunnel terminating
# TLS in front of the S3 test server.
command -v openssl >/dev/null || apt_packages+=(openssl)
command -v stunnel4 >/dev/null || apt_packages+=(stunnel4)
# Ceph RGW for the compatibility suite (tests/testbeds/rgw needs bc, uuidgen, curl too).
for tool in radosgw:radosgw ceph-mon:ceph-mon ceph-osd:ceph-osd ceph:ceph-common bc:bc uuidgen:uuid-runtime curl:curl; do
  command -v "${tool%%:*}" >/dev/null || apt_packages+=("${tool#*:}")
done
# tests/netfs.rs: the loopback SFTP server (sshd by its absolute path, as
# the test bed starts it) and the sshfs mount.
[ -x /usr/sbin/sshd ] || apt_packages+=(openssh-server)
{ command -v ssh >/dev/null && command -v ssh-keygen >/dev/null; } || apt_packages+=(openssh-client)
command -v sshfs >/dev/null || apt_packages+=(sshfs)
command -v fusermount3 >/dev/null || apt_packages+=(fuse3)
# The status page's browser test: Debian's chromium (Playwright never
# downloads a browser here).
command -v chromium >/dev/null || apt_packages+=(chromium)
if ((${#apt_packages[@]})); then
  if command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    echo "==> installing ${apt_packages[*]} with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  else
    echo "warning: ${apt_packages[*]} missing and no apt-get; install them yourself" >&2
  fi
fi

if ! s3s-fs --version 2>/dev/null | grep -qx "s3s-fs $S3S_FS_VERSION"; then
  echo "==> installing s3s-fs $S3S_FS_VERSION (takes a few minutes once)"
  cargo install s3s-fs --version "$S3S_FS_VERSION" --locked --features binary
fi

if ! python3 -m pip show moto 2>/dev/null | grep -qx "Version: $MOTO_VERSION" || ! command -v moto_server >/dev/null; then
  echo "==> installing moto[server] $MOTO_VERSION"
  python3 -m pip install --quiet "moto[server]==$MOTO_VERSION"
fi

if ! python3 -c "import playwright.sync_api" 2>/dev/null; then
  echo "==> installing playwright $PLAYWRIGHT_VERSION (the Python package only; it drives /usr/bin/chromium)"
  python3 -m pip install --quiet "playwright==$PLAYWRIGHT_VERSION"
fi

missing=()
for tool in redis-server redis-sentinel ffmpeg ffprobe promtool openssl stunnel4 s3s-fs radosgw ceph-mon ceph-osd moto_server /usr/sbin/sshd ssh ssh-keygen sshfs fusermount3 chromium; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -e /dev/fuse ] || missing+=(/dev/fuse)
python3 -c "import playwright.sync_api" 2>/dev/null || missing+=(python-playwright)
if ((${#missing[@]})); then
  if [ "${CI:-}" = true ]; then
    echo "error: required test tools missing: ${missing[*]}" >&2
    exit 1
  fi
  echo "warning: ${missing[*]} missing; the tests that need them will be skipped" >&2
fi

echo "==> cargo fmt --check"
cargo fmt --check
echo "==> cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "==> cargo build --release (the container-equivalent smoke test runs it)"
cargo build --release --locked
echo "==> cargo test"
cargo test --locked "$@"
