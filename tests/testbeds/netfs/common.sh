# Sourced by start.sh, stop.sh and fault.sh. Settings (environment):
#   NETFS_ROOT           state root                       (/tmp/netfs-testbed)
#   NETFS_SERVER_DIR     the exported "server-side" dir   ($NETFS_ROOT/server)
#   NETFS_MOUNT          the sshfs mount point            ($NETFS_ROOT/mnt)
#   NETFS_PORT           loopback sshd port               (2222)
#   NETFS_USER           ssh login user                   (the current user)
#   NETFS_ATTR_TIMEOUT   FUSE kernel attr_timeout, s      (1)    [sshfs default 1]
#   NETFS_ENTRY_TIMEOUT  FUSE kernel entry_timeout, s     (1)    [sshfs default 1]
#   NETFS_DIR_CACHE      sshfs dir_cache yes|no           (yes)  [sshfs default yes]
#   NETFS_DCACHE_TIMEOUT sshfs dcache_timeout, s          (20)   [sshfs default 20]
#   NETFS_RECONNECT      1: sshfs -o reconnect            (1)
#   NETFS_NOFORGET       1: -o noforget, stable inode numbers across outages (1)
#                        (0: libfuse hands out NEW inode numbers after an outage)
#   NETFS_ALIVE          ServerAliveInterval, s           (2)
#   NETFS_ALIVE_COUNT    ServerAliveCountMax              (3)
#   NETFS_SSHFS_OPTS     extra "-o a,b" options for sshfs (empty)
NETFS_ROOT=${NETFS_ROOT:-/tmp/netfs-testbed}
NETFS_SERVER_DIR=${NETFS_SERVER_DIR:-$NETFS_ROOT/server}
NETFS_MOUNT=${NETFS_MOUNT:-$NETFS_ROOT/mnt}
NETFS_PORT=${NETFS_PORT:-2222}
NETFS_USER=${NETFS_USER:-$(id -un)}
NETFS_ATTR_TIMEOUT=${NETFS_ATTR_TIMEOUT:-1}
NETFS_ENTRY_TIMEOUT=${NETFS_ENTRY_TIMEOUT:-1}
NETFS_DIR_CACHE=${NETFS_DIR_CACHE:-yes}
NETFS_DCACHE_TIMEOUT=${NETFS_DCACHE_TIMEOUT:-20}
NETFS_RECONNECT=${NETFS_RECONNECT:-1}
NETFS_NOFORGET=${NETFS_NOFORGET:-1}
NETFS_ALIVE=${NETFS_ALIVE:-2}
NETFS_ALIVE_COUNT=${NETFS_ALIVE_COUNT:-3}
NETFS_SSHFS_OPTS=${NETFS_SSHFS_OPTS:-}
STATE=$NETFS_ROOT/state
SSHD=/usr/sbin/sshd # sshd must be started by its absolute path

APT_LINE="apt-get install -y --no-install-recommends openssh-server openssh-client sshfs fuse3"

missing_tools() {
  local t missing=()
  for t in "$SSHD" ssh ssh-keygen sshfs fusermount3 mountpoint; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  [ -e /dev/fuse ] || missing+=(/dev/fuse)
  echo "${missing[*]}"
}

# Live PID from a pid file, or nothing.
live_pid() {
  local f=$1 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || return 1
  # A zombie is not alive (here PID 1 may never reap what start.sh detached).
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  echo "$pid"
}

# All descendants of a PID (by parent PID, read from /proc), deepest last.
descendants() {
  local parent=$1 child
  for child in $(ps -o pid= --ppid "$parent" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

# sshd listener + per-connection children (sshd session, sftp) that it started.
server_pids() {
  local pid
  pid=$(live_pid "$STATE/sshd.pid") || return 0
  echo "$pid"
  descendants "$pid"
}

is_mounted() { mountpoint -q "$NETFS_MOUNT" 2>/dev/null; }
# In the mount table, alive or not (a dead FUSE daemon leaves an ENOTCONN mount).
in_mount_table() { awk -v m="$NETFS_MOUNT" '$2 == m { found = 1 } END { exit !found }' /proc/mounts; }

start_server() {
  if live_pid "$STATE/sshd.pid" >/dev/null; then
    echo "sshd already running (pid $(cat "$STATE/sshd.pid"))"
    return 0
  fi
  if [ "$(id -u)" -eq 0 ] && [ ! -d /run/sshd ]; then mkdir -p -m 0755 /run/sshd; fi
  setsid "$SSHD" -D -f "$STATE/sshd_config" -E "$STATE/sshd.log" </dev/null >>"$STATE/sshd.log" 2>&1 &
  echo $! >"$STATE/sshd.pid"
  local i
  for i in $(seq 1 50); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$NETFS_PORT") 2>/dev/null; then
      echo "sshd up on 127.0.0.1:$NETFS_PORT (pid $(cat "$STATE/sshd.pid"))"
      return 0
    fi
    live_pid "$STATE/sshd.pid" >/dev/null || break
    sleep 0.1
  done
  echo "error: sshd did not start; see $STATE/sshd.log" >&2
  tail -5 "$STATE/sshd.log" >&2
  return 1
}

# Kills the sshd listener and every session it forked: clients see the
# connection reset (a server crash or reboot).
stop_server() {
  local pids
  pids=$(server_pids)
  if [ -z "$pids" ]; then echo "sshd not running"; return 0; fi
  # shellcheck disable=SC2086
  kill -CONT $pids 2>/dev/null || true
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  rm -f "$STATE/sshd.pid"
  echo "sshd stopped (pids $(echo $pids))"
}

sshfs_options() {
  local opts="port=$NETFS_PORT,IdentityFile=$STATE/client_key,BatchMode=yes"
  opts+=",StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,LogLevel=ERROR"
  opts+=",ConnectTimeout=3,ServerAliveInterval=$NETFS_ALIVE,ServerAliveCountMax=$NETFS_ALIVE_COUNT"
  opts+=",attr_timeout=$NETFS_ATTR_TIMEOUT,entry_timeout=$NETFS_ENTRY_TIMEOUT"
  opts+=",dir_cache=$NETFS_DIR_CACHE,dcache_timeout=$NETFS_DCACHE_TIMEOUT"
  [ "$NETFS_RECONNECT" = 1 ] && opts+=",reconnect"
  [ "$NETFS_NOFORGET" = 1 ] && opts+=",noforget"
  [ "$(id -u)" -eq 0 ] && opts+=",allow_other"
  [ -n "$NETFS_SSHFS_OPTS" ] && opts+=",$NETFS_SSHFS_OPTS"
  echo "$opts"
}

mount_client() {
  if is_mounted; then echo "already mounted at $NETFS_MOUNT"; return 0; fi
  if in_mount_table; then
    echo "error: $NETFS_MOUNT is a dead mount; run fault.sh remount (or stop.sh)" >&2
    return 1
  fi
  mkdir -p "$NETFS_MOUNT"
  local opts
  opts=$(sshfs_options)
  echo "sshfs -f -o $opts $NETFS_USER@127.0.0.1:$NETFS_SERVER_DIR $NETFS_MOUNT" >"$STATE/sshfs.cmd"
  setsid sshfs -f -o "$opts" "$NETFS_USER@127.0.0.1:$NETFS_SERVER_DIR" "$NETFS_MOUNT" \
    </dev/null >>"$STATE/sshfs.log" 2>&1 &
  echo $! >"$STATE/sshfs.pid"
  local i
  for i in $(seq 1 100); do
    if is_mounted; then
      echo "mounted $NETFS_USER@127.0.0.1:$NETFS_SERVER_DIR at $NETFS_MOUNT (sshfs pid $(cat "$STATE/sshfs.pid"))"
      return 0
    fi
    live_pid "$STATE/sshfs.pid" >/dev/null || break
    sleep 0.1
  done
  echo "error: sshfs did not mount; see $STATE/sshfs.log" >&2
  tail -5 "$STATE/sshfs.log" >&2
  return 1
}

# Unmounts (lazily if busy) and ends the sshfs process this test bed started.
unmount_client() {
  if in_mount_table; then
    fusermount3 -u "$NETFS_MOUNT" 2>/dev/null || fusermount3 -u -z "$NETFS_MOUNT" 2>/dev/null || true
  fi
  local pid
  if pid=$(live_pid "$STATE/sshfs.pid"); then
    local kids
    kids=$(descendants "$pid")
    # shellcheck disable=SC2086
    kill -TERM "$pid" $kids 2>/dev/null || true
  fi
  rm -f "$STATE/sshfs.pid"
  echo "unmounted $NETFS_MOUNT"
}
