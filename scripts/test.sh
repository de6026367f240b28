#!/usr/bin/env bash
# The one test command: sets up a fresh machine, then runs ruff, mypy --strict and the whole suite.
# Installs (when missing) PostgreSQL server binaries, OpenSSH server and client, pgbouncer,
# sshpass, curl, xauth (X11 forwarding tests) and rsync with apt-get, and the Python environment in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
pg_bin=""
for d in /usr/lib/postgresql/*/bin; do
  [ -x "$d/initdb" ] && pg_bin="$d"
done
[ -n "$pg_bin" ] || need_apt+=(postgresql postgresql-contrib)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v sshpass >/dev/null 2>&1 || need_apt+=(sshpass)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need_apt+=(pgbouncer)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v xauth >/dev/null 2>&1 || need_apt+=(xauth)
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing system packages: ${need_apt[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=""; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.hoop-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ proxy/pg/_wire.c -nt "$stamp" ]; then
  echo "== installing hoop and its test dependencies into .venv"
  if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test]'; } >.venv/pip.log 2>&1; then
    cat .venv/pip.log
    echo "installing the Python environment failed (log above)" >&2
    exit 1
  fi
  touch "$stamp"
fi

echo "== ruff"
.venv/bin/ruff check broker bot proxy tests bench
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
