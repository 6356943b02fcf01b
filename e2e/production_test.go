package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpusched/gpusched/internal/embedetcd"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// TestSchedulerAndAgentsAsSeparateProcesses runs the production shape: an
// etcd server, `gpusched scheduler` and two `gpusched agent` processes that
// reach the scheduler only over gRPC, each agent keeping its state and logs
// under its own data dir.
func TestSchedulerAndAgentsAsSeparateProcesses(t *testing.T) {
	needBinary(t)
	etcd, err := embedetcd.Start(embedetcd.Config{Dir: t.TempDir(), NoFsync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(etcd.Close) // registered first, so it runs after every process stopped

	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	start(t, "gpusched scheduler", "scheduler", "--etcd-endpoints", etcd.Endpoint, "--listen", addr, "--session-ttl", "2s")
	agentDirs := map[string]string{}
	for _, node := range []string{"a100-1", "a100-2"} {
		agentDirs[node] = t.TempDir()
		start(t, "gpusched agent "+node, "agent", "--scheduler", addr, "--node-id", node,
			"--gpu-backend", "mock-dgxa100", "--data-dir", agentDirs[node], "--labels", "rack=r1,zone=z1", "--address", "127.0.0.1")
	}
	// A dead endpoint first: the CLI must fail over to the live one.
	server := fmt.Sprintf("127.0.0.1:%d,%s", freePort(t), addr)
	waitNodesReady(t, server, 2)

	node := mustCLI(t, server, "nodes", "a100-1")
	for _, want := range []string{"A100", "rack=r1,zone=z1", "550.54.15", "READY"} {
		if !strings.Contains(node, want) {
			t.Errorf("nodes a100-1 lacks %q:\n%s", want, node)
		}
	}

	id := submit(t, server, "--nodes", "2", "--gpu-model", "a100", "--",
		"sh", "-c", "echo node=$GPUSCHED_NODE_ID rank=$GPUSCHED_NODE_RANK nodes=$GPUSCHED_NODES")
	if r := cli(t, server, "wait", id); r.code != 0 {
		t.Fatalf("wait: exit %d: %s", r.code, r.stderr)
	}
	logs := mustCLI(t, server, "logs", id)
	for _, want := range []string{
		"a100-1| node=a100-1 rank=0 nodes=a100-1,a100-2",
		"a100-2| node=a100-2 rank=1 nodes=a100-1,a100-2",
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q:\n%s", want, logs)
		}
	}
	if j := getJob(t, server, id); j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		t.Errorf("job state = %s", j.GetState())
	}
	// A retried submit with the same idempotency key prints the same job.
	a := submit(t, server, "--idempotency-key", "order-42", "--", "true")
	if b := submit(t, server, "--idempotency-key", "order-42", "--", "true"); a != b {
		t.Errorf("two submits with one idempotency key gave jobs %s and %s", a, b)
	}
	for node, dir := range agentDirs {
		if _, err := os.Stat(filepath.Join(dir, "leases", id+".1", "output.log")); err != nil {
			t.Errorf("agent %s keeps no log for lease %s.1: %v", node, id, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "state.json")); err != nil {
			t.Errorf("agent %s keeps no state: %v", node, err)
		}
	}
}
