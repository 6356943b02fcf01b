package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpusched/gpusched/client"
	"github.com/gpusched/gpusched/internal/invariants"
	"github.com/gpusched/gpusched/internal/localcluster"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// The chaos tests run the production shape as real processes: 3 etcd
// members, 3 scheduler replicas and agents, then break something. Verdicts
// never depend on timing: every wait polls a condition under waitTimeout.

// chaosCluster is a running local cluster with an SDK client on it.
type chaosCluster struct {
	*localcluster.Cluster
	client *client.Client
}

func startChaos(t *testing.T, agents int) *chaosCluster {
	t.Helper()
	needBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	c, err := localcluster.Start(ctx, localcluster.Config{
		Binary: binary, Dir: t.TempDir(), Agents: agents,
		SessionTTL: 2 * time.Second, NodeLostAfter: 3 * time.Second, KillGrace: 2 * time.Second,
		EtcdNoFsync: true,
	})
	if err != nil {
		t.Fatalf("start cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range c.Processes() {
				if b, err := os.ReadFile(p.LogPath()); err == nil {
					t.Logf("--- %s (last 3000 bytes) ---\n%s", p.Name(), tail(b, 3000))
				}
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("closing the cluster: %v", err)
		}
		assertNoOrphans(t, "the chaos cluster")
	})
	cli, err := client.New(ctx, client.Config{Endpoints: c.SchedulerAddrs(), CallTimeout: 10 * time.Second, AttemptTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	cc := &chaosCluster{Cluster: c, client: cli}
	cc.waitReadyNodes(t, agents)
	return cc
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// waitReadyNodes waits until n nodes are READY with their agents connected.
func (c *chaosCluster) waitReadyNodes(t *testing.T, n int) {
	t.Helper()
	eventually(t, fmt.Sprintf("%d READY connected nodes", n), func() (bool, string) {
		nodes, err := c.client.Nodes(context.Background())
		if err != nil {
			return false, err.Error()
		}
		ready := 0
		for _, nd := range nodes {
			if nd.GetState() == pb.NodeState_NODE_STATE_READY && nd.GetConnected() {
				ready++
			}
		}
		return ready == n, fmt.Sprint(nodes)
	})
}

// submit submits spec, retrying while the cluster is between leaders. It
// returns the accepted job.
func (c *chaosCluster) submit(t *testing.T, spec *pb.JobSpec) *pb.Job {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		j, err := c.client.Submit(context.Background(), spec)
		if err == nil {
			return j
		}
		if !errors.Is(err, client.ErrUnavailable) || time.Now().After(deadline) {
			t.Fatalf("submit: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitJob waits until job id satisfies cond, riding out failovers.
func (c *chaosCluster) waitJob(t *testing.T, id, what string, cond func(*pb.Job) bool) *pb.Job {
	t.Helper()
	var j *pb.Job
	eventually(t, "job "+id+" "+what, func() (bool, string) {
		var err error
		j, err = c.client.Get(context.Background(), id)
		if err != nil {
			return false, err.Error()
		}
		return cond(j), j.String()
	})
	return j
}

func (c *chaosCluster) waitSucceeded(t *testing.T, id string) *pb.Job {
	t.Helper()
	return c.waitJob(t, id, "to succeed", func(j *pb.Job) bool {
		if client.Terminal(j.GetState()) && j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
			t.Fatalf("job %s ended %s: %s", id, j.GetState(), j.GetReason())
		}
		return j.GetState() == pb.JobState_JOB_STATE_SUCCEEDED
	})
}

// leader returns the leading replica's process and token, waiting for a
// leader other than not (pass "" for any).
func (c *chaosCluster) leader(t *testing.T, not string) (*localcluster.Process, int64) {
	t.Helper()
	var name string
	var token int64
	eventually(t, "a leader other than "+orDash(not), func() (bool, string) {
		st, err := c.client.Status(context.Background())
		if err != nil {
			return false, err.Error()
		}
		name, token = st.GetLeader(), st.GetFencingToken()
		return name != "" && name != not, st.String()
	})
	return c.Process(name), token
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// check runs the invariant checker over the whole etcd history.
func (c *chaosCluster) check(t *testing.T, accepted []string) *invariants.Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	cli, err := c.Etcd(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	r, err := invariants.Check(ctx, cli, "/gpusched", accepted)
	if err != nil {
		t.Fatalf("checker: %v", err)
	}
	if !r.OK() {
		t.Fatalf("invariants violated: %s", r)
	}
	t.Logf("checker: %s", r)
	return r
}

func TestChaosLeaderKilledDuringASubmitBurst(t *testing.T) {
	c := startChaos(t, 4)
	runs := filepath.Join(t.TempDir(), "runs")
	spec := &pb.JobSpec{Nodes: 1, Command: []string{"sh", "-c", `echo "$GPUSCHED_LEASE_ID $GPUSCHED_NODE_ID" >> ` + runs}}
	old, _ := c.leader(t, "")

	const total, workers = 200, 8
	var (
		mu       sync.Mutex
		accepted []string
		wg       sync.WaitGroup
	)
	next := make(chan int, total)
	for i := range total {
		next <- i
	}
	close(next)
	killed := make(chan struct{})
	var once sync.Once
	for range workers {
		wg.Go(func() {
			for range next {
				j := c.submit(t, spec)
				mu.Lock()
				accepted = append(accepted, j.GetId())
				n := len(accepted)
				mu.Unlock()
				if n == total/4 {
					once.Do(func() {
						if err := old.Kill(); err != nil {
							t.Errorf("kill leader: %v", err)
						}
						close(killed)
					})
				}
			}
		})
	}
	wg.Wait()
	<-killed
	if len(accepted) != total {
		t.Fatalf("%d submissions accepted; want %d", len(accepted), total)
	}
	newLeader, _ := c.leader(t, old.Name())
	t.Logf("leader %s killed after %d submissions; %s took over", old.Name(), total/4, newLeader.Name())
	for _, id := range accepted {
		c.waitSucceeded(t, id)
	}

	// None ran twice under one lease: each (lease, node) wrote one line.
	b, err := os.ReadFile(runs)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		seen[line]++
	}
	for run, n := range seen {
		if n > 1 {
			t.Errorf("lease/node %q ran %d times", run, n)
		}
	}
	c.check(t, accepted)
}

func TestChaosFrozenLeaderStepsDown(t *testing.T) {
	c := startChaos(t, 2)
	old, oldToken := c.leader(t, "")
	first := c.submit(t, &pb.JobSpec{Nodes: 1, Command: []string{"true"}})
	c.waitSucceeded(t, first.GetId())

	if err := old.Pause(); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			_ = old.Resume()
		}
	}()
	// Its session expires; another replica leads and agents follow it.
	newLeader, newToken := c.leader(t, old.Name())
	if newToken <= oldToken {
		t.Fatalf("new token %d is not above the frozen leader's %d", newToken, oldToken)
	}
	c.waitReadyNodes(t, 2)
	during := c.submit(t, &pb.JobSpec{Nodes: 2, Command: []string{"true"}})
	c.waitSucceeded(t, during.GetId())

	if err := old.Resume(); err != nil {
		t.Fatal(err)
	}
	resumed = true
	// The old leader notices its session is gone and steps down; it stays
	// a follower and serves (forwards) again.
	eventually(t, "the resumed replica to follow", func() (bool, string) {
		st, err := c.client.Status(context.Background())
		if err != nil {
			return false, err.Error()
		}
		follows := false
		for _, r := range st.GetReplicas() {
			if r.GetName() == old.Name() && !r.GetLeader() {
				follows = true
			}
		}
		return st.GetLeader() == newLeader.Name() && follows, st.String()
	})
	after := c.submit(t, &pb.JobSpec{Nodes: 2, Command: []string{"true"}})
	c.waitSucceeded(t, after.GetId())

	// Zero stale writes: tokens never go down in etcd's history.
	r := c.check(t, []string{first.GetId(), during.GetId(), after.GetId()})
	if r.Writers[len(r.Writers)-1] != newToken {
		t.Errorf("last writer token %d; want the new leader's %d", r.Writers[len(r.Writers)-1], newToken)
	}
	// Every agent persisted the new leader's token, so a command carrying
	// the old one is refused (agents ignore lower tokens).
	for i := 1; i <= 2; i++ {
		var st struct {
			MaxFencingToken int64 `json:"max_fencing_token"`
		}
		b, err := os.ReadFile(filepath.Join(c.Dir(), "agents", fmt.Sprintf("node-%d", i), "state.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &st); err != nil {
			t.Fatal(err)
		}
		if st.MaxFencingToken < newToken {
			t.Errorf("agent node-%d remembers token %d; want at least %d", i, st.MaxFencingToken, newToken)
		}
	}
}

func TestChaosSchedulingContinuesWithOneEtcdMemberDown(t *testing.T) {
	c := startChaos(t, 2)
	if err := c.Process("etcd-3").Kill(); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for range 3 {
		j := c.submit(t, &pb.JobSpec{Nodes: 2, Command: []string{"true"}})
		c.waitSucceeded(t, j.GetId())
		ids = append(ids, j.GetId())
	}
	c.check(t, ids)
}

func TestChaosAgentKilledMidJob(t *testing.T) {
	c := startChaos(t, 2)
	// The first lease runs until its node dies; the retry succeeds.
	script := `if [ "$GPUSCHED_LEASE_ID" = "$GPUSCHED_JOB_ID.1" ]; then while :; do sleep 1; done; fi # ` + marker
	j := c.submit(t, &pb.JobSpec{Nodes: 1, Command: []string{"sh", "-c", script}})
	running := c.waitJob(t, j.GetId(), "to run", func(j *pb.Job) bool { return j.GetState() == pb.JobState_JOB_STATE_RUNNING })
	victim := running.GetNodes()[0]
	agent := c.Process("agent-" + strings.TrimPrefix(victim, "node-"))
	if agent == nil {
		t.Fatalf("no agent process for node %s", victim)
	}
	if err := agent.Kill(); err != nil {
		t.Fatal(err)
	}
	done := c.waitSucceeded(t, j.GetId())
	if done.GetLeaseId() != j.GetId()+".2" || done.GetRetries() != 1 || done.GetNodes()[0] == victim {
		t.Errorf("job finished as %s on %v (retries %d); want lease %s.2 on another node",
			done.GetLeaseId(), done.GetNodes(), done.GetRetries(), j.GetId())
	}
	// The agent comes back holding the lease it lost: it is told to drop
	// it and its node returns to service.
	if err := agent.Restart(); err != nil {
		t.Fatal(err)
	}
	c.waitReadyNodes(t, 2)
	assertNoOrphans(t, "the restarted agent")
	c.check(t, []string{j.GetId()})
}

func TestChaosAFailoverAdoptsRunningJobsAndTheCLIRidesItOut(t *testing.T) {
	c := startChaos(t, 3)
	old, _ := c.leader(t, "")
	// A job running across the failover is adopted, not restarted.
	long := c.submit(t, &pb.JobSpec{Nodes: 1, Command: []string{"sh", "-c", "sleep 4 # " + marker}})
	c.waitJob(t, long.GetId(), "to run", func(j *pb.Job) bool { return j.GetState() == pb.JobState_JOB_STATE_RUNNING })
	if err := old.Kill(); err != nil {
		t.Fatal(err)
	}
	// One plain CLI call, made while no replica leads: it must wait for the
	// election rather than fail.
	id := submit(t, c.Servers(), "--nodes", "2", "--", "true")
	if r := cli(t, c.Servers(), "wait", id); r.code != 0 {
		t.Fatalf("wait: exit %d: %s", r.code, r.stderr)
	}
	if st := mustCLI(t, c.Servers(), "status"); strings.Contains(st, old.Name()) {
		t.Errorf("status still lists the killed replica %s:\n%s", old.Name(), st)
	}
	adopted := c.waitSucceeded(t, long.GetId())
	if adopted.GetAttempts() != 1 || adopted.GetLeaseId() != long.GetId()+".1" {
		t.Errorf("the running job was not adopted: lease %s, attempts %d", adopted.GetLeaseId(), adopted.GetAttempts())
	}
	c.check(t, []string{long.GetId(), id})
}
