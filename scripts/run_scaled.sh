#!/usr/bin/env bash
# The scaled topology of docker-compose.yml as local processes: one `lungnode scp`,
# one `lungnode api`, two `lungnode worker`s and `lungnode beat`, on the PostgreSQL
# and Redis of this machine, sharing one storage folder.
#
#   scripts/run_scaled.sh [up]     start everything, stay in the foreground; Ctrl-C stops all
#   scripts/run_scaled.sh start    start everything and return
#   scripts/run_scaled.sh stop     stop what `up` or `start` started (from any terminal)
#   scripts/run_scaled.sh status   which roles run, where they listen, their logs
#
# `start` keeps the ports, AE title, broker and database it used in RUN_DIR/ports.env,
# so `status` from another terminal reports where the roles really listen.
#
# Environment (defaults in brackets):
#   RUN_DIR           storage, logs and pid files [storage/scaled under the repository]
#   LUNGNODE_BIN      the lungnode command [.venv/bin/lungnode under the repository]
#   PG_ADMIN_URL      where to create the database [postgresql://postgres@127.0.0.1:5432/postgres]
#   DB_NAME           the database [lungnode_scaled]
#   LUNGNODE_BROKER_URL, LUNGNODE_PEERS, LUNGNODE_DICOM_PORT, LUNGNODE_HTTP_PORT and any
#   other LUNGNODE_* setting are passed on to every role (docs/configuration.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${RUN_DIR:-$ROOT/storage/scaled}"
LUNGNODE_BIN="${LUNGNODE_BIN:-$ROOT/.venv/bin/lungnode}"
PYTHON="${PYTHON:-$(dirname "$LUNGNODE_BIN")/python}"
PG_ADMIN_URL="${PG_ADMIN_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
DB_NAME="${DB_NAME:-lungnode_scaled}"
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"

# Role name -> lungnode command. Started in this order, and stopped in it too: intake
# first (nothing new arrives), then the API, the workers (acks are late: a job cut
# short is delivered again), beat last.
ROLES=(scp api worker-1 worker-2 beat)
declare -A COMMANDS=(
    [scp]="scp"
    [api]="api"
    [worker-1]="worker"
    [worker-2]="worker"
    [beat]="beat"
)

PID_DIR="$RUN_DIR/pids"
LOG_DIR="$RUN_DIR/logs"
RUN_CONFIG="$RUN_DIR/ports.env"
# What `start` was given and `status` reports: kept in RUN_CONFIG.
RUN_SETTINGS=(LUNGNODE_DICOM_PORT LUNGNODE_HTTP_PORT LUNGNODE_AE_TITLE LUNGNODE_BROKER_URL LUNGNODE_HTTP_TLS_CERT DB_NAME)

# The settings every role shares: what docker-compose.yml sets, for localhost.
configure() {
    local pg_base="${PG_ADMIN_URL%/*}"
    mkdir -p "$RUN_DIR"
    export LUNGNODE_QUEUE=celery
    export LUNGNODE_STORAGE_DIR="$RUN_DIR/storage"
    export LUNGNODE_DATABASE_URL="${pg_base/postgresql:/postgresql+psycopg:}/$DB_NAME"
    export LUNGNODE_BROKER_URL="${LUNGNODE_BROKER_URL:-redis://127.0.0.1:6379/0}"
    # Without a peer every association is refused; Orthanc's default AE on its port.
    export LUNGNODE_PEERS="${LUNGNODE_PEERS:-pacs=ORTHANC@127.0.0.1:4242}"
    export LUNGNODE_DICOM_PORT="${LUNGNODE_DICOM_PORT:-11112}"
    export LUNGNODE_HTTP_PORT="${LUNGNODE_HTTP_PORT:-5000}"
    # One secret for all roles (tokens issued by one API process are checked by all),
    # kept in the run folder so that a restart keeps the sessions valid.
    if [[ -z "${LUNGNODE_SECRET_KEY:-}" ]]; then
        if [[ ! -s "$RUN_DIR/secret_key" ]]; then
            (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RUN_DIR/secret_key")
        fi
        LUNGNODE_SECRET_KEY="$(cat "$RUN_DIR/secret_key")"
        export LUNGNODE_SECRET_KEY
    fi
}

# Keep the settings the roles were started with (values quoted for the shell).
save_run_config() {
    local name
    mkdir -p "$RUN_DIR"
    for name in "${RUN_SETTINGS[@]}"; do
        if [[ -n "${!name:-}" ]]; then
            printf '%s=%q\n' "$name" "${!name}"
        fi
    done >"$RUN_CONFIG.tmp"
    mv "$RUN_CONFIG.tmp" "$RUN_CONFIG"
}

# The settings of the roles that run: what `start` kept, over this shell's own.
load_run_config() {
    if [[ -s "$RUN_CONFIG" ]]; then
        # shellcheck disable=SC1090  # written by save_run_config
        source "$RUN_CONFIG"
        export "${RUN_SETTINGS[@]}" 2>/dev/null || true
    fi
}

pid_of() {
    local file="$PID_DIR/$1.pid" pid
    [[ -s "$file" ]] || return 1
    pid="$(cat "$file")"
    # Only a process this script started: alive, and running lungnode.
    if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q lungnode; then
        echo "$pid"
        return 0
    fi
    return 1
}

check_services() {
    command -v psql >/dev/null || { echo "psql is needed to create the database" >&2; exit 1; }
    psql "$PG_ADMIN_URL" -qtAc "SELECT 1" >/dev/null \
        || { echo "PostgreSQL does not answer at $PG_ADMIN_URL" >&2; exit 1; }
    "$PYTHON" -c 'import os, redis; redis.Redis.from_url(os.environ["LUNGNODE_BROKER_URL"]).ping()' \
        || { echo "Redis does not answer at $LUNGNODE_BROKER_URL" >&2; exit 1; }
}

create_database() {
    if [[ "$(psql "$PG_ADMIN_URL" -qtAc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]]; then
        psql "$PG_ADMIN_URL" -qc "CREATE DATABASE \"$DB_NAME\"" >/dev/null
        echo "created database $DB_NAME"
    fi
}

start_role() {
    local role="$1" pid
    if pid="$(pid_of "$role")"; then
        echo "$role already runs (pid $pid)"
        return
    fi
    # Its own session: Ctrl-C in this terminal reaches the script only, which then
    # stops the roles in order; the role's own children follow their parent.
    # shellcheck disable=SC2086  # the command may be two words ("db upgrade")
    (cd "$ROOT" && exec setsid "$LUNGNODE_BIN" ${COMMANDS[$role]}) \
        >>"$LOG_DIR/$role.log" 2>&1 </dev/null &
    echo $! >"$PID_DIR/$role.pid"
}

wait_for() {
    local role="$1" what="$2" seconds="$3"
    shift 3
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ! pid_of "$role" >/dev/null; then
            echo "$role exited; see $LOG_DIR/$role.log" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "$what did not come up in ${seconds}s; see $LOG_DIR/$role.log" >&2
            return 1
        fi
        sleep 1
    done
}

tcp_open() {
    "$PYTHON" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()' "$1"
}

http_ok() {
    # The API's own certificate may be self-signed: this only asks whether it answers.
    "$PYTHON" -c 'import ssl, sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5, context=ssl._create_unverified_context())' "$1"
}

api_url() {
    local scheme=http
    if [[ -n "${LUNGNODE_HTTP_TLS_CERT:-}" ]]; then
        scheme=https
    fi
    echo "$scheme://127.0.0.1:$LUNGNODE_HTTP_PORT/api/v1"
}

print_status() {
    local role pid
    for role in "${ROLES[@]}"; do
        if pid="$(pid_of "$role")"; then
            case "$role" in
                scp) echo "scp       pid $pid  DICOM ${LUNGNODE_AE_TITLE:-LUNGNODE}@127.0.0.1:$LUNGNODE_DICOM_PORT  log $LOG_DIR/$role.log" ;;
                api) echo "api       pid $pid  $(api_url)  log $LOG_DIR/$role.log" ;;
                *) printf '%-9s pid %s  (no port)  log %s\n' "$role" "$pid" "$LOG_DIR/$role.log" ;;
            esac
        else
            printf '%-9s not running\n' "$role"
        fi
    done
    echo "storage   $LUNGNODE_STORAGE_DIR"
    echo "database  ${LUNGNODE_DATABASE_URL}"
    echo "broker    $LUNGNODE_BROKER_URL"
}

start_all() {
    mkdir -p "$PID_DIR" "$LOG_DIR"
    configure
    save_run_config
    check_services
    create_database
    (cd "$ROOT" && "$LUNGNODE_BIN" db upgrade) >>"$LOG_DIR/migrate.log" 2>&1 \
        || { echo "lungnode db upgrade failed; see $LOG_DIR/migrate.log" >&2; exit 1; }
    local role
    for role in "${ROLES[@]}"; do
        start_role "$role"
    done
    wait_for scp "the DICOM port $LUNGNODE_DICOM_PORT" 120 tcp_open "$LUNGNODE_DICOM_PORT" \
        || { stop_all; exit 1; }
    wait_for api "the API's health" 120 http_ok "$(api_url)/health" \
        || { stop_all; exit 1; }
    for role in "${ROLES[@]}"; do
        pid_of "$role" >/dev/null || { echo "$role exited; see $LOG_DIR/$role.log" >&2; stop_all; exit 1; }
    done
    print_status
}

stop_role() {
    local role="$1" pid deadline
    if ! pid="$(pid_of "$role")"; then
        rm -f "$PID_DIR/$role.pid"
        return
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "$role (pid $pid) did not stop in ${STOP_TIMEOUT}s; killing its process group" >&2
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_DIR/$role.pid"
    echo "stopped $role"
}

stop_all() {
    local role
    for role in "${ROLES[@]}"; do
        stop_role "$role"
    done
}

main() {
    case "${1:-up}" in
        up)
            start_all
            trap 'echo; stop_all; exit 0' INT TERM
            echo "running; Ctrl-C stops all"
            while true; do
                sleep 2
                local role
                for role in "${ROLES[@]}"; do
                    pid_of "$role" >/dev/null || echo "warning: $role is not running; see $LOG_DIR/$role.log" >&2
                done
            done
            ;;
        start) start_all ;;
        stop) stop_all ;;
        status)
            load_run_config
            configure
            print_status
            ;;
        *)
            echo "usage: $0 [up|start|stop|status]" >&2
            exit 2
            ;;
    esac
}

# Sourced (by a test), it only defines the functions.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
