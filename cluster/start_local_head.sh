#!/usr/bin/env bash
# Start a single-user Ray head on this machine with d2c's safe defaults:
#
#   * the dashboard (and the job-submission API behind it) listens on 127.0.0.1 only;
#     Ray has no access control besides its auth token, so it is never opened on 0.0.0.0;
#   * usage stats are off (`--disable-usage-stats`, RAY_USAGE_STATS_ENABLED=0);
#   * Ray's token auth is ON (RAY_AUTH_MODE=token): the token is read from RAY_AUTH_TOKEN,
#     else RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (created here if missing). Clients
#     submit with the same token:  RAY_AUTH_MODE=token ray job submit ...
#     `--no-auth` turns it off (RAY_AUTH_MODE=disabled) for a machine nobody else logs in to.
#
# The head runs the `ray` of this project's .venv (or $RAY), and that venv's bin/ is put
# first on PATH, so a job's entrypoint `d2c ...` resolves to the same environment.
#
# Usage:
#   cluster/start_local_head.sh [--no-auth] [--block] [-- RAY_START_ARGS...]
#     --no-auth   disable token auth (single-user machine only)
#     --block     keep `ray start` in the foreground; Ctrl-C (SIGINT) stops this head
#     RAY_START_ARGS are passed to `ray start --head`, e.g. --port 6380 --dashboard-port 8266
#     --num-cpus 8 --num-gpus 1 --temp-dir /tmp/ray-d2c. --dashboard-host is refused: use an
#     SSH tunnel (ssh -L 8265:127.0.0.1:8265 host) to reach the dashboard from elsewhere.
#
# Ray's other ports (GCS, raylet, object manager) listen on this machine's address as Ray
# always does; token auth guards them too. With --no-auth, keep them behind a firewall.
#
# Stop it with `ray stop` (this stops EVERY Ray process of this machine), or start it with
# --block and stop that one process.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL_HOST="127.0.0.1"
DEFAULT_DASHBOARD_PORT="8265"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "start_local_head.sh: $*" >&2; exit 2; }

auth="token"
block=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-auth) auth="disabled" ;;
    --block) block=(--block) ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (ray start options go after --; see --help)" ;;
  esac
  shift
done
extra=("$@")

dashboard_port="$DEFAULT_DASHBOARD_PORT"
for ((i = 0; i < ${#extra[@]}; i++)); do
  case "${extra[$i]}" in
    --dashboard-host*)
      die "${extra[$i]%%=*} is fixed to $LOCAL_HOST by this script; reach the dashboard from another machine with: ssh -L $DEFAULT_DASHBOARD_PORT:$LOCAL_HOST:$DEFAULT_DASHBOARD_PORT THIS_HOST" ;;
    --dashboard-port=*) dashboard_port="${extra[$i]#*=}" ;;
    --dashboard-port) dashboard_port="${extra[$((i + 1))]:-$DEFAULT_DASHBOARD_PORT}" ;;
  esac
done

RAY="${RAY:-}"
if [ -z "$RAY" ]; then
  if [ -x "$ROOT/.venv/bin/ray" ]; then RAY="$ROOT/.venv/bin/ray"
  elif command -v ray >/dev/null 2>&1; then RAY="$(command -v ray)"
  else die "no ray found: run 'make setup' (creates .venv) or set RAY=/path/to/ray"; fi
fi
export PATH="$(dirname "$RAY"):$PATH"
export RAY_USAGE_STATS_ENABLED=0

if [ "$auth" = "token" ]; then
  export RAY_AUTH_MODE=token
  if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
    token_from="RAY_AUTH_TOKEN"
  elif [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
    [ -s "$RAY_AUTH_TOKEN_PATH" ] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty"
    token_from="$RAY_AUTH_TOKEN_PATH"
  else
    # Creates ~/.ray/auth_token if missing; the token itself is not printed.
    "$RAY" get-auth-token --generate >/dev/null 2>&1 || die "could not read or create a token with: $RAY get-auth-token --generate"
    token_from="$HOME/.ray/auth_token"
  fi
  echo "[d2c] token auth: on (token from $token_from). Clients need the same token and RAY_AUTH_MODE=token."
  client_env="RAY_AUTH_MODE=token "
else
  export RAY_AUTH_MODE=disabled
  echo "[d2c] token auth: OFF (--no-auth). Anyone who can reach $LOCAL_HOST:$dashboard_port on this machine can run code as you." >&2
  client_env=""
fi

if [ ${#block[@]} -gt 0 ]; then
  stop_hint="Ctrl-C (SIGINT to this process; SIGTERM works too, slower)"
else
  stop_hint="ray stop   (stops every Ray process on this machine)"
fi
cat <<MSG
[d2c] starting a local Ray head with $RAY
[d2c] dashboard: http://$LOCAL_HOST:$dashboard_port   (bound to $LOCAL_HOST only; usage stats off)
[d2c] submit:    ${client_env}ray job submit --address http://$LOCAL_HOST:$dashboard_port --working-dir . \\
                   -- d2c condense --config configs/embedded.yaml
[d2c] stop:      $stop_hint
MSG

exec "$RAY" start --head \
  --dashboard-host="$LOCAL_HOST" \
  --disable-usage-stats \
  "${extra[@]}" "${block[@]}"
