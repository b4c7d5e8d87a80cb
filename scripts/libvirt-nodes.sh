#!/bin/bash
# Two private libvirtd "nodes" (A and B) on one machine for virtkube's real-libvirt tests:
# QEMU under TCG (no KVM needed), no systemd. Each daemon runs in its own network namespace
# (A = 10.99.0.1, B = 10.99.0.2 on a veth pair) and mount namespace (its own /etc/libvirt,
# /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt), with its own socket
# and host_uuid, so the two can live-migrate guests to each other. A third daemon, C (own
# network namespace, no link to the others), runs with libvirt's cgroup v1 `cpu` and
# `cpuacct` controllers enabled, for the tests of CPU scheduling (shares, quota, period);
# A and B keep `cgroup_controllers = [ ]` so their guests never collide on cgroup names
# while migrating.
#
# Usage (as root):
#   scripts/libvirt-nodes.sh up   [DIR]   # installs packages if missing, starts A and B,
#                                         # writes DIR/env (source it before the tests)
#   scripts/libvirt-nodes.sh down [DIR]   # destroys guests and networks, stops the daemons,
#                                         # deletes the namespaces; safe to repeat
#   scripts/libvirt-nodes.sh status [DIR]
#   scripts/libvirt-nodes.sh restart-daemon A|B [DIR]   # restarts one libvirtd, guests keep
#                                                        # running (tests reconnects)
# DIR defaults to ${VIRTKUBE_NODES_DIR:-/tmp/virtkube-libvirt-nodes}.
# VIRTKUBE_NODES_PRIVATE_DATA=1 (read by `up`) gives each daemon its own /var/lib/virtkube
# (DIR/NODE/virtkube, empty at every `up`), as two machines have: images in pools under
# /var/lib/virtkube (the examples' `images` pool) are then neither shared between A and B nor
# with other runs on this host. Off by default: tests that read pool files from the host rely
# on the shared path.
set -euo pipefail

CMD=${1:-}
if [ "$CMD" = restart-daemon ]; then
  NODE=${2:?usage: $0 restart-daemon A|B [DIR]}
  shift
fi
W=${2:-${VIRTKUBE_NODES_DIR:-/tmp/virtkube-libvirt-nodes}}
# Two sets of nodes can run side by side (a developer's and a test run's) with their own
# namespace prefix and /24: VIRTKUBE_NODES_NETNS=vkci VIRTKUBE_NODES_SUBNET=10.98.0.
PREFIX=${VIRTKUBE_NODES_NETNS:-vk}
SUBNET=${VIRTKUBE_NODES_SUBNET:-10.99.0}
NS_A=${PREFIX}A NS_B=${PREFIX}B NS_C=${PREFIX}C VETH_A=${PREFIX}vethA VETH_B=${PREFIX}vethB
ADDR_A=$SUBNET.1 ADDR_B=$SUBNET.2
UUID_A=5a5a5a5a-0000-4000-8000-0000000000a1
UUID_B=5a5a5a5a-0000-4000-8000-0000000000b1
UUID_C=5a5a5a5a-0000-4000-8000-0000000000c1

ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
log() { echo "libvirt-nodes: $*" >&2; }
uri_of() { echo "qemu:///system?socket=$W/$1/sock/libvirt-sock"; }

install_packages() {
  # lvm2 and e2fsprogs: the logical and fs pool tests (libvirtd runs vgcreate, mkfs).
  local need="libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev qemu-system-x86 iptables dnsmasq-base iproute2 util-linux lvm2 e2fsprogs"
  local missing=""
  for p in $need; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  log "installing:$missing"
  apt-get update -qq
  # qemu-utils pinned to bookworm's 7.2: a preinstalled bookworm-backports qemu-utils 10.x
  # Breaks qemu-system-common < 8.0 and would be removed. libvirt-daemon-system is avoided
  # on purpose (it pulls in systemd).
  local qu
  qu=$(apt-cache madison qemu-utils | awk '/bookworm\/main/{print $3; exit}')
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
    $missing ${qu:+"qemu-utils=$qu"}
}

host_prereqs() {
  [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
  install_packages
  # libvirtd's QEMU driver resolves its compiled-in default user before reading qemu.conf.
  getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
  getent passwd libvirt-qemu >/dev/null || useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
}

netns_up() {
  grep -qw "$NS_A" <<<"$(ip netns list)" || ip netns add "$NS_A"
  grep -qw "$NS_B" <<<"$(ip netns list)" || ip netns add "$NS_B"
  if ! ip -n "$NS_A" link show "$VETH_A" >/dev/null 2>&1; then
    ip link add "$VETH_A" type veth peer name "$VETH_B"
    ip link set "$VETH_A" netns "$NS_A"
    ip link set "$VETH_B" netns "$NS_B"
    ip -n "$NS_A" addr add "$ADDR_A/24" dev "$VETH_A"
    ip -n "$NS_B" addr add "$ADDR_B/24" dev "$VETH_B"
  fi
  grep -qw "$NS_C" <<<"$(ip netns list)" || ip netns add "$NS_C"
  for n in "$NS_A" "$NS_B" "$NS_C"; do ip -n "$n" link set lo up; done
  ip -n "$NS_A" link set "$VETH_A" up
  ip -n "$NS_B" link set "$VETH_B" up
}

# x509 certificates for TLS migrations (VIR_MIGRATE_TLS) between A and B: one test CA, a
# server certificate for both nodes' addresses and a client certificate, in the file names
# QEMU expects (qemu.conf migrate_tls_x509_cert_dir). Made once per DIR; only migrations asking
# for TLS use them.
make_tls() {
  local T=$W/tls
  [ -s "$T/client-cert.pem" ] && return 0
  command -v openssl >/dev/null || apt-get install -y -q openssl >/dev/null
  mkdir -p "$T"
  (
    cd "$T"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=virtkube test CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
    for role in server client; do
      local usage=serverAuth
      [ "$role" = client ] && usage=clientAuth
      openssl req -newkey rsa:2048 -nodes -subj "/CN=virtkube test $role" \
        -keyout "$role-key.pem" -out "$role.csr" 2>/dev/null
      openssl x509 -req -in "$role.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
        -days 3650 -out "$role-cert.pem" -extfile <(printf '%s\n' \
          "subjectAltName=IP:$ADDR_A,IP:$ADDR_B" "extendedKeyUsage=$usage" \
          "keyUsage=critical,digitalSignature,keyEncipherment") 2>/dev/null
      rm -f "$role.csr"
    done
  )
  log "TLS: test CA and migration certificates in $T"
}

start_node() {  # NAME HOST_UUID NETNS ADDR [CGROUP_CONTROLLERS]
  local N=$1 UUID=$2 NS=$3 ADDR=$4 CGROUPS=${5:-} D=$W/$1
  if [ -s "$D/libvirtd.pid" ] && kill -0 "$(cat "$D/libvirtd.pid")" 2>/dev/null; then
    log "node $N already running (pid $(cat "$D/libvirtd.pid"))"
    return 0
  fi
  rm -rf "$D"
  mkdir -p "$D"/{etc,run,lib,log,cache,sock}
  cat > "$D/etc/libvirtd.conf" <<EOC
unix_sock_dir = "$D/sock"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
listen_tls = 0
listen_tcp = 0
host_uuid = "$UUID"
log_outputs = "3:file:$D/libvirtd.log"
EOC
  cat > "$D/etc/qemu.conf" <<EOC
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
namespaces = [ ]
cgroup_controllers = [ $CGROUPS ]
stdio_handler = "file"
EOC
  # libvirt refuses a loopback migration_host: node C (no migration) has none.
  if [ -n "$ADDR" ]; then
    printf 'migration_address = "%s"\nmigration_host = "%s"\n' "$ADDR" "$ADDR" >> "$D/etc/qemu.conf"
    printf 'migrate_tls_x509_cert_dir = "%s"\nmigrate_tls_x509_verify = 1\n' "$W/tls" >> "$D/etc/qemu.conf"
  fi
  # The cgroup v1 hierarchies libvirt may use (read again by launch_daemon on restarts).
  echo "$CGROUPS" | tr -d '",' > "$D/cgroups"
  # A private /var/lib/virtkube (read again by launch_daemon on restarts).
  if [ "${VIRTKUBE_NODES_PRIVATE_DATA:-0}" = 1 ]; then mkdir -p "$D/virtkube"; fi
  # A pre-seeded QEMU capabilities cache saves the 7-8 s probe on first connect.
  [ -d "$W/capscache" ] && cp -a "$W/capscache" "$D/cache/qemu"
  launch_daemon "$N" "$NS"
  local t1; t1=$(date +%s%N)
  virsh -c "$(uri_of "$N")" version >/dev/null
  log "node $N: first connect (QEMU capabilities) $(ms "$t1") ms"
  [ -d "$W/capscache" ] || cp -a "$D/cache/qemu" "$W/capscache"
}

launch_daemon() {  # NAME NETNS
  local N=$1 NS=$2 D=$W/$1
  rm -f "$D/libvirtd.pid" "$D/sock/libvirt-sock"
  local t0; t0=$(date +%s%N)
  # `ip netns exec` mounts a fresh /sys for the namespace, without the host's cgroup
  # hierarchies: a node with cgroup controllers gets them mounted again (v1 hierarchies are
  # shared, so this is the host's own `cpu` hierarchy, not a copy).
  local cg="" c
  for c in $(cat "$D/cgroups" 2>/dev/null); do
    cg="$cg mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c &&"
  done
  [ -n "$cg" ] && cg="mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup && $cg true"
  local data=""
  [ -d "$D/virtkube" ] && data="mkdir -p /var/lib/virtkube && mount --bind $D/virtkube /var/lib/virtkube || exit 1"
  setsid ip netns exec "$NS" unshare -m --propagation private bash -c "
    $cg
    mount --bind $D/etc   /etc/libvirt
    mount --bind $D/run   /run/libvirt
    mount --bind $D/lib   /var/lib/libvirt
    mount --bind $D/log   /var/log/libvirt
    mount --bind $D/cache /var/cache/libvirt
    $data
    exec libvirtd -f $D/etc/libvirtd.conf -p $D/libvirtd.pid" > "$D/stdout.log" 2>&1 < /dev/null &
  disown || true
  for _ in $(seq 400); do
    [ -S "$D/sock/libvirt-sock" ] && [ -s "$D/libvirtd.pid" ] && break
    sleep 0.05
  done
  [ -S "$D/sock/libvirt-sock" ] || { log "node $N: libvirtd did not start; see $D/stdout.log $D/libvirtd.log"; cat "$D/stdout.log" >&2; exit 1; }
  log "node $N: libvirtd pid $(cat "$D/libvirtd.pid") socket ready after $(ms "$t0") ms"
}

stop_node() {
  local N=$1 D=$W/$1 U P
  U=$(uri_of "$N")
  if [ -S "$D/sock/libvirt-sock" ] && [ -s "$D/libvirtd.pid" ] && kill -0 "$(cat "$D/libvirtd.pid")" 2>/dev/null; then
    for d in $(virsh -c "$U" list --name 2>/dev/null); do virsh -c "$U" destroy "$d" >/dev/null 2>&1 || true; done
    # dnsmasq outlives libvirtd otherwise.
    for n in $(virsh -c "$U" net-list --name 2>/dev/null); do virsh -c "$U" net-destroy "$n" >/dev/null 2>&1 || true; done
    for p in $(virsh -c "$U" pool-list --name 2>/dev/null); do virsh -c "$U" pool-destroy "$p" >/dev/null 2>&1 || true; done
  fi
  # Guests whose daemon is already gone: their QEMU pid files live in this node's run dir.
  for pf in "$D"/run/qemu/*.pid; do
    [ -s "$pf" ] || continue
    kill -KILL "$(cat "$pf")" 2>/dev/null || true
  done
  if [ -s "$D/libvirtd.pid" ]; then
    P=$(cat "$D/libvirtd.pid")
    if kill -TERM "$P" 2>/dev/null; then
      for _ in $(seq 100); do kill -0 "$P" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$P" 2>/dev/null || true
      log "node $N: libvirtd $P stopped"
    fi
    rm -f "$D/libvirtd.pid"
  fi
}

write_env() {
  cat > "$W/env" <<EOE
# Written by scripts/libvirt-nodes.sh up; source with: set -a; . $W/env; set +a
VIRTKUBE_TEST_NODES_DIR=$W
VIRTKUBE_TEST_NODE_A_URI=$(uri_of A)
VIRTKUBE_TEST_NODE_B_URI=$(uri_of B)
VIRTKUBE_TEST_NODE_C_URI=$(uri_of C)
VIRTKUBE_TEST_NODE_A_P2P_URI=qemu+unix:///system?socket=$W/A/sock/libvirt-sock
VIRTKUBE_TEST_NODE_B_P2P_URI=qemu+unix:///system?socket=$W/B/sock/libvirt-sock
VIRTKUBE_TEST_NODE_A_MIGRATION_URI=tcp://$ADDR_A
VIRTKUBE_TEST_NODE_B_MIGRATION_URI=tcp://$ADDR_B
# QEMU's x509 certificates for TLS migrations between A and B.
VIRTKUBE_TEST_TLS_DIR=$W/tls
# So that a test restarting a daemon (restart-daemon) finds the same namespaces.
VIRTKUBE_NODES_NETNS=$PREFIX
VIRTKUBE_NODES_SUBNET=$SUBNET
EOE
}

case "$CMD" in
  up)
    host_prereqs
    mkdir -p "$W"
    netns_up
    make_tls
    start_node A "$UUID_A" "$NS_A" "$ADDR_A"
    start_node B "$UUID_B" "$NS_B" "$ADDR_B"
    start_node C "$UUID_C" "$NS_C" "" '"cpu", "cpuacct"'
    write_env
    log "ready; env in $W/env"
    cat "$W/env"
    ;;
  down)
    [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
    set +e
    stop_node A
    stop_node B
    stop_node C
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
    ip netns del "$NS_C" 2>/dev/null
    rm -f "$W/env"
    log "down"
    ;;
  restart-daemon)
    [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
    case "$NODE" in A) NS=$NS_A ;; B) NS=$NS_B ;; C) NS=$NS_C ;; *) log "node must be A, B or C"; exit 2 ;; esac
    D=$W/$NODE
    if [ -s "$D/libvirtd.pid" ]; then
      P=$(cat "$D/libvirtd.pid")
      kill -TERM "$P" 2>/dev/null || true
      # libvirtd 9.0 can take a long time over SIGTERM with clients connected; guests
      # survive a SIGKILL of the daemon just as well (it reconnects to them on start).
      for _ in $(seq 50); do kill -0 "$P" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$P" 2>/dev/null || true
      while kill -0 "$P" 2>/dev/null; do sleep 0.05; done
    fi
    launch_daemon "$NODE" "$NS"
    virsh -c "$(uri_of "$NODE")" version >/dev/null
    log "node $NODE: libvirtd restarted"
    ;;
  status)
    for N in A B C; do
      if [ -s "$W/$N/libvirtd.pid" ] && kill -0 "$(cat "$W/$N/libvirtd.pid")" 2>/dev/null; then
        echo "node $N: running, pid $(cat "$W/$N/libvirtd.pid"), $(uri_of $N)"
        virsh -c "$(uri_of $N)" list --all 2>/dev/null | sed 's/^/  /'
      else
        echo "node $N: stopped"
      fi
    done
    ;;
  *)
    echo "usage: $0 up|down|status [DIR]" >&2
    exit 2
    ;;
esac
