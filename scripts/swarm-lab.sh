#!/usr/bin/env bash
# A real multi-node Docker Swarm on one Linux host, for the swarm backend and its tests.
#
#   scripts/swarm-lab.sh up       # N dockerd "nodes", one swarm, the 3compute image in each
#   scripts/swarm-lab.sh status   # nodes and services, from the manager
#   scripts/swarm-lab.sh kill N   # crash node N: SIGKILL its dockerd and containerd
#   scripts/swarm-lab.sh start N  # bring node N's engine back
#   scripts/swarm-lab.sh down     # stop everything the lab started (by pid) and remove it
#
# Each node is a network namespace on a private bridge (the bridge lives in its own
# namespace, so nothing is added to the host's interfaces, routes or firewall), with its
# own UTS namespace (hostname nodeN) and a private mount namespace (the node's mounts vanish
# with it, while it still sees the host's files: workspaces under DATA_DIR are the same path
# on every node, as NFS gives in production). Each node runs its own dockerd + containerd
# with their own data-root, exec-root, socket, pidfile, cgroup parent and trust key. The
# manager (node 1) also takes tasks. Every node carries the labels `lab=nN` and
# `3compute.engine=unix://$LAB/nN/docker.sock` (where the server execs terminals).
# The host's default engine is only used for `docker save $IMAGE`.
#
# Needs root, iproute2 and util-linux (unshare, nsenter). No ingress mesh (it needs IPVS):
# the backend publishes ports in host mode and addresses nodes directly.
#
# Settings: NODES (3), LAB (/tmp/3compute-swarm), NET (192.168.78), IMAGE (3compute),
# PREFIX (3cs: names of the namespaces), HEARTBEAT (1s: the dispatcher heartbeat, which
# bounds how fast a dead node is noticed), IMAGE_CACHE (/var/tmp/3compute-swarm-images: the
# image saved once per image id, kept across runs; `down` leaves it).
set -euo pipefail

LAB=${LAB:-/tmp/3compute-swarm}
NODES=${NODES:-3}
NET=${NET:-192.168.78}
IMAGE=${IMAGE:-3compute}
PREFIX=${PREFIX:-3cs}
HEARTBEAT=${HEARTBEAT:-1s}
IMAGE_CACHE=${IMAGE_CACHE:-/var/tmp/3compute-swarm-images}
BRNS=$PREFIX-br
BR=${PREFIX}br0

addr() { echo "$NET.$((10 + $1))"; }
sock() { echo "unix://$LAB/n$1/docker.sock"; }
ns()   { echo "$PREFIX-n$1"; }
dk()   { local n=$1; shift; docker -H "$(sock "$n")" "$@"; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
node_count() { if [ -f "$LAB/nodes" ]; then cat "$LAB/nodes"; else echo "$NODES"; fi; }

wait_sock() {  # until node $1's engine answers
  for _ in $(seq 1 150); do dk "$1" version >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "node $1: dockerd did not come up; see $LAB/n$1/dockerd.log" >&2
  tail -20 "$LAB/n$1/dockerd.log" >&2; return 1
}

start_node() {
  local i=$1 d="$LAB/n$1"
  mkdir -p "$d/data" "$d/exec"
  alive "$(cat "$d/dockerd.pid" 2>/dev/null)" || rm -f "$d/dockerd.pid"  # left by a crash
  # Own config (never /etc/docker/daemon.json) and own trust key (else every engine has the
  # same ID; a daemon.json key in 20.10). no-new-privileges is engine-wide under Swarm.
  printf '{"deprecated-key-path": "%s", "no-new-privileges": true}\n' "$d/key.json" >"$d/daemon.json"
  # nsenter --net, not `ip netns exec` (that remounts /sys and hides the cgroups).
  # setsid keeps dockerd out of the caller's job; every step execs, so $! is dockerd.
  # DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1: no registry pull attempt before each task start.
  DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 setsid nsenter --net="/run/netns/$(ns "$i")" \
    unshare --mount --uts --propagation private \
    sh -c "hostname node$i; exec dockerd --config-file $d/daemon.json \
      --data-root $d/data --exec-root $d/exec --pidfile $d/dockerd.pid -H $(sock "$i") \
      --cgroup-parent /$PREFIX-n$i --label lab.node=n$i --storage-driver overlay2" \
    >>"$d/dockerd.log" 2>&1 </dev/null &
  echo $! >"$d/launcher.pid"
}

kill_node() {  # a crash: the engine and its containerd die, the containers live on as orphans
  local d="$LAB/n$1" pid
  pid=$(cat "$d/launcher.pid")
  for p in $(grep -l -a -s -- "$d/exec/containerd" /proc/[0-9]*/cmdline | cut -d/ -f3); do
    case "$(cat "/proc/$p/comm" 2>/dev/null)" in containerd) kill -KILL "$p" 2>/dev/null || true ;; esac
  done
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
}

image_tar() {  # the image as a tar, saved once per image id (the default engine may be briefly away)
  local id tar cached
  mkdir -p "$IMAGE_CACHE"
  for try in $(seq 1 24); do
    if id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null); then
      tar="$IMAGE_CACHE/${id#sha256:}.tar"
      if [ -f "$tar" ] || { docker save "$IMAGE" -o "$tar.part" && mv "$tar.part" "$tar"; }; then
        find "$IMAGE_CACHE" -name '*.tar*' ! -path "$tar" -delete  # older images
        echo "$tar"; return 0
      fi
      rm -f "$tar.part"
    fi
    cached=$(ls -t "$IMAGE_CACHE"/*.tar 2>/dev/null | head -1 || true)
    if [ -n "$cached" ] && [ "$try" -ge 3 ]; then
      echo "the default engine does not answer; using the last saved $IMAGE" >&2; echo "$cached"; return 0
    fi
    sleep 5
  done
  echo "cannot docker save $IMAGE" >&2; return 1
}

up() {
  if [ -d "$LAB" ]; then echo "$LAB exists: run '$0 down' first" >&2; return 1; fi
  mkdir -p "$LAB"; echo "$NODES" >"$LAB/nodes"
  ip netns add "$BRNS"
  ip -n "$BRNS" link set lo up
  ip -n "$BRNS" link add "$BR" type bridge
  ip -n "$BRNS" link set "$BR" up
  for i in $(seq 1 "$NODES"); do
    ip netns add "$(ns "$i")"
    ip -n "$(ns "$i")" link set lo up
    # the veth is made inside the bridge's namespace, its peer moved straight into the node
    ip -n "$BRNS" link add "vn$i" type veth peer name eth0 netns "$(ns "$i")"
    ip -n "$BRNS" link set "vn$i" master "$BR" up
    ip -n "$(ns "$i")" addr add "$(addr "$i")/24" dev eth0
    ip -n "$(ns "$i")" link set eth0 up
  done
  for i in $(seq 1 "$NODES"); do start_node "$i"; done
  local tar; tar=$(image_tar)  # while the engines start
  for i in $(seq 1 "$NODES"); do wait_sock "$i"; done
  local pids=()  # explicit pids: a bare `wait` would wait for the dockerds too
  for i in $(seq 1 "$NODES"); do dk "$i" load -q -i "$tar" >/dev/null & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
  dk 1 swarm init --advertise-addr "$(addr 1)" --listen-addr "$(addr 1):2377" \
    --dispatcher-heartbeat "$HEARTBEAT" >/dev/null
  local tok id
  tok=$(dk 1 swarm join-token -q worker)
  for i in $(seq 2 "$NODES"); do
    dk "$i" swarm join --token "$tok" --advertise-addr "$(addr "$i")" --listen-addr "$(addr "$i"):2377" \
      "$(addr 1):2377" >/dev/null
  done
  for i in $(seq 1 "$NODES"); do
    id=$(dk "$i" info -f '{{.Swarm.NodeID}}')
    dk 1 node update --label-add "lab=n$i" --label-add "3compute.engine=$(sock "$i")" "$id" >/dev/null
  done
  echo "swarm of $NODES nodes up; manager: DOCKER_HOST=$(sock 1)"
}

status() {
  local n; n=$(node_count)
  for i in $(seq 1 "$n"); do
    printf 'n%s engine pid=%s ' "$i" "$(cat "$LAB/n$i/dockerd.pid" 2>/dev/null || echo -)"
    dk "$i" info -f '{{.Name}} {{.Swarm.LocalNodeState}} containers={{.ContainersRunning}}' 2>&1 | head -1
  done
  dk 1 node ls 2>/dev/null || true
  dk 1 service ls 2>/dev/null || true
}

down() {
  local n d pid; n=$(node_count)
  for i in $(seq 1 "$n"); do
    d="$LAB/n$i"; [ -d "$d" ] || continue
    pid=$(cat "$d/launcher.pid" 2>/dev/null || true)
    if alive "$pid"; then
      kill -TERM "$pid"  # dockerd stops its containers and its containerd
      for _ in $(seq 1 75); do alive "$pid" || break; sleep 0.2; done
      alive "$pid" && kill -KILL "$pid"
    fi
    # Leftovers of a crashed node: container processes (by the node's cgroup), then
    # containerd and shims (by the node's exec-root in their command line), all by pid.
    for procs in /sys/fs/cgroup/pids/$PREFIX-n$i/*/cgroup.procs /sys/fs/cgroup/$PREFIX-n$i/*/cgroup.procs; do
      [ -f "$procs" ] || continue
      for p in $(cat "$procs"); do kill -KILL "$p" 2>/dev/null || true; done
    done
    for p in $(grep -l -a -s -- "$d/exec" /proc/[0-9]*/cmdline | cut -d/ -f3); do
      [ "$p" = "$$" ] || kill -KILL "$p" 2>/dev/null || true
    done
  done
  sleep 0.5
  for i in $(seq 1 "$n"); do
    for ctl in /sys/fs/cgroup/*/$PREFIX-n$i /sys/fs/cgroup/$PREFIX-n$i; do
      [ -d "$ctl" ] && find "$ctl" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    ip netns del "$(ns "$i")" 2>/dev/null || true  # its veth goes with it
  done
  ip netns del "$BRNS" 2>/dev/null || true
  if grep -q " $LAB" /proc/self/mountinfo; then
    echo "mounts still present under $LAB, not deleting it" >&2; return 1
  fi
  rm -rf "$LAB"
  echo "lab down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  kill) kill_node "$2" ;;
  start) start_node "$2"; wait_sock "$2" ;;
  *) echo "usage: $0 up|status|kill N|start N|down" >&2; exit 2 ;;
esac
