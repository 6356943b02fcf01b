#!/usr/bin/env bash
# bench-sim.sh runs the simulated-cluster benchmark (gpusched sim, issue 8)
# and keeps everything it produced: the report as tables and JSON, the
# scheduler's CPU profiles (open phase, backlog drain, cold starts), its
# heap profile with the backlog queued, the sim process's CPU profile,
# the top of each profile as text, and every open-phase latency as CSV.
#
#   scripts/bench-sim.sh [OUTDIR] [gpusched sim flags...]
#
# Default OUTDIR: /tmp/bench-sim-<time>. Default shape: 10,000 hollow nodes,
# 2,000 submissions/s for 30 s, 100,000 jobs queued then released, cold
# starts, etcd ceiling from 1, 4 and 16 clients. A smaller run:
#
#   scripts/bench-sim.sh /tmp/small --nodes 1000 --rate 500 --backlog 10000
#
# Record numbers only on a quiet machine: the load average is printed
# before and after (the report has it too).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/bench-sim-$(date +%Y%m%d-%H%M%S)}
shift || true
mkdir -p "$out"
make -s build
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); load before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/machine.txt"
bin/gpusched sim \
  --cpuprofile "$out/sched-backlog.cpu" \
  --cpuprofile-open "$out/sched-open.cpu" \
  --cpuprofile-cold-start "$out/sched-coldstart.cpu" \
  --memprofile "$out/sched-queued.heap" \
  --sim-cpuprofile "$out/sim-backlog.cpu" \
  --sim-cpuprofile-open "$out/sim-open.cpu" \
  --work-dir "$out/work" \
  --json-file "$out/report.json" \
  --latency-file "$out/open-latencies.csv" \
  "$@" 2> >(tee "$out/progress.txt" >&2) | tee "$out/report.txt"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/machine.txt"
rm -rf "$out/work/etcd" # keep the scheduler logs, not the etcd data
for p in "$out"/*.cpu "$out"/*.cpu.retrying; do
  [ -f "$p" ] || continue
  go tool pprof -top -nodecount=40 bin/gpusched "$p" >"$p.top.txt" 2>/dev/null || true
  go tool pprof -top -cum -nodecount=60 bin/gpusched "$p" >"$p.cum.txt" 2>/dev/null || true
done
go tool pprof -sample_index=inuse_space -top -nodecount=30 bin/gpusched "$out/sched-queued.heap" >"$out/sched-queued.heap.top.txt" 2>/dev/null || true
echo "results in $out"
