package e2e

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// startHealthDev runs a dev cluster with short health and telemetry
// intervals, so the tests below wait for conditions, not for timers.
func startHealthDev(t *testing.T, nodes int) string {
	t.Helper()
	needBinary(t)
	dataDir := t.TempDir()
	_ = os.Remove(dataDir + "/endpoint")
	p := start(t, "gpusched dev", "dev", "--nodes", strconv.Itoa(nodes), "--data-dir", dataDir, "--kill-grace", "2s",
		"--telemetry-interval", "200ms", "--health-recheck-interval", "300ms", "--foreign-kill-grace", "1s")
	var ep string
	eventually(t, "dev cluster endpoint", func() (bool, string) {
		b, err := os.ReadFile(dataDir + "/endpoint")
		ep = strings.TrimSpace(string(b))
		return err == nil && ep != "", p.out.String()
	})
	waitNodesReady(t, ep, nodes)
	return ep
}

func node(t *testing.T, ep, name string) *pb.Node {
	t.Helper()
	var n pb.Node
	if err := protojson.Unmarshal([]byte(mustCLI(t, ep, "nodes", name, "-o", "json")), &n); err != nil {
		t.Fatal(err)
	}
	return &n
}

func hasEvent(evs []*pb.NodeEvent, kind pb.NodeEventKind, action string) bool {
	for _, e := range evs {
		if e.GetKind() == kind && (action == "" || e.GetAction() == action) {
			return true
		}
	}
	return false
}

func TestAForeignGPUProcessOnAnIdleNodeIsKilled(t *testing.T) {
	ep := startHealthDev(t, 1)
	intruder := exec.Command("sh", "-c", "sleep 300; : "+marker)
	if err := intruder.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = intruder.Wait(); close(exited) }()
	t.Cleanup(func() { _ = intruder.Process.Kill(); <-exited })
	mustCLI(t, ep, "mock", "inject", "--node", "gpu-01", "--gpu", "0", "--gpu-process", strconv.Itoa(intruder.Process.Pid))
	eventually(t, "the foreign process to be killed", func() (bool, string) {
		select {
		case <-exited:
			return true, ""
		default:
			return false, "still running"
		}
	})
	eventually(t, "a FOREIGN_PROCESS event on the node", func() (bool, string) {
		n := node(t, ep, "gpu-01")
		return hasEvent(n.GetEvents(), pb.NodeEventKind_NODE_EVENT_KIND_FOREIGN_PROCESS, "killed"), n.String()
	})
	if out := mustCLI(t, ep, "nodes", "gpu-01"); !strings.Contains(out, "FOREIGN_PROCESS") {
		t.Errorf("nodes gpu-01 does not show the event:\n%s", out)
	}
}

func TestAFatalXIDDrainsTheNodeRequeuesItsJobAndRecoveryUndrains(t *testing.T) {
	ep := startHealthDev(t, 2)
	script := `if [ "$GPUSCHED_LEASE_ID" = "$GPUSCHED_JOB_ID.1" ]; then sleep 300; fi # ` + marker
	id := submit(t, ep, "--", "sh", "-c", script)
	var victim string
	eventually(t, "the job to run", func() (bool, string) {
		j := getJob(t, ep, id)
		if j.GetState() == pb.JobState_JOB_STATE_RUNNING {
			victim = j.GetNodes()[0]
		}
		return victim != "", j.String()
	})
	// An application XID is recorded but does not drain.
	mustCLI(t, ep, "mock", "inject", "--node", victim, "--gpu", "1", "--xid", "13")
	eventually(t, "the XID 13 event", func() (bool, string) {
		n := node(t, ep, victim)
		return hasEvent(n.GetEvents(), pb.NodeEventKind_NODE_EVENT_KIND_XID, ""), n.String()
	})
	if n := node(t, ep, victim); n.GetState() != pb.NodeState_NODE_STATE_LEASED {
		t.Fatalf("an application XID changed the node to %s", n.GetState())
	}
	// A fatal one drains it, and the job moves to the other node.
	mustCLI(t, ep, "mock", "inject", "--node", victim, "--gpu", "2", "--xid", "79")
	eventually(t, "the node to be UNHEALTHY", func() (bool, string) {
		n := node(t, ep, victim)
		return n.GetState() == pb.NodeState_NODE_STATE_UNHEALTHY, n.String()
	})
	if r := cli(t, ep, "wait", id); r.code != 0 {
		t.Fatalf("the requeued job did not succeed: exit %d %s", r.code, r.stderr)
	}
	j := getJob(t, ep, id)
	if j.GetLeaseId() != id+".2" || j.GetNodes()[0] == victim {
		t.Errorf("job finished under %s on %v; want lease %s.2 on the other node", j.GetLeaseId(), j.GetNodes(), id)
	}
	if !hasEvent(j.GetEvents(), pb.NodeEventKind_NODE_EVENT_KIND_XID, "") {
		t.Errorf("the job does not show the XID that hit its lease: %v", j.GetEvents())
	}
	// Clearing the fault lets the re-check return the node to service.
	mustCLI(t, ep, "mock", "inject", "--node", victim, "--clear")
	eventually(t, "the node to recover", func() (bool, string) {
		n := node(t, ep, victim)
		return n.GetState() == pb.NodeState_NODE_STATE_READY && hasEvent(n.GetEvents(), pb.NodeEventKind_NODE_EVENT_KIND_RECOVERED, ""), n.String()
	})
	assertNoOrphans(t, "the drained lease")
}

func TestTelemetryStreamsFromTheCLI(t *testing.T) {
	ep := startHealthDev(t, 1)
	id := submit(t, ep, "--", "sh", "-c", "sleep 3 # "+marker)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, "telemetry", "--job", id, "-o", "json")
	cmd.Env = append(os.Environ(), "GPUSCHED_SERVER="+ep)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Signal(syscall.SIGINT); _ = cmd.Wait() }()
	sc := bufio.NewScanner(out)
	seen := map[int32]bool{}
	busy := false
	for len(seen) < 8 || !busy {
		if !sc.Scan() {
			t.Fatalf("telemetry stream ended after %d GPUs: %v", len(seen), sc.Err())
		}
		var r pb.WatchTelemetryResponse
		if err := protojson.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("not a JSON line: %q: %v", sc.Text(), err)
		}
		if r.GetJobId() != id || r.GetNode() != "gpu-01" || r.GetSample().GetUuid() == "" {
			t.Fatalf("sample %v; want job %s on gpu-01 with a UUID", &r, id)
		}
		seen[r.GetSample().GetGpu()] = true
		busy = busy || r.GetSample().GetGpuUtil() > 50
	}
}
