package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// startDev runs `gpusched dev` on dataDir and returns its endpoint once all
// nodes are connected and READY.
func startDev(t *testing.T, dataDir string, nodes int) (*proc, string) {
	t.Helper()
	endpointFile := filepath.Join(dataDir, "endpoint")
	_ = os.Remove(endpointFile)
	p := start(t, "gpusched dev", "dev", "--nodes", itoa(nodes), "--data-dir", dataDir, "--kill-grace", "2s")
	var endpoint string
	eventually(t, "dev cluster endpoint", func() (bool, string) {
		b, err := os.ReadFile(endpointFile)
		endpoint = strings.TrimSpace(string(b))
		return err == nil && endpoint != "", p.out.String()
	})
	waitNodesReady(t, endpoint, nodes)
	return p, endpoint
}

func waitNodesReady(t *testing.T, endpoint string, n int) {
	t.Helper()
	eventually(t, itoa(n)+" READY connected nodes", func() (bool, string) {
		r := cli(t, endpoint, "nodes")
		return r.code == 0 && strings.Count(r.stdout, " READY ") == n && strings.Count(r.stdout, " connected ") == n, r.stdout + r.stderr
	})
}

func itoa(i int) string { return strconv.Itoa(i) }

func getJob(t *testing.T, endpoint, id string) *pb.Job {
	t.Helper()
	out := mustCLI(t, endpoint, "jobs", id, "-o", "json")
	var j pb.Job
	if err := protojson.Unmarshal([]byte(out), &j); err != nil {
		t.Fatalf("jobs %s -o json is not a Job: %v\n%s", id, err, out)
	}
	return &j
}

func submit(t *testing.T, endpoint string, args ...string) string {
	t.Helper()
	out := mustCLI(t, endpoint, append([]string{"submit"}, args...)...)
	id := strings.TrimSpace(out)
	if !regexp.MustCompile(`^[0-9]+$`).MatchString(id) {
		t.Fatalf("submit printed %q on stdout; want the job ID alone", out)
	}
	return id
}

// TestDevClusterTour walks the README's tour against a real `gpusched dev`
// process, then restarts it on the same data dir and checks that nothing
// was lost.
func TestDevClusterTour(t *testing.T) {
	needBinary(t)
	dataDir := t.TempDir()
	dev, ep := startDev(t, dataDir, 4)

	var gangID, failID, cancelID, timeoutID, bigID string
	t.Run("a two-node job runs once per node with rank and GPUs set", func(t *testing.T) {
		gangID = submit(t, ep, "--nodes", "2", "--gpu-model", "H100", "--",
			"sh", "-c", "echo rank=$GPUSCHED_NODE_RANK of $GPUSCHED_NUM_NODES gpus=$CUDA_VISIBLE_DEVICES master=$GPUSCHED_MASTER_ADDR")
		r := cli(t, ep, "wait", gangID)
		if r.code != 0 {
			t.Fatalf("wait: exit %d, stderr %s", r.code, r.stderr)
		}
		logs := mustCLI(t, ep, "logs", gangID)
		for _, want := range []string{
			"gpu-01| rank=0 of 2 gpus=0,1,2,3,4,5,6,7 master=127.0.0.1",
			"gpu-02| rank=1 of 2 gpus=0,1,2,3,4,5,6,7 master=127.0.0.1",
		} {
			if !strings.Contains(logs, want) {
				t.Errorf("logs lack %q:\n%s", want, logs)
			}
		}
		j := getJob(t, ep, gangID)
		if j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED || len(j.GetNodes()) != 2 || j.GetLeaseId() != gangID+".1" {
			t.Errorf("job = %v", j)
		}
		if y := mustCLI(t, ep, "jobs", gangID, "-o", "yaml"); !strings.Contains(y, "state: JOB_STATE_SUCCEEDED") {
			t.Errorf("yaml lacks the state by enum name:\n%s", y)
		}
		waitNodesReady(t, ep, 4) // CLEANING -> READY after the lease
	})

	t.Run("a queue created paused holds its jobs until it is resumed", func(t *testing.T) {
		mustCLI(t, ep, "queues", "create", "staged", "--paused", "--priority", "5")
		id := submit(t, ep, "--queue", "staged", "--", "true")
		eventually(t, "the job to wait in its paused queue", func() (bool, string) {
			j := getJob(t, ep, id)
			return j.GetState() == pb.JobState_JOB_STATE_PENDING && j.GetReason() == "queue staged paused", j.String()
		})
		mustCLI(t, ep, "queues", "resume", "staged")
		if r := cli(t, ep, "wait", id); r.code != 0 {
			t.Fatalf("wait after resume: exit %d, stderr %s", r.code, r.stderr)
		}
		waitNodesReady(t, ep, 4)
	})

	t.Run("a failing rank fails the job with its node and exit code", func(t *testing.T) {
		failID = submit(t, ep, "--", "sh", "-c", "exit 3")
		if r := cli(t, ep, "wait", failID); r.code != 3 {
			t.Fatalf("wait exit = %d, want 3 (FAILED); stderr %s", r.code, r.stderr)
		}
		if j := getJob(t, ep, failID); !strings.Contains(j.GetReason(), "exited with code 3") {
			t.Errorf("reason = %q", j.GetReason())
		}
	})

	t.Run("cancel stops a running job", func(t *testing.T) {
		cancelID = submit(t, ep, "--", "sh", "-c", "sleep 300 # "+marker)
		eventually(t, "job running", func() (bool, string) {
			j := getJob(t, ep, cancelID)
			return j.GetState() == pb.JobState_JOB_STATE_RUNNING, j.String()
		})
		mustCLI(t, ep, "cancel", cancelID)
		if r := cli(t, ep, "wait", cancelID); r.code != 4 {
			t.Fatalf("wait exit = %d, want 4 (CANCELLED)", r.code)
		}
		assertNoOrphans(t, "cancel")
	})

	t.Run("a job past its time limit is TIMED_OUT", func(t *testing.T) {
		timeoutID = submit(t, ep, "--time-limit", "1s", "--", "sh", "-c", "sleep 300 # "+marker)
		if r := cli(t, ep, "wait", timeoutID); r.code != 5 {
			t.Fatalf("wait exit = %d, want 5 (TIMED_OUT)", r.code)
		}
		assertNoOrphans(t, "time limit")
	})

	t.Run("bad input is rejected with the field named", func(t *testing.T) {
		for _, c := range []struct {
			args  []string
			field string
		}{
			{[]string{"--nodes", "0", "--", "true"}, "spec.nodes"},
			{[]string{"--nodes", "-1", "--", "true"}, "spec.nodes"},
			{[]string{"--gpu-model", "H1000", "--", "true"}, "spec.gpu_model"},
			{[]string{"--time-limit", "-5m", "--", "true"}, "spec.time_limit"},
			{[]string{"--gpus-per-node", "-2", "--", "true"}, "spec.gpus_per_node"},
			{[]string{"--nodes", "1"}, "spec.command"},
		} {
			r := cli(t, ep, append([]string{"submit"}, c.args...)...)
			if r.code != 2 || !strings.Contains(r.stderr, c.field) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 || r.stdout != "" {
				t.Errorf("submit %v: exit %d, stdout %q, stderr %q; want exit 2 and one line naming %s", c.args, r.code, r.stdout, r.stderr, c.field)
			}
		}
		if r := cli(t, ep, "jobs", "424242"); r.code != 1 || !strings.Contains(r.stderr, "not found") {
			t.Errorf("jobs of an unknown ID: exit %d, stderr %q", r.code, r.stderr)
		}
	})

	t.Run("a job no node can satisfy waits and says why", func(t *testing.T) {
		bigID = submit(t, ep, "--nodes", "6", "--gpu-model", "H100", "--", "true")
		eventually(t, "why-pending reason", func() (bool, string) {
			out := mustCLI(t, ep, "jobs", bigID)
			return strings.Contains(out, "needs 6 H100 nodes; cluster has 4"), out
		})
		table := mustCLI(t, ep, "jobs")
		if !strings.HasPrefix(table, "ID ") || !strings.Contains(table, bigID) {
			t.Errorf("jobs table:\n%s", table)
		}
	})

	before := map[string]pb.JobState{}
	for _, id := range []string{gangID, failID, cancelID, timeoutID, bigID} {
		before[id] = getJob(t, ep, id).GetState()
	}
	dev.stop()

	t.Run("a restart on the same data dir keeps every job and node", func(t *testing.T) {
		_, ep := startDev(t, dataDir, 4)
		for id, st := range before {
			if got := getJob(t, ep, id).GetState(); got != st {
				t.Errorf("job %s is %s after restart, was %s", id, got, st)
			}
		}
		next := submit(t, ep, "--", "true")
		last, _ := strconv.Atoi(bigID)
		if next != strconv.Itoa(last+1) {
			t.Errorf("next job ID after restart = %s, want %d (IDs continue, never reused)", next, last+1)
		}
		if r := cli(t, ep, "wait", next); r.code != 0 {
			t.Errorf("job after restart: wait exit %d", r.code)
		}
	})
}
