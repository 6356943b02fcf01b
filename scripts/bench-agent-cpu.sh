#!/usr/bin/env bash
# bench-agent-cpu.sh measures a real agent process's CPU over a window:
# one etcd member, one scheduler and one agent on mock-dgxh100 (8 GPUs),
# sampling telemetry and checking exclusivity every --telemetry-interval
# (1s), idle and then while a lease runs. Prints CPU seconds and percent
# of one core, from /proc/<pid>/stat (utime+stime).
#
#   scripts/bench-agent-cpu.sh [SECONDS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
dir=$(mktemp -d /tmp/bench-agent-cpu-XXXXXX)
trap 'go run ./scripts/localcluster down --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
make -s build
go run ./scripts/localcluster up --dir "$dir" --binary bin/gpusched --etcd 1 --schedulers 1 --agents 1 >/dev/null
status=$(go run ./scripts/localcluster status --dir "$dir" 2>/dev/null || true)
export GPUSCHED_SERVER=$(sed -n 's/^export GPUSCHED_SERVER=//p' <<<"$status" | head -1)
pid=$(awk '$1=="agent-1" {print $2}' <<<"$status")
hz=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' "/proc/$pid/stat"; }
sleep 3 # registration and start-up are not the steady state
measure() {
  local label=$1 start end
  start=$(cpu)
  sleep "$secs"
  end=$(cpu)
  awk -v s="$start" -v e="$end" -v hz="$hz" -v w="$secs" -v l="$label" \
    'BEGIN { c=(e-s)/hz; printf "%-28s %6.2f CPU s in %d s = %5.2f%% of one core\n", l, c, w, 100*c/w }'
}
echo "agent pid $pid, mock-dgxh100 (8 GPUs), telemetry every 1s, $(nproc) CPUs"
measure "idle node:"
id=$(bin/gpusched submit -- sleep $((secs + 30)))
sleep 2
measure "node leased (job $id):"
bin/gpusched cancel "$id" >/dev/null 2>&1 || true
