#!/usr/bin/env bash
# Runs the whole pipeline on this machine: a throwaway redis-server, a
# gpusched dev cluster and the queue worker, each on a free port. It pushes
# a few jobs (and two bad messages) onto the stream, SIGKILLs the worker
# half-way and restarts it, waits until every message is settled, prints
# the results and stops everything.
#
#   examples/queue-worker/run.sh
#
# Needs Go, gcc, redis-server and redis-cli (apt-get install redis-server).
# REDIS_SERVER / REDIS_CLI override where those two are found.
set -euo pipefail

cd "$(dirname "$0")/../.."
REDIS_SERVER=${REDIS_SERVER:-redis-server}
REDIS_CLI=${REDIS_CLI:-redis-cli}
STREAM=gpusched:jobs
TIMEOUT=${TIMEOUT:-180}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/queue-worker-demo.XXXXXX")
declare -A pids=()

cleanup() {
	local name
	for name in worker gpusched redis; do
		if [[ -n ${pids[$name]:-} ]] && kill -0 "${pids[$name]}" 2>/dev/null; then
			kill -TERM "${pids[$name]}" 2>/dev/null || true
			wait "${pids[$name]}" 2>/dev/null || true
		fi
	done
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n==> %s\n' "$*"; }
fail() {
	echo "run.sh: $*" >&2
	for f in worker redis gpusched; do
		[[ -s $tmp/$f.log ]] && { echo "--- $f.log (last 40 lines)" >&2; tail -n 40 "$tmp/$f.log" >&2; }
	done
	exit 1
}

# free_port prints a port on 127.0.0.1 that nothing listens on: a connect
# through bash's /dev/tcp that fails means the port is free.
free_port() {
	local p
	for _ in $(seq 100); do
		p=$((20000 + RANDOM % 40000))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return 0
		fi
	done
	fail "no free port found"
}

# wait_until SECONDS WHAT CMD...: poll CMD until it succeeds.
wait_until() {
	local secs=$1 what=$2 deadline
	shift 2
	deadline=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || fail "timed out after ${secs}s waiting for $what"
		for name in "${!pids[@]}"; do
			kill -0 "${pids[$name]}" 2>/dev/null || fail "$name exited while waiting for $what"
		done
		sleep 0.2
	done
}

command -v "$REDIS_SERVER" >/dev/null || fail "$REDIS_SERVER not found (apt-get install redis-server)"
command -v "$REDIS_CLI" >/dev/null || fail "$REDIS_CLI not found (apt-get install redis-tools)"

say "building gpusched and queue-worker"
CGO_CFLAGS=${CGO_CFLAGS:--Wno-deprecated-declarations} go build -o "$tmp/gpusched" ./cmd/gpusched
go build -o "$tmp/queue-worker" ./examples/queue-worker

rport=$(free_port)
gport=$(free_port)
while [[ $gport == "$rport" ]]; do gport=$(free_port); done
rcli() { "$REDIS_CLI" -h 127.0.0.1 -p "$rport" "$@"; }
export GPUSCHED_SERVER=127.0.0.1:$gport

say "redis-server on 127.0.0.1:$rport"
"$REDIS_SERVER" --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" >"$tmp/redis.log" 2>&1 &
pids[redis]=$!
wait_until 30 "redis-server" bash -c "[[ \$($REDIS_CLI -h 127.0.0.1 -p $rport ping) == PONG ]]"

say "gpusched dev cluster on $GPUSCHED_SERVER (4 simulated H100 nodes)"
"$tmp/gpusched" dev --nodes 4 --listen "$GPUSCHED_SERVER" --data-dir "$tmp/dev" >"$tmp/gpusched.log" 2>&1 &
pids[gpusched]=$!
wait_until 60 "the dev cluster" "$tmp/gpusched" nodes

start_worker() {
	"$tmp/queue-worker" --redis "127.0.0.1:$rport" --stream "$STREAM" --consumer demo-1 --job-set demo \
		>>"$tmp/worker.log" 2>&1 &
	pids[worker]=$!
}

say "queue worker (consumer demo-1, job set demo)"
start_worker

push() { rcli XADD "$STREAM" '*' "$@" >/dev/null; }
say "pushing 4 jobs and 2 bad messages"
push command '["sh","-c","echo hello from $GPUSCHED_NODES; sleep 1"]' name hello
push command '["sh","-c","echo rank $GPUSCHED_NODE_RANK of $GPUSCHED_NUM_NODES; sleep 2"]' nodes 2 gpu_model H100 name two-nodes
push command '["sh","-c","exit 3"]' name fails
push command 'sleep 1' name not-json
push command '["true"]' gpu_model Z9000 name unknown-model
push command '["sleep","3"]' name slow
good=4

say "SIGKILL the worker while jobs run, push 2 more, restart it"
sleep 1
kill -KILL "${pids[worker]}"
wait "${pids[worker]}" 2>/dev/null || true
echo "--- worker killed" >>"$tmp/worker.log"
push command '["sh","-c","echo after the crash"]' name after-1
push command '["sh","-c","echo after the crash; sleep 1"]' name after-2
good=6
start_worker

say "waiting until all $good jobs ended and their messages are acked"
settled() {
	[[ $(rcli XLEN "$STREAM:results") == "$good" && $(rcli XLEN "$STREAM:dead") == 2 ]] &&
		[[ $(rcli XPENDING "$STREAM" gpusched-bridge | head -n1) == 0 ]]
}
wait_until "$TIMEOUT" "every message to be settled" settled

say "results ($STREAM:results)"
rcli --no-raw XRANGE "$STREAM:results" - +
say "dead letters ($STREAM:dead)"
rcli --no-raw XRANGE "$STREAM:dead" - +
say "pending messages: $(rcli XPENDING "$STREAM" gpusched-bridge | head -n1)"
say "gpusched jobs"
"$tmp/gpusched" jobs
say "worker log"
cat "$tmp/worker.log"

say "stopping the worker (SIGTERM), the cluster and redis"
kill -TERM "${pids[worker]}"
wait "${pids[worker]}" || fail "worker exited with $? after SIGTERM"
unset 'pids[worker]'
echo "done"
