#!/usr/bin/env bash
# bench-telemetry.sh runs the telemetry fan-out benchmark (gpusched sim
# fanout, issue 7 requirement 8) and keeps everything it produced: the
# reports as tables and JSON, the scheduler's and the sim process's CPU
# profiles over each window, the scheduler's heap profile after the last
# window, and the top of each profile as text.
#
#   scripts/bench-telemetry.sh [OUTDIR] [headline|sweep|all]
#
# headline: 2,000 hollow nodes × 8 GPUs at 1 Hz (16,000 samples/s), 20
#   subscribers, 10 s warm-up, a 60 s window.
# sweep: nodes $SWEEP_NODES (default 500 1000 2000 4000), each one run
#   with subscribers $SWEEP_SUBS (default 1,5,20,50) as steps on the same
#   cluster, $SWEEP_WARMUP (5s) warm-up and $SWEEP_WINDOW (20s) windows.
# Default OUTDIR: /tmp/bench-telemetry-<time>; default: all.
#
# Record numbers only on a quiet machine: the load average is printed
# before and after each run (the reports have it per step too).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/bench-telemetry-$(date +%Y%m%d-%H%M%S)}
what=${2:-all}
mkdir -p "$out"
# A private binary: others may rebuild bin/gpusched meanwhile, and pprof
# needs the binary that wrote the profiles.
go build -o "$out/gpusched" ./cmd/gpusched
bin="$out/gpusched"
load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); load before: $(load)" | tee "$out/machine.txt"

fanout() { # name, flags...
  local name=$1
  shift
  echo "== $name: gpusched sim fanout $* (load $(load))" | tee -a "$out/machine.txt"
  "$bin" sim fanout --work-dir "$out/work-$name" --json-file "$out/$name.json" \
    --cpuprofile "$out/sched-$name.cpu" --sim-cpuprofile "$out/sim-$name.cpu" --memprofile "$out/sched-$name.heap" \
    "$@" 2> >(tee "$out/$name.progress.txt" >&2) | tee "$out/$name.txt"
  rm -rf "$out/work-$name/etcd" # keep the scheduler log, not the etcd data
}

if [ "$what" = headline ] || [ "$what" = all ]; then
  fanout headline --nodes 2000 --telemetry-hz 1 --subscribers 20 --warmup 10s --duration 60s
fi
if [ "$what" = sweep ] || [ "$what" = all ]; then
  for n in ${SWEEP_NODES:-500 1000 2000 4000}; do
    fanout "sweep-$n" --nodes "$n" --telemetry-hz 1 --subscribers "${SWEEP_SUBS:-1,5,20,50}" \
      --warmup "${SWEEP_WARMUP:-5s}" --duration "${SWEEP_WINDOW:-20s}"
  done
  # One table of every sweep point.
  if command -v jq >/dev/null; then
    {
      printf 'nodes\tsubs\tsent/s\trecv/s/sub(min)\tp50_ms\tp99_ms\tp99.9_ms\tmax_ms\tdropped\tsched_cores\tsim_cores\tsched_rss_mib\tload\n'
      for f in "$out"/sweep-*.json; do
        jq -r '.config.nodes as $n | .steps[] | [$n, .subscribers, (.sent_samples_per_sec|round),
          "\(.recv_samples_per_sec_mean|round)(\(.recv_samples_per_sec_min|round))",
          .agent_to_subscriber.p50_ms, .agent_to_subscriber.p99_ms, .agent_to_subscriber.p999_ms, .agent_to_subscriber.max_ms,
          .dropped_in_window, (.scheduler_cores*100|round/100), (.sim_cores*100|round/100),
          (.scheduler_rss_bytes/1048576|round), .loadavg_at_window_start] | @tsv' "$f"
      done
    } | sort -n -k1,1 -k2,2 | column -t -s $'\t' | tee "$out/sweep.txt"
  fi
fi
echo "load after: $(load)" | tee -a "$out/machine.txt"
for p in "$out"/*.cpu; do
  [ -f "$p" ] || continue
  go tool pprof -top -nodecount=40 "$bin" "$p" >"$p.top.txt" 2>/dev/null || true
  go tool pprof -top -cum -nodecount=60 "$bin" "$p" >"$p.cum.txt" 2>/dev/null || true
done
for h in "$out"/*.heap; do
  [ -f "$h" ] || continue
  go tool pprof -sample_index=inuse_space -top -nodecount=30 "$bin" "$h" >"$h.top.txt" 2>/dev/null || true
done
echo "results in $out"
