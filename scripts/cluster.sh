#!/usr/bin/env bash
# cluster.sh runs the production shape of gpusched locally, on loopback:
# 3 etcd members, 3 scheduler replicas and N agents on simulated DGX nodes,
# each a separate process of bin/gpusched. For development and chaos tests.
#
#   scripts/cluster.sh up [--agents N] [--session-ttl 2s] ...   start; prints the export line
#   scripts/cluster.sh status                                    processes, then 'gpusched status'
#   scripts/cluster.sh down                                      stop every process
#
# Everything lives in --dir (default ${GPUSCHED_CLUSTER_DIR:-/tmp/gpusched-cluster}):
# etcd/ and agents/ data, logs/<process>.log and cluster.json. `up` starts a
# fresh cluster there. Kill, pause or restart single processes by the PIDs
# that `status` shows (each runs in its own process group).
set -euo pipefail

usage() {
	cat >&2 <<'EOF'
usage: scripts/cluster.sh up|down|status [flags]

  up      build bin/gpusched and start a cluster; prints the GPUSCHED_SERVER export line
            flags: --agents N (4), --schedulers N (3), --etcd N (3), --gpu-backend mock-dgxh100,
                   --session-ttl D, --node-lost-after D, --kill-grace D, --etcd-no-fsync
  status  show each process (running/stopped), then 'gpusched status'
  down    stop every process of the cluster

  all:    --dir DIR (default $GPUSCHED_CLUSTER_DIR or /tmp/gpusched-cluster)

example:
  scripts/cluster.sh up --agents 8 && export GPUSCHED_SERVER=...   # as printed
  bin/gpusched submit --nodes 2 -- hostname
  scripts/cluster.sh down
EOF
	exit "${1:-2}"
}

[[ $# -ge 1 ]] || usage
cmd=$1
shift
case "$cmd" in
up | down | status) ;;
-h | --help | help) usage 0 ;;
*)
	echo "cluster.sh: unknown command '$cmd'" >&2
	usage
	;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${GPUSCHED_CLUSTER_DIR:-/tmp/gpusched-cluster}

# Only `up` starts processes from the binary; building it for `down` could
# fail while the cluster's processes still run it.
if [[ $cmd == up ]]; then
	make --no-print-directory build >&2
	exec go run ./scripts/localcluster up --binary bin/gpusched --dir "$dir" "$@"
fi
# A --dir given by the caller comes later and wins.
exec go run ./scripts/localcluster "$cmd" --dir "$dir" "$@"
