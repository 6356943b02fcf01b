#!/usr/bin/env bash
# device-check.sh: one short check of gpusched against a real NVIDIA GPU.
# Everything else in the project runs on go-nvml's simulated DGX nodes.
#
#   scripts/device-check.sh --build   # where Go is: builds .device/gpusched
#                                     # and .device/gpu.test (git-ignored)
#   scripts/device-check.sh OUTDIR    # on the GPU machine, from the repo root:
#                                     # needs only .device/, nvidia-smi and
#                                     # python3 with PyTorch; no Go, no network
#
# The run takes about 2 minutes and never more than ~4 (every step has a
# timeout, and all of them share a budget of $DEVICE_CHECK_BUDGET seconds,
# default 200). Steps:
#
#   preflight      the prebuilt binaries run here, nvidia-smi sees a GPU
#   nvidia-smi     nvidia-smi -q and a CSV query, kept as the reference
#   torch-holder   a python3/torch process holding a CUDA context on GPU 0
#   go-tests       .device/gpu.test: nodeagent/gpu/nvml_real_test.go on real
#                  NVML (inventory against nvidia-smi, telemetry, health
#                  checks, XID event set, process list, and a whole node
#                  agent reporting the torch process as foreign)
#   agent-metrics  `gpusched agent --gpu-backend nvml`: its /metrics has
#                  every DCGM_FI_* series for every GPU
#   dev-cluster    `gpusched dev --gpu-backend nvml --nodes 1`: gpu-01 READY
#                  with the GPUs nvidia-smi lists
#   job            a ~10 s torch matmul job on gpu-01 SUCCEEDS; `top --once`
#                  while it runs
#   usage          `gpusched jobs ID`: Usage shows non-zero GPU utilization
#   foreign-lease  a torch process started beside the running job is killed
#                  by the agent (FOREIGN_PROCESS "not part of lease") and the
#                  job itself is not
#   foreign-idle   the same on the idle node ("on an idle node"); the node
#                  stays READY (a foreign process is an event and a kill, not
#                  a health failure) and takes the next job
#   metrics        the scheduler's /metrics: DCGM_FI_* for gpu-01, utilization
#                  above 0 while the job ran
#   shutdown       dev stops cleanly; no GPU process is left
#
# OUTDIR gets at most 7 files, no folders: summary.txt (PASS/FAIL per step),
# nvidia-smi.txt, gpu-test.log, agent.log, dev.log, e2e.txt (every CLI call
# and its output), metrics.txt (raw scrapes). The exit code is 0 only when
# every step passed; summary.txt is written in every case.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
dev_dir=.device

if [[ ${1:-} == --build ]]; then
  set -e
  command -v go >/dev/null || { echo "device-check: --build needs the Go toolchain" >&2; exit 1; }
  export CGO_CFLAGS="${CGO_CFLAGS:+$CGO_CFLAGS }-Wno-deprecated-declarations"
  mkdir -p "$dev_dir"
  # Stripped: everything in .device/ travels to the GPU machine (64 MiB).
  go build -trimpath -ldflags='-s -w' -o "$dev_dir/gpusched" ./cmd/gpusched
  go test -c -trimpath -ldflags='-s -w' -o "$dev_dir/gpu.test" ./nodeagent/gpu
  glibc=$(objdump -T "$dev_dir/gpusched" "$dev_dir/gpu.test" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)
  dirty=$(git diff --quiet HEAD -- . 2>/dev/null || echo "+uncommitted changes")
  {
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m) from $(git rev-parse --short HEAD 2>/dev/null)$dirty"
    go version
    echo "needs glibc >= ${glibc#GLIBC_} (this machine: $(ldd --version 2>/dev/null | head -1))"
  } >"$dev_dir/BUILD-INFO"
  cat "$dev_dir/BUILD-INFO"
  ls -l "$dev_dir"
  kib=$(du -sk "$dev_dir" | cut -f1)
  echo "total $((kib / 1024)) MiB"
  if ((kib > 60 * 1024)); then
    echo "device-check: $dev_dir is over 60 MiB, too big to carry" >&2
    exit 1
  fi
  exit 0
fi

if [[ $# -ne 1 || ${1:-} == -* ]]; then
  echo "usage: $0 --build | $0 OUTDIR" >&2
  exit 2
fi

mkdir -p "$1" || exit 1
out=$(cd "$1" && pwd)
start=$(date +%s)
budget=${DEVICE_CHECK_BUDGET:-200}
gpusched=$root/$dev_dir/gpusched
gputest=$root/$dev_dir/gpu.test
summary=$out/summary.txt smi_log=$out/nvidia-smi.txt test_log=$out/gpu-test.log
agent_log=$out/agent.log dev_log=$out/dev.log e2e=$out/e2e.txt metrics_log=$out/metrics.txt
: >"$e2e"
: >"$metrics_log"
: >"$test_log"
: >"$agent_log"
: >"$dev_log"
work=$(mktemp -d /tmp/gpusched-device-check.XXXXXX) || exit 1

results=()    # "STATUS  step  detail"
failed=()     # failed steps
summarized=0  # summary.txt written
pids=()       # processes to stop on exit, each once
dev_pid="" agent_pid="" job_pid="" bg_pid=""

elapsed() { echo $(($(date +%s) - start)); }
# tmo N: N seconds, or what is left of the budget if that is less (>= 1).
tmo() {
  local left=$((budget - $(elapsed)))
  ((left < 1)) && left=1
  echo $(($1 < left ? $1 : left))
}
note() { printf '\n==== [+%ss] %s\n' "$(elapsed)" "$*" >>"$e2e"; }
result() { # STATUS STEP DETAIL...
  local status=$1 step=$2
  shift 2
  results+=("$(printf '%-4s  %-14s %s' "$status" "$step" "$*")")
  [[ $status == FAIL ]] && failed+=("$step")
  printf '[+%3ss] %-4s %-14s %s\n' "$(elapsed)" "$status" "$step" "$*" >&2
}
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }
# stop PID SIGNAL GRACE: signal, then SIGKILL after GRACE seconds.
stop() {
  local pid=$1 sig=$2 grace=$3 i
  alive "$pid" || return 0
  kill "-$sig" "$pid" 2>/dev/null
  for ((i = 0; i < grace * 10; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  return 1
}
# fg CMD...: CMD in the background, waited for, so that SIGTERM or SIGINT
# stops this script at once (bash runs traps only between commands, but
# during `wait`); cleanup stops CMD.
fg() {
  local rc
  "$@" &
  bg_pid=$!
  wait "$bg_pid"
  rc=$?
  bg_pid=""
  return $rc
}
http_get() {
  if command -v curl >/dev/null; then
    curl -fsS --max-time 5 "$1"
  else
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"
  fi
}
# cli SECONDS ARGS...: gpusched ARGS, logged to e2e.txt; output in $cli_out.
cli() {
  local t=$1 rc
  shift
  printf '$ gpusched %s\n' "$*" >>"$e2e"
  fg timeout "$(tmo "$t")" "$gpusched" "$@" >"$work/cli.out" 2>&1
  rc=$?
  cli_out=$(<"$work/cli.out")
  printf '%s\n' "$cli_out" >>"$e2e"
  ((rc != 0)) && echo "(exit $rc)" >>"$e2e"
  return $rc
}
# job_state ID: the job's state (RUNNING, SUCCEEDED, ...), "" on error.
job_state() {
  timeout "$(tmo 10)" "$gpusched" jobs "$1" -o json 2>/dev/null | grep -o '"state": *"JOB_STATE_[A-Z_]*"' | head -1 | sed 's/.*JOB_STATE_//; s/"//'
}
node_state() {
  timeout "$(tmo 10)" "$gpusched" nodes gpu-01 2>/dev/null | awk '$1 == "State:" {print $2}'
}
# gpu_apps: the compute processes nvidia-smi lists, one "pid, name, MiB" a line.
gpu_apps() {
  timeout 20 nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>&1 | grep -E '^ *[0-9]+,'
}
# wait_gpu_idle SECONDS: until nvidia-smi lists no compute process; false if
# some remain.
wait_gpu_idle() {
  local i
  for ((i = 0; i < $1 * 2; i++)); do
    [[ -z $(gpu_apps) ]] && return 0
    sleep 0.5
  done
  [[ -z $(gpu_apps) ]]
}
# wait_exit PID SECONDS: wait for a child to exit; its status in $exit_status
# (143: SIGTERM, 137: SIGKILL), "running" if it outlived SECONDS.
wait_exit() {
  local pid=$1 i
  for ((i = 0; i < $2 * 10; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  if alive "$pid"; then
    exit_status=running
  else
    wait "$pid" 2>/dev/null
    exit_status=$?
  fi
}

write_summary() {
  ((summarized)) && return
  summarized=1
  {
    echo "gpusched device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), host ${HOSTNAME:-?}, $(elapsed)s"
    [[ -f $dev_dir/BUILD-INFO ]] && sed 's/^/  /' "$dev_dir/BUILD-INFO"
    echo
    printf '%s\n' "${results[@]}"
    echo
    if ((${#failed[@]} == 0)); then
      echo "RESULT: PASS ($(printf '%s\n' "${results[@]}" | grep -c '^PASS') steps)"
    else
      echo "RESULT: FAIL (${failed[*]})"
    fi
    echo "files: summary.txt nvidia-smi.txt gpu-test.log agent.log dev.log e2e.txt metrics.txt"
  } >"$summary"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pid
  stop "$bg_pid" TERM 3
  for pid in "${pids[@]}"; do
    stop "$pid" TERM 3
  done
  # dev stops its agent's job commands itself; SIGKILL would orphan them.
  stop "$dev_pid" INT 15
  stop "$agent_pid" INT 5
  if alive "$job_pid"; then
    kill -KILL -- "-$job_pid" 2>/dev/null || kill -KILL "$job_pid" 2>/dev/null
  fi
  rm -rf "$work"
  if ((${#results[@]} == 0 || rc > 128)); then
    result FAIL interrupted "the check stopped early (exit $rc)"
  fi
  write_summary
  echo "device-check: $(tail -2 "$summary" | head -1); see $summary" >&2
  ((${#failed[@]} == 0)) && exit 0
  exit 1
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

skip_rest() { # STEP... : mark the steps not run
  local s
  for s in "$@"; do result SKIP "$s" "not run: $why"; done
}
all_steps=(nvidia-smi torch-holder go-tests agent-metrics dev-cluster job usage foreign-lease foreign-idle metrics shutdown)

# ---------------------------------------------------------------- preflight
{
  echo "== $(uname -a)"
  grep -h PRETTY_NAME /etc/os-release 2>/dev/null
  echo "glibc: $(ldd --version 2>/dev/null | head -1)"
  echo "CPUs: $(nproc), python3: $(command -v python3 || echo none)"
  [[ -f $dev_dir/BUILD-INFO ]] && cat "$dev_dir/BUILD-INFO"
} >"$smi_log" 2>&1
why=""
if [[ ! -x $gpusched || ! -x $gputest ]]; then
  why="$dev_dir/gpusched or $dev_dir/gpu.test missing: run scripts/device-check.sh --build where Go is, and carry $dev_dir"
elif ! msg=$("$gpusched" --help 2>&1 >/dev/null) || ! msg=$("$gputest" -test.list 'NVML' 2>&1 >/dev/null); then
  why="the prebuilt binaries do not run here (glibc older than the build machine's?): $(echo "$msg" | head -2 | tr '\n' ' ')"
elif ! command -v nvidia-smi >/dev/null; then
  why="nvidia-smi not found: this check needs a machine with an NVIDIA GPU and its driver"
elif ! smi_l=$(timeout 20 nvidia-smi -L 2>&1) || ! grep -q '^GPU ' <<<"$smi_l"; then
  why="nvidia-smi -L lists no GPU: $(echo "$smi_l" | head -2 | tr '\n' ' ')"
elif ! command -v python3 >/dev/null; then
  why="python3 not found (the jobs and the foreign process are python3 with PyTorch)"
fi
if [[ -n $why ]]; then
  result FAIL preflight "$why"
  why="preflight failed"
  skip_rest "${all_steps[@]}"
  exit 1
fi
py=$(command -v python3)
result PASS preflight "binaries run, nvidia-smi lists $(grep -c '^GPU ' <<<"$smi_l") GPU(s), python3 is $py"

# --------------------------------------------------------------- nvidia-smi
query=index,uuid,name,memory.total,pci.bus_id,driver_version
{
  echo "== nvidia-smi -L"
  echo "$smi_l"
  echo "== nvidia-smi --query-gpu=$query --format=csv,noheader,nounits"
  timeout 20 nvidia-smi --query-gpu=$query --format=csv,noheader,nounits | tee "$work/gpus.csv"
  echo "== nvidia-smi --query-gpu=uuid --format=csv,noheader"
  timeout 20 nvidia-smi --query-gpu=uuid --format=csv,noheader | tee "$work/uuids.txt"
  echo "== nvidia-smi --query-gpu=temperature.gpu,power.draw,clocks.sm,clocks.mem,utilization.gpu,memory.used,memory.free --format=csv"
  timeout 20 nvidia-smi --query-gpu=temperature.gpu,power.draw,clocks.sm,clocks.mem,utilization.gpu,memory.used,memory.free --format=csv
  echo "== nvidia-smi (before)"
  timeout 20 nvidia-smi
  echo "== nvidia-smi -q"
  timeout 30 nvidia-smi -q
} >>"$smi_log" 2>&1
uuids=$(paste -sd, "$work/uuids.txt" | tr -d ' ')
ngpu=$(grep -c . "$work/gpus.csv")
if ((ngpu > 0)) && [[ -n $uuids ]]; then
  result PASS nvidia-smi "$ngpu GPU(s): $(cut -d, -f3 "$work/gpus.csv" | sed 's/^ //' | sort | uniq -c | sed 's/^ *//' | paste -sd';'), driver $(head -1 "$work/gpus.csv" | cut -d, -f6 | tr -d ' ')"
else
  result FAIL nvidia-smi "the CSV query gave no GPU (see nvidia-smi.txt)"
fi

# The python3 side: a holder of a CUDA context, and the job.
cat >"$work/dc.py" <<'EOF'
import os, sys, time
mode = sys.argv[1]
t0 = time.time()
import torch

def info(tag):
    print(f"{tag}: pid {os.getpid()} pgid {os.getpgid(0)} torch {torch.__version__} (CUDA {torch.version.cuda}) "
          f"on {torch.cuda.get_device_name(0)}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}, "
          f"ready {time.time() - t0:.1f}s after start", flush=True)

def ready(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)

if not torch.cuda.is_available():
    print(f"{mode}: torch.cuda.is_available() is False", flush=True)
    sys.exit(2)
if mode == "holder":  # holder READY_FILE SECONDS
    x = torch.ones(64 << 20, device="cuda:0")  # 256 MiB
    torch.cuda.synchronize()
    info("holder")
    ready(sys.argv[2])
    time.sleep(float(sys.argv[3]))
    print(f"holder: pid {os.getpid()} slept {sys.argv[3]}s and exits: nobody killed it", flush=True)
elif mode == "job":  # env DC_READY, DC_STOP, DC_MIN, DC_MAX
    lo, hi = float(os.environ.get("DC_MIN", "10")), float(os.environ.get("DC_MAX", "40"))
    n = 8192
    a = torch.randn(n, n, device="cuda:0")
    b = torch.randn(n, n, device="cuda:0")
    torch.cuda.synchronize()
    info("job")
    ready(os.environ["DC_READY"])
    start, k = time.time(), 0
    while True:
        c = a @ b
        k += 1
        if k % 10 == 0:
            torch.cuda.synchronize()
            el = time.time() - start
            if el >= hi or (el >= lo and os.path.exists(os.environ["DC_STOP"])):
                break
    el = time.time() - start
    print(f"job: {k} fp32 matmuls {n}x{n} in {el:.1f}s, {2 * n**3 * k / el / 1e12:.1f} TFLOP/s", flush=True)
    print("job: done", flush=True)
EOF

# start_holder NAME SECONDS LOG: a torch process holding GPU 0, started by
# this script, outside any lease. Its PID in $holder_pid.
start_holder() {
  rm -f "$work/$1.ready"
  CUDA_DEVICE_ORDER=PCI_BUS_ID "$py" "$work/dc.py" holder "$work/$1.ready" "$2" >>"$3" 2>&1 &
  holder_pid=$!
  pids+=("$holder_pid")
}
# wait_ready NAME PID SECONDS: until the ready file appears, PID dies or time is up.
wait_ready() {
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    [[ -f $work/$1.ready ]] && return 0
    alive "$2" || return 1
    sleep 0.1
  done
  [[ -f $work/$1.ready ]]
}

# ------------------------------------------------------------- torch-holder
echo "==== torch holder (GPUSCHED_FOREIGN_PID) ====" >>"$test_log"
t0=$(elapsed)
start_holder holder1 150 "$test_log"
holder1=$holder_pid
foreign_env=()
if wait_ready holder1 "$holder1" "$(tmo 75)"; then
  result PASS torch-holder "pid $holder1 holds 256 MiB on GPU 0 after $(($(elapsed) - t0))s"
  foreign_env=(GPUSCHED_FOREIGN_PID="$holder1")
else
  result FAIL torch-holder "no CUDA context after $(($(elapsed) - t0))s: $(grep -v '^====' "$test_log" | tail -1)"
  stop "$holder1" TERM 3
fi

# ----------------------------------------------------------------- go-tests
echo "==== gpu.test -test.v -test.run NVML ====" >>"$test_log"
t0=$(elapsed)
fg env GPUSCHED_TEST_REAL_NVML=1 GPUSCHED_EXPECT_UUIDS="$uuids" GPUSCHED_EXPECT_GPUS="$(cat "$work/gpus.csv")" "${foreign_env[@]}" \
  timeout "$(tmo 100)" "$gputest" -test.v -test.count=1 -test.run 'NVML' -test.timeout 90s >>"$test_log" 2>&1
rc=$?
stop "$holder1" TERM 3
# An agent that starts while NVML still lists it would take the node for
# unhealthy.
if ! wait_gpu_idle "$(tmo 10)"; then
  result FAIL gpu-idle "GPU processes still listed 10s after the holder stopped: $(gpu_apps | paste -sd';')"
fi
counts="$(grep -c -- '^--- PASS' "$test_log") passed, $(grep -c -- '^--- FAIL' "$test_log") failed, $(grep -c -- '^--- SKIP' "$test_log") skipped"
if ((rc == 0)) && ! grep -q -- '^--- SKIP: TestRealNVML' "$test_log"; then
  result PASS go-tests "$counts in $(($(elapsed) - t0))s"
else
  result FAIL go-tests "exit $rc; $counts (a SKIP of TestRealNVML* counts as failure here); see gpu-test.log"
fi
while read -r line; do results+=("        $line"); done < <(grep -E -- '^\s*--- (PASS|FAIL|SKIP): ' "$test_log")

# ------------------------------------------------------------ agent-metrics
dcgm_names=(DCGM_FI_DEV_GPU_UTIL DCGM_FI_DEV_MEM_COPY_UTIL DCGM_FI_DEV_FB_USED DCGM_FI_DEV_FB_FREE DCGM_FI_DEV_GPU_TEMP
  DCGM_FI_DEV_POWER_USAGE DCGM_FI_DEV_SM_CLOCK DCGM_FI_DEV_MEM_CLOCK DCGM_FI_DEV_CLOCK_THROTTLE_REASONS DCGM_FI_DEV_XID_ERRORS
  DCGM_FI_DEV_ECC_SBE_VOL_TOTAL DCGM_FI_DEV_ECC_DBE_VOL_TOTAL DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS)
# check_dcgm FILE: every DCGM name for every expected UUID; problems in $dcgm_missing.
check_dcgm() {
  local name u
  dcgm_missing=()
  for name in "${dcgm_names[@]}"; do
    for u in ${uuids//,/ }; do
      grep -q "^$name{.*UUID=\"$u\"" "$1" || dcgm_missing+=("$name/$u")
    done
  done
}
# metric FILE NAME LABELMATCH: the largest value of the series matching.
metric() { grep "^$2{" "$1" | grep -- "$3" | awk '{v = $NF + 0; if (v > m) m = v} END {print m + 0}'; }

t0=$(elapsed)
"$gpusched" agent --gpu-backend nvml --scheduler 127.0.0.1:1 --node-id device-check --data-dir "$work/agent" \
  --metrics-listen 127.0.0.1:0 --foreign-process-policy report >>"$agent_log" 2>&1 &
agent_pid=$!
url=""
for ((i = 0; i < $(tmo 15) * 10; i++)); do
  url=$(grep -o 'http://127\.0\.0\.1:[0-9]*/metrics' "$agent_log" | head -1)
  [[ -n $url ]] || ! alive "$agent_pid" && break
  sleep 0.1
done
scrape=$work/agent.metrics
: >"$scrape"
if [[ -n $url ]]; then
  for ((i = 0; i < $(tmo 10) * 2; i++)); do
    http_get "$url" >"$scrape" 2>>"$agent_log" && grep -q '^DCGM_FI_DEV_GPU_TEMP{' "$scrape" && break
    sleep 0.5
  done
fi
{
  echo "==== gpusched agent --gpu-backend nvml: $url"
  cat "$scrape"
} >>"$metrics_log"
stop "$agent_pid" INT 10
agent_rc=$?
wait "$agent_pid" 2>/dev/null
agent_exit=$?
{
  echo "==== agent exit status $agent_exit (stopped by SIGINT: $( ((agent_rc == 0)) && echo yes || echo "no, SIGKILL after 10s"))"
  echo "==== DCGM series of its /metrics"
  grep '^DCGM_FI_' "$scrape"
} >>"$agent_log"
check_dcgm "$scrape"
bad_log=$(grep -E 'sampling the GPUs failed|XID events unavailable|GPUs without XID events|panic' "$agent_log" | head -3)
if [[ -z $url ]]; then
  result FAIL agent-metrics "the agent did not serve /metrics (see agent.log): $(tail -1 "$agent_log" | cut -c1-200)"
elif ((${#dcgm_missing[@]} > 0)); then
  result FAIL agent-metrics "missing series: ${dcgm_missing[*]:0:5} (see metrics.txt)"
elif [[ -n $bad_log ]]; then
  result FAIL agent-metrics "the agent logged: $(echo "$bad_log" | cut -c1-200 | paste -sd'|')"
elif ! grep -q '^gpusched_agent_connected 0' "$scrape"; then
  result FAIL agent-metrics "gpusched_agent_connected is not 0 with no scheduler"
elif ((agent_rc != 0)); then
  result FAIL agent-metrics "series fine, but the agent ignored SIGINT for 10s"
else
  result PASS agent-metrics "${#dcgm_names[@]} DCGM series x $ngpu GPU(s); GPU temp $(metric "$scrape" DCGM_FI_DEV_GPU_TEMP .) C, power $(metric "$scrape" DCGM_FI_DEV_POWER_USAGE .) W; stopped cleanly ($(($(elapsed) - t0))s)"
fi

# -------------------------------------------------------------- dev-cluster
note "gpusched dev --gpu-backend nvml --nodes 1"
t0=$(elapsed)
"$gpusched" dev --gpu-backend nvml --nodes 1 --data-dir "$work/dev" --http-listen '' \
  --metrics-listen 127.0.0.1:0 --health-recheck-interval 5s >>"$dev_log" 2>&1 &
dev_pid=$!
for ((i = 0; i < $(tmo 40) * 10; i++)); do
  [[ -s $work/dev/endpoint ]] && break
  alive "$dev_pid" || break
  sleep 0.1
done
export GPUSCHED_SERVER=""
[[ -s $work/dev/endpoint ]] && GPUSCHED_SERVER=$(head -1 "$work/dev/endpoint")
murl=$(grep -o '^metrics on http://[^ ]*' "$dev_log" | head -1 | sed 's/^metrics on //')
state=""
if [[ -n $GPUSCHED_SERVER ]]; then
  for ((i = 0; i < $(tmo 40) * 2; i++)); do
    state=$(node_state)
    [[ $state == READY ]] && break
    alive "$dev_pid" || break
    sleep 0.5
  done
fi
cli 10 nodes
cli 10 nodes gpu-01
missing=()
for u in ${uuids//,/ }; do grep -q "$u" <<<"$cli_out" || missing+=("$u"); done
dev_ok=0
if [[ -z $GPUSCHED_SERVER ]]; then
  why="gpusched dev did not come up (see dev.log: $(grep -v '^\s*$' "$dev_log" | tail -1 | cut -c1-200))"
  result FAIL dev-cluster "$why"
elif [[ $state != READY ]]; then
  why="node gpu-01 is ${state:-unknown}, not READY"
  result FAIL dev-cluster "$why after $(($(elapsed) - t0))s (see e2e.txt, dev.log)"
elif ((${#missing[@]} > 0)); then
  dev_ok=1
  result FAIL dev-cluster "gpu-01 READY but its inventory lacks UUIDs ${missing[*]}"
else
  dev_ok=1
  result PASS dev-cluster "gpu-01 READY after $(($(elapsed) - t0))s with the $ngpu GPU(s) nvidia-smi lists; metrics at ${murl:-none}"
fi

if ((!dev_ok)); then
  why="no dev cluster"
  skip_rest job usage foreign-lease foreign-idle metrics
else
  # ------------------------------------------------------------------- job
  note "job: torch matmul loop on gpu-01"
  t0=$(elapsed)
  rm -f "$work/job.ready" "$work/job.stop"
  printf '$ gpusched submit ... -- %s %s job\n' "$py" "$work/dc.py" >>"$e2e"
  id=$(timeout 15 "$gpusched" submit --name device-check --time-limit 150s --max-retries 0 \
    --env DC_READY="$work/job.ready" --env DC_STOP="$work/job.stop" -- "$py" "$work/dc.py" job 2>>"$e2e")
  echo "job id: ${id:-none}" >>"$e2e"
  jstate="" wait_rc=1 job_out="" job_logs="" top_out=""
  if [[ -n $id ]]; then
    for ((i = 0; i < $(tmo 75) * 2; i++)); do
      [[ -f $work/job.ready ]] && break
      if ((i % 4 == 0)); then
        jstate=$(job_state "$id")
        [[ $jstate =~ ^(SUCCEEDED|FAILED|CANCELLED|TIMED_OUT)$ ]] && break
      fi
      sleep 0.5
    done
  fi
  top_ok=0 mid_util=0 mid_job=""
  if [[ -f $work/job.ready ]]; then
    job_pid=$(cat "$work/job.ready")
    echo "job's torch process: pid $job_pid, on the GPU after $(($(elapsed) - t0))s" >>"$e2e"
    sleep 3 # a few telemetry rounds under load
    note "top --once while the job runs"
    cli 15 top --once && grep -q gpu-01 <<<"$cli_out" && top_ok=1
    top_out=$cli_out
    if [[ -n $murl ]]; then
      http_get "$murl" >"$work/mid.metrics" 2>>"$e2e"
      {
        echo "==== scheduler /metrics while the job runs (+$(elapsed)s): $murl"
        cat "$work/mid.metrics"
      } >>"$metrics_log"
      mid_util=$(metric "$work/mid.metrics" DCGM_FI_DEV_GPU_UTIL 'node="gpu-01"')
      mid_job=$(grep '^DCGM_FI_DEV_GPU_UTIL{' "$work/mid.metrics" | grep -o 'job="[^"]*"' | head -1)
    fi

    # ----------------------------------------------------- foreign-lease
    note "foreign process beside the running job"
    start_holder holder2 60 "$e2e"
    holder2=$holder_pid
    echo "started a torch process outside gpusched: pid $holder2" >>"$e2e"
    t1=$(elapsed)
    wait_exit "$holder2" "$(tmo 45)"
    holder2_status=$exit_status holder2_after="$(($(elapsed) - t1))s after start"
    [[ -f $work/holder2.ready ]] && holder2_after+=", after taking GPU memory" || holder2_after+=", before it had allocated"
    echo "pid $holder2 ended with status $holder2_status after ${holder2_after} (143: SIGTERM, 137: SIGKILL)" >>"$e2e"
    stop "$holder2" TERM 2
  else
    holder2="" holder2_status="not started (the job never reached the GPU)"
  fi
  touch "$work/job.stop"
  if [[ -n $id ]]; then
    note "wait for the job"
    cli 75 wait --timeout "$(tmo 70)s" "$id"
    wait_rc=$?
    jstate=$(job_state "$id")
    for ((i = 0; i < 10; i++)); do # the lease summary lands with the end of the lease
      cli 10 jobs "$id"
      grep -q '^Usage:' <<<"$cli_out" && break
      (($(elapsed) < budget)) || break
      sleep 1
    done
    job_out=$cli_out
    cli 15 logs "$id"
    job_logs=$cli_out
  fi
  if ((wait_rc == 0)) && [[ $jstate == SUCCEEDED ]] && grep -q 'job: done' <<<"$job_logs"; then
    result PASS job "job $id SUCCEEDED in $(($(elapsed) - t0))s: $(grep -o 'job: [0-9]* fp32.*' <<<"$job_logs" | head -1)"
  else
    result FAIL job "job ${id:-?} ${jstate:-not submitted} (wait exit $wait_rc); see e2e.txt: $(grep -E 'job:|Error|error' <<<"$job_logs" | tail -1 | cut -c1-160)"
  fi
  if ((top_ok)); then
    results+=("        top --once while the job ran: $(grep gpu-01 <<<"$top_out" | head -1 | tr -s ' ' | cut -c1-150)")
  else
    results+=("        top --once while the job ran: failed or no gpu-01 row (see e2e.txt)")
  fi

  # ----------------------------------------------------------------- usage
  usage_line=$(grep -A1 '^Usage:' <<<"$job_out" | tr -s ' ' | paste -sd' ')
  mean=$(grep -o 'mean [0-9.]*%' <<<"$usage_line" | grep -o '[0-9.]*' | head -1)
  peak=$(grep -o 'peak [0-9]*%' <<<"$usage_line" | grep -o '[0-9]*' | head -1)
  if [[ -z $usage_line ]]; then
    result FAIL usage "no Usage block in 'gpusched jobs $id'"
  elif awk -v m="${mean:-0}" -v p="${peak:-0}" 'BEGIN {exit !(m > 0 && p > 0)}'; then
    result PASS usage "$usage_line"
  else
    result FAIL usage "utilization not above 0: $usage_line"
  fi

  # --------------------------------------------------------- foreign-lease
  ev=$(grep 'FOREIGN_PROCESS' <<<"$job_out" | grep "process ${holder2:-none} " | head -1 | tr -s ' ')
  nforeign=$(grep -o '[0-9]* foreign GPU process event' <<<"$job_out" | grep -o '^[0-9]*')
  if [[ -z $holder2 ]]; then
    result FAIL foreign-lease "not run: $holder2_status"
  elif [[ $holder2_status != 143 && $holder2_status != 137 ]]; then
    result FAIL foreign-lease "pid $holder2 beside the job was not killed (status $holder2_status after ${holder2_after}); event: ${ev:-none}"
  elif [[ -z $ev || $ev != *"not part of lease"* ]]; then
    result FAIL foreign-lease "pid $holder2 killed (status $holder2_status) but the job shows no FOREIGN_PROCESS 'not part of lease' event for it"
  elif [[ $jstate != SUCCEEDED ]]; then
    result FAIL foreign-lease "pid $holder2 killed, but the job itself ended $jstate"
  else
    result PASS foreign-lease "pid $holder2 killed (status $holder2_status, ${holder2_after}), job unharmed, ${nforeign:-?} foreign event(s) in Usage: ${ev#*FOREIGN_PROCESS }"
  fi

  # ---------------------------------------------------------- foreign-idle
  note "foreign process on the idle node"
  for ((i = 0; i < $(tmo 60) * 2; i++)); do # cleanup after the lease
    state=$(node_state)
    [[ $state == READY ]] && break
    sleep 0.5
  done
  echo "node gpu-01 is ${state:-unknown} at +$(elapsed)s" >>"$e2e"
  start_holder holder3 60 "$e2e"
  holder3=$holder_pid
  echo "started a torch process outside gpusched: pid $holder3" >>"$e2e"
  t1=$(elapsed)
  wait_exit "$holder3" "$(tmo 45)"
  holder3_status=$exit_status holder3_after="$(($(elapsed) - t1))s after start"
  [[ -f $work/holder3.ready ]] && holder3_after+=", after taking GPU memory" || holder3_after+=", before it had allocated"
  echo "pid $holder3 ended with status $holder3_status after ${holder3_after} (143: SIGTERM, 137: SIGKILL)" >>"$e2e"
  stop "$holder3" TERM 2
  sleep 2 # a health re-check, if the design had one for this
  cli 10 nodes gpu-01
  node_out=$cli_out
  state_after=$(awk '$1 == "State:" {print $2}' <<<"$node_out")
  ev=$(grep 'FOREIGN_PROCESS' <<<"$node_out" | grep "process $holder3 " | head -1 | tr -s ' ')
  note "follow-up job on gpu-01"
  echo "compute processes nvidia-smi lists now: $(gpu_apps | paste -sd';')" >>"$e2e"
  follow=$(timeout 15 "$gpusched" submit --name device-check-after --max-retries 0 -- sh -c 'echo follow-up job ran' 2>>"$e2e")
  cli 40 wait --timeout "$(tmo 35)s" "${follow:-none}"
  follow_rc=$?
  if [[ $holder3_status != 143 && $holder3_status != 137 ]]; then
    result FAIL foreign-idle "pid $holder3 on the idle node was not killed (status $holder3_status after ${holder3_after}); node $state_after; event: ${ev:-none}"
  elif [[ -z $ev || $ev != *"on an idle node"* ]]; then
    result FAIL foreign-idle "pid $holder3 killed (status $holder3_status) but gpu-01 shows no FOREIGN_PROCESS 'on an idle node' event for it"
  elif [[ $state_after != READY || $follow_rc -ne 0 ]]; then
    result FAIL foreign-idle "pid $holder3 killed and reported, then node ${state_after:-?}, follow-up job exit $follow_rc (design: the node stays READY)"
  else
    result PASS foreign-idle "pid $holder3 killed (status $holder3_status, ${holder3_after}), node stays READY and ran the next job; ${ev#*FOREIGN_PROCESS }"
  fi

  # --------------------------------------------------------------- metrics
  if [[ -n $murl ]]; then
    http_get "$murl" >"$work/end.metrics" 2>>"$e2e"
    {
      echo "==== scheduler /metrics at the end (+$(elapsed)s): $murl"
      cat "$work/end.metrics"
    } >>"$metrics_log"
    check_dcgm "$work/end.metrics"
    if ((${#dcgm_missing[@]} > 0)); then
      result FAIL metrics "scheduler /metrics lacks ${dcgm_missing[*]:0:5}"
    elif ! awk -v u="$mid_util" 'BEGIN {exit !(u > 0)}'; then
      result FAIL metrics "DCGM_FI_DEV_GPU_UTIL for gpu-01 was ${mid_util:-?} while the job ran"
    else
      result PASS metrics "all ${#dcgm_names[@]} DCGM series for gpu-01; GPU_UTIL $mid_util% (${mid_job:-no job label}) mid-job, power $(metric "$work/mid.metrics" DCGM_FI_DEV_POWER_USAGE 'node="gpu-01"') W mid-job, $(metric "$work/end.metrics" DCGM_FI_DEV_POWER_USAGE 'node="gpu-01"') W at the end"
    fi
  else
    result FAIL metrics "gpusched dev printed no metrics address"
  fi
  cli 10 status
  cli 10 nodes gpu-01
fi

# ----------------------------------------------------------------- shutdown
if [[ -n $dev_pid ]]; then
  note "stop gpusched dev (SIGINT)"
  t0=$(elapsed)
  stop "$dev_pid" INT 15
  dev_stop=$?
  wait "$dev_pid" 2>/dev/null
  dev_exit=$?
  dev_pid=""
fi
sleep 1
leftover=$(gpu_apps)
{
  echo "== nvidia-smi (after)"
  timeout 20 nvidia-smi
  echo "== compute apps left: ${leftover:-none}"
  echo "== kernel messages from the driver (NVRM, Xid)"
  timeout 5 dmesg 2>&1 | grep -E 'NVRM|Xid' | tail -30
} >>"$smi_log" 2>&1
if [[ -n ${dev_stop:-} && $dev_stop -ne 0 ]]; then
  result FAIL shutdown "gpusched dev ignored SIGINT for 15s (killed)"
elif [[ -n $leftover ]]; then
  result FAIL shutdown "GPU processes left: $(echo "$leftover" | paste -sd';')"
elif [[ -n ${dev_exit:-} ]]; then
  result PASS shutdown "gpusched dev exited $dev_exit after SIGINT in $(($(elapsed) - t0))s; no GPU process left"
else
  result PASS shutdown "no GPU process left"
fi
exit 0
