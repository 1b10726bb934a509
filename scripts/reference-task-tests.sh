#!/usr/bin/env bash
# Run the reference's copy/move and drain end-to-end scripts against a pymooncake master,
# as the reference's CI runs them (.github/workflows/ci.yml: env MOONCAKE_MASTER,
# MOONCAKE_TE_META_DATA_SERVER, MOONCAKE_PROTOCOL=tcp; test_drain_http_api.py --timeout-sec 90).
#
#   bash scripts/reference-task-tests.sh /path/to/Mooncake    # a kvcache-ai/Mooncake checkout
#
# The master gets ports chosen at run time (the scripts' own clients still use fixed
# local_hostname ports: 10001-10003 and 12001 for test_copy_move_api.py, 19001-19002 for
# test_drain_http_api.py). Exit status: 0 when both scripts pass.
set -uo pipefail
MOONCAKE=${1:?usage: $0 /path/to/Mooncake}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LOGS=${REFERENCE_TASK_LOGS:-bench/results/reference-task-tests}
mkdir -p "$LOGS"
port() { "$PY" -c "from pymooncake.testing import free_port; print(free_port())"; }
RPC=$(port); META=$(port); ADMIN=$(port)
"$PY" -m pymooncake.cli.master --rpc_address=127.0.0.1 --port="$RPC" \
    --metrics_host=127.0.0.1 --metrics_port="$ADMIN" --enable_http_metadata_server=true \
    --http_metadata_server_host=127.0.0.1 --http_metadata_server_port="$META" \
    >"$LOGS/master.log" 2>&1 &
MASTER=$!
trap 'kill $MASTER 2>/dev/null; wait $MASTER 2>/dev/null' EXIT
for _ in $(seq 100); do
    grep -q "Master service started" "$LOGS/master.log" && break
    sleep 0.1
done
export MOONCAKE_MASTER=127.0.0.1:$RPC
export MOONCAKE_TE_META_DATA_SERVER=http://127.0.0.1:$META/metadata
export MOONCAKE_PROTOCOL=tcp LOCAL_HOSTNAME=127.0.0.1
export MOONCAKE_MASTER_CONTROL_BASE=http://127.0.0.1:$ADMIN
status=0
for script in "test_copy_move_api.py" "test_drain_http_api.py --timeout-sec 90"; do
    name=${script%% *}
    # shellcheck disable=SC2086
    if timeout 600 "$PY" "$MOONCAKE/scripts/"$script >"$LOGS/$name.log" 2>&1; then
        echo "PASS $name"
    else
        echo "FAIL $name (log: $LOGS/$name.log)"
        status=1
    fi
done
exit $status
