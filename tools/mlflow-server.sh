#!/usr/bin/env bash
# A private MLflow tracking server: PostgreSQL backend store, artifacts proxied by the server.
#
#   tools/mlflow-server.sh start DIR [PORT] [PG_PORT]   # defaults: 5000 and 5433
#   tools/mlflow-server.sh stop DIR
#
# `start` creates, on first use, a PostgreSQL cluster in DIR/pgdata (initdb, password auth with a
# random password kept in DIR/pg.password, TCP on 127.0.0.1 only, no unix socket), starts it on
# PG_PORT, creates the database `mlflow`, then starts in the background
#   mlflow server --backend-store-uri postgresql://mlflow:***@127.0.0.1:PG_PORT/mlflow
#                 --serve-artifacts --artifacts-destination DIR/artifacts --host $HOST --port PORT
# and waits until it answers. Runs are recorded in PostgreSQL; artifacts (run records, configs, and
# the checkpoints jobs hand each other when execution.shared_fs is false) are uploaded to and
# downloaded from the server, so its clients need no shared filesystem. Logs: DIR/logs/.
# Point the workflow at it:  export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT
# For other nodes, HOST=0.0.0.0 (the server has no authentication: trusted networks only; MLflow
# accepts Host headers of localhost and private IPs unless told otherwise with --allowed-hosts).
# `stop` stops the server, then PostgreSQL; a later `start DIR` resumes with the same runs.
#
# Needs PostgreSQL's server binaries (Debian: apt-get install postgresql; found on PATH, in $PG_BIN
# or in /usr/lib/postgresql/<newest>/bin) and psycopg2 (pip install -e ".[server]").
# PostgreSQL refuses to run as root: as root, the cluster belongs to $PG_USER (default postgres),
# which must be able to traverse DIR's parents. Env: PYTHON (default python3: the interpreter with
# mlflow), WORKERS (server worker processes, default 2), HOST (default 127.0.0.1),
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION (MLflow's GenAI job runner, default false here).
set -euo pipefail

usage() { sed -n '2,5p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
port=${3:-5000}
pg_port=${4:-5433}
PYTHON=${PYTHON:-python3}
WORKERS=${WORKERS:-2}
HOST=${HOST:-127.0.0.1}
PG_USER=${PG_USER:-postgres}

pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return; fi
  # the directory of the real initdb (Debian links a few binaries onto PATH, not psql/createdb)
  if command -v initdb >/dev/null 2>&1; then dirname "$(realpath "$(command -v initdb)")"; return; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$d" ] && [ -x "$d/initdb" ] || {
    echo "mlflow-server.sh: PostgreSQL's initdb not found; install it (Debian: apt-get install postgresql) or set PG_BIN" >&2
    exit 1
  }
  echo "$d"
}

as_pg() {  # run a PostgreSQL server command unprivileged
  if [ "$(id -u)" = 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

start() {
  local bin; bin=$(pg_bin)
  mkdir -p "$dir/logs" "$dir/artifacts" "$dir/pgdata"
  if [ "$(id -u)" = 0 ]; then
    id "$PG_USER" >/dev/null 2>&1 || { echo "mlflow-server.sh: running as root needs an unprivileged user $PG_USER (set PG_USER)" >&2; exit 1; }
    chown "$PG_USER" "$dir/logs" "$dir/pgdata"
    runuser -u "$PG_USER" -- test -w "$dir/logs" || {
      echo "mlflow-server.sh: user $PG_USER cannot reach $dir (a parent directory is private); use a directory it can traverse" >&2
      exit 1
    }
  fi
  if [ ! -f "$dir/pgdata/PG_VERSION" ]; then
    # a random password: the database listens on TCP, where any local user could otherwise connect
    local pw; pw=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
    (umask 077; printf '%s\n' "$pw" > "$dir/pg.password")
    [ "$(id -u)" = 0 ] && chown "$PG_USER" "$dir/pg.password"
    as_pg "$bin/initdb" -D "$dir/pgdata" -U mlflow --pwfile="$dir/pg.password" --auth=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 >"$dir/logs/initdb.log"
    printf "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n" >> "$dir/pgdata/postgresql.conf"
  fi
  local pw; pw=$(cat "$dir/pg.password")
  as_pg "$bin/pg_ctl" -D "$dir/pgdata" -l "$dir/logs/postgres.log" -o "-p $pg_port" -w -t 60 start >/dev/null
  PGPASSWORD=$pw "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U mlflow -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 \
    || PGPASSWORD=$pw "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U mlflow mlflow
  # setsid: the server and its workers form one process group, which `stop` ends. MLflow 3's GenAI job runner
  # (huey consumers that run scorers and evaluations; each costs seconds of CPU to start, then polls) has no part in
  # vitablate's runs: off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
  setsid "$PYTHON" -m mlflow server \
    --backend-store-uri "postgresql://mlflow:$pw@127.0.0.1:$pg_port/mlflow" \
    --serve-artifacts --artifacts-destination "$dir/artifacts" \
    --host "$HOST" --port "$port" --workers "$WORKERS" >"$dir/logs/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$dir/mlflow.pid"
  # a fresh database migrates its schema first (tens of seconds on a busy CPU): one poller asks every half second
  # for 2 minutes, and gives up as soon as the server has exited (a Python start per try cost more than the wait)
  if "$PYTHON" - "http://$HOST:$port/health" "$(cat "$dir/mlflow.pid")" <<'EOF'
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
for _ in range(240):
    try:
        urllib.request.urlopen(url, timeout=2)
        sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    time.sleep(0.5)
sys.exit(1)
EOF
  then
    echo "MLflow server at http://$HOST:$port (PostgreSQL on 127.0.0.1:$pg_port, artifacts in $dir/artifacts)"
    echo "export MLFLOW_TRACKING_URI=http://$HOST:$port"
    return 0
  fi
  echo "mlflow-server.sh: the MLflow server did not come up; last lines of $dir/logs/mlflow.log:" >&2
  tail -n 30 "$dir/logs/mlflow.log" >&2
  stop
  exit 1
}

stop() {
  if [ -f "$dir/mlflow.pid" ]; then
    local pid; pid=$(cat "$dir/mlflow.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$dir/mlflow.pid"
  fi
  if [ -f "$dir/pgdata/postmaster.pid" ]; then
    as_pg "$(pg_bin)/pg_ctl" -D "$dir/pgdata" -m fast -w stop >/dev/null
  fi
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
