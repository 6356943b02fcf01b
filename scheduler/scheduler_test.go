package scheduler_test

import (
	"context"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const killGrace = 3 * time.Second

// cluster starts etcd, a leading replica and n fake agents (node-0 ...).
func cluster(t *testing.T, n int, agent schedtest.AgentConfig, eng engine.Config) *schedtest.Cluster {
	t.Helper()
	if eng.KillGrace == 0 {
		eng.KillGrace = killGrace
	}
	return schedtest.StartCluster(t, schedtest.ClusterConfig{
		Scheduler: scheduler.Config{Name: "replica-1", Engine: eng},
		Agents:    n,
		Agent:     agent,
	})
}

// startsOf returns, per node, the StartLease commands for job.
func startsOf(c *schedtest.Cluster, job string) map[string]*pb.StartLease {
	out := map[string]*pb.StartLease{}
	for _, a := range c.Agents {
		for _, s := range a.Starts() {
			if s.GetJobId() == job {
				out[a.NodeID()] = s
			}
		}
	}
	return out
}

// waitStarts waits until job's StartLease reached n agents.
func waitStarts(t *testing.T, c *schedtest.Cluster, job string, n int) map[string]*pb.StartLease {
	t.Helper()
	var got map[string]*pb.StartLease
	schedtest.Eventually(t, fmt.Sprintf("job %s to start on %d nodes", job, n), func() (bool, string) {
		got = startsOf(c, job)
		return len(got) == n, fmt.Sprintf("started on %d nodes: %v", len(got), got)
	})
	return got
}

func waitAllReady(t *testing.T, c *schedtest.Cluster) {
	t.Helper()
	schedtest.WaitNodes(t, c.Replica.Nodes, len(c.Agents), func(n *pb.Node) bool {
		return n.GetState() == pb.NodeState_NODE_STATE_READY && n.GetConnected()
	})
}

func cancelJob(t *testing.T, c *schedtest.Cluster, id, reason string) (*pb.Job, error) {
	t.Helper()
	resp, err := c.Replica.Jobs.CancelJob(schedtest.Context(t), &pb.CancelJobRequest{Id: id, Reason: reason})
	return resp.GetJob(), err
}

func TestAGangJobRunsOnDistinctNodesAndTheNodesAreCleanedAfterwards(t *testing.T) {
	c := cluster(t, 3, schedtest.AgentConfig{OnRelease: schedtest.KeepLeases}, engine.Config{})
	spec := schedtest.Spec(2)
	spec.GpuModel = "h100" // canonicalised on submit
	spec.Env = map[string]string{"EPOCHS": "3"}
	spec.Command = []string{"torchrun", "train.py"}
	j := schedtest.Submit(t, c.Replica.Jobs, spec)
	if j.GetState() != pb.JobState_JOB_STATE_PENDING || j.GetId() != "1" || j.GetSpec().GetGpuModel() != "H100" || j.GetSpec().GetTenant() != "default" {
		t.Fatalf("submitted job = %s spec %v; want PENDING job 1 with canonical model and default tenant", schedtest.DescribeJob(j), j.GetSpec())
	}

	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	starts := waitStarts(t, c, j.GetId(), 2)
	nodes := running.GetNodes()
	if len(nodes) != 2 || nodes[0] == nodes[1] {
		t.Fatalf("job nodes = %v; want two distinct nodes", nodes)
	}
	for rank, node := range nodes {
		s := starts[node]
		if s == nil {
			t.Fatalf("node %s of the job got no StartLease; starts: %v", node, starts)
		}
		if int(s.GetRank()) != rank || !slices.Equal(s.GetNodes(), nodes) || s.GetMasterAddr() != nodes[0]+":29500" ||
			s.GetLeaseId() != running.GetLeaseId() || !slices.Equal(s.GetCommand(), spec.Command) || s.GetEnv()["EPOCHS"] != "3" {
			t.Errorf("StartLease on %s = %v; want rank %d of %v, master %s:29500, lease %s", node, s, rank, nodes, nodes[0], running.GetLeaseId())
		}
		if tok, _ := c.Agent(node).TokenOf(func(m *pb.ConnectResponse) bool { return m.GetStartLease() != nil }); tok != c.Token {
			t.Errorf("StartLease on %s carried token %d; the leader's is %d", node, tok, c.Token)
		}
		n := schedtest.GetNode(t, c.Replica.Nodes, node)
		if n.GetState() != pb.NodeState_NODE_STATE_LEASED || n.GetLeaseId() != running.GetLeaseId() || n.GetJobId() != j.GetId() {
			t.Errorf("node %s = %s lease %q job %q; want LEASED by the job", node, n.GetState(), n.GetLeaseId(), n.GetJobId())
		}
	}

	for _, node := range nodes {
		c.Agent(node).Exit(running.GetLeaseId(), 0, "")
	}
	done := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)
	if len(done.GetExits()) != 2 || done.GetExits()[0].GetRank() != 0 || done.GetExits()[1].GetRank() != 1 || done.GetEndTime() == nil {
		t.Errorf("succeeded job = %v; want two exits in rank order and an end time", done)
	}
	for _, node := range nodes {
		n := schedtest.WaitNodeState(t, c.Replica.Nodes, node, pb.NodeState_NODE_STATE_CLEANING)
		if n.GetLeaseId() != running.GetLeaseId() {
			t.Errorf("cleaning node %s names lease %q; want %q", node, n.GetLeaseId(), running.GetLeaseId())
		}
		c.Agent(node).WaitRelease(t, running.GetLeaseId())
		c.Agent(node).Release(running.GetLeaseId(), true, "")
	}
	for _, node := range nodes {
		schedtest.WaitNodeState(t, c.Replica.Nodes, node, pb.NodeState_NODE_STATE_READY)
	}
	for _, a := range c.Agents {
		if !slices.Contains(nodes, a.NodeID()) && len(a.Starts()) != 0 {
			t.Errorf("node %s is not in the job but got %v", a.NodeID(), a.Starts())
		}
	}
}

func TestOneRankFailingFailsTheJob(t *testing.T) {
	c := cluster(t, 2, schedtest.AgentConfig{}, engine.Config{})
	cases := []struct {
		name    string
		code    int
		message string
		reason  string // the job's whole reason, with %s for the failing node
	}{
		{"a non-zero exit names the node, rank and code", 3, "", "node %s (rank 1) exited with code 3"},
		{"the runner's message is added", 1, "CUDA out of memory", "node %s (rank 1) exited with code 1: CUDA out of memory"},
		{"a message restating the code is not repeated", 2, "exit status 2", "node %s (rank 1) exited with code 2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			waitAllReady(t, c)
			j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(2))
			running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
			rank0, rank1 := running.GetNodes()[0], running.GetNodes()[1]
			c.Agent(rank1).Exit(running.GetLeaseId(), tc.code, tc.message)

			failed := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_FAILED)
			if want := fmt.Sprintf(tc.reason, rank1); failed.GetReason() != want {
				t.Errorf("reason = %q; want %q", failed.GetReason(), want)
			}
			// The healthy rank is stopped; the failed one cleaned up.
			r := c.Agent(rank0).WaitRelease(t, running.GetLeaseId())
			if r.GetGrace().AsDuration() != killGrace {
				t.Errorf("ReleaseLease grace = %s; want %s", r.GetGrace().AsDuration(), killGrace)
			}
			c.Agent(rank1).WaitRelease(t, running.GetLeaseId())
			// A late exit of the stopped rank changes nothing.
			c.Agent(rank0).Exit(running.GetLeaseId(), 0, "")
			waitAllReady(t, c)
			if got := schedtest.GetJob(t, c.Replica.Jobs, j.GetId()); got.GetState() != pb.JobState_JOB_STATE_FAILED || len(got.GetExits()) != 1 {
				t.Errorf("after the late exit: %s exits %v; want FAILED with one exit", schedtest.DescribeJob(got), got.GetExits())
			}
		})
	}
}

func TestCancel(t *testing.T) {
	c := cluster(t, 2, schedtest.AgentConfig{}, engine.Config{})
	cases := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"a running job is cancelled and every node is told to release it", func(t *testing.T) {
			j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(2))
			running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
			got, err := cancelJob(t, c, j.GetId(), "wrong data set")
			if err != nil {
				t.Fatalf("CancelJob: %v", err)
			}
			if got.GetState() != pb.JobState_JOB_STATE_CANCELLED || got.GetReason() != "cancelled by user: wrong data set" || got.GetEndTime() == nil {
				t.Errorf("CancelJob returned %s; want CANCELLED with the user's reason", schedtest.DescribeJob(got))
			}
			for _, node := range running.GetNodes() {
				r := c.Agent(node).WaitRelease(t, running.GetLeaseId())
				if r.GetGrace().AsDuration() != killGrace || !strings.Contains(r.GetReason(), "wrong data set") {
					t.Errorf("ReleaseLease on %s = %v; want grace %s and the reason", node, r, killGrace)
				}
			}
			waitAllReady(t, c)
			schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_CANCELLED)
		}},
		{"a pending job is cancelled before it ever starts", func(t *testing.T) {
			j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(3)) // the cluster has 2 nodes
			got, err := cancelJob(t, c, j.GetId(), "")
			if err != nil {
				t.Fatalf("CancelJob: %v", err)
			}
			if got.GetState() != pb.JobState_JOB_STATE_CANCELLED || got.GetReason() != "cancelled by user" {
				t.Errorf("CancelJob returned %s; want CANCELLED", schedtest.DescribeJob(got))
			}
			if s := startsOf(c, j.GetId()); len(s) != 0 {
				t.Errorf("a cancelled pending job was started: %v", s)
			}
		}},
		{"an ended job cannot be cancelled", func(t *testing.T) {
			j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
			running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
			c.Agent(running.GetNodes()[0]).Exit(running.GetLeaseId(), 0, "")
			schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)
			_, err := cancelJob(t, c, j.GetId(), "")
			if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "already ended (SUCCEEDED)") {
				t.Errorf("CancelJob of an ended job = %v; want FailedPrecondition saying it ended", err)
			}
			if got := schedtest.GetJob(t, c.Replica.Jobs, j.GetId()); got.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
				t.Errorf("the failed cancel changed the job: %s", schedtest.DescribeJob(got))
			}
			waitAllReady(t, c)
		}},
		{"an unknown job is not found", func(t *testing.T) {
			_, err := cancelJob(t, c, "999", "")
			if status.Code(err) != codes.NotFound {
				t.Errorf("CancelJob(999) = %v; want NotFound", err)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, tc.run)
	}
}

func TestPendingJobsSayWhyTheyWait(t *testing.T) {
	c := cluster(t, 4, schedtest.AgentConfig{}, engine.Config{})
	cases := []struct {
		name   string
		spec   *pb.JobSpec
		reason string
	}{
		{"a job larger than the cluster", schedtest.Spec(6), "needs 6 H100 nodes; cluster has 4"},
		{"a job for a model the cluster lacks", &pb.JobSpec{Nodes: 1, GpuModel: "a100", Command: []string{"x"}}, "needs 1 A100 node; cluster has 0"},
		{"a job wanting more GPUs per node than any node has", &pb.JobSpec{Nodes: 2, GpuModel: "H100", GpusPerNode: 16, Command: []string{"x"}},
			"needs 2 H100 nodes with at least 16 GPUs; cluster has 0"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			j := schedtest.Submit(t, c.Replica.Jobs, tc.spec)
			schedtest.WaitJob(t, c.Replica.Jobs, j.GetId(), "to say why it waits", func(j *pb.Job) bool {
				return j.GetState() == pb.JobState_JOB_STATE_PENDING && j.GetReason() == tc.reason
			})
			if s := startsOf(c, j.GetId()); len(s) != 0 {
				t.Errorf("a job that cannot fit was started: %v", s)
			}
		})
	}
	waitAllReady(t, c) // nothing was leased
}

func TestAGangGetsAllItsNodesOrNoneAndSmallJobsDoNotStarveIt(t *testing.T) {
	c := cluster(t, 4, schedtest.AgentConfig{}, engine.Config{})
	blocker := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	blocking := schedtest.WaitJobState(t, c.Replica.Jobs, blocker.GetId(), pb.JobState_JOB_STATE_RUNNING)

	gang := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(4))
	small := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	waiting := schedtest.WaitJob(t, c.Replica.Jobs, gang.GetId(), "to wait for free nodes", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_PENDING && strings.HasPrefix(j.GetReason(), "waiting for 4 H100 nodes;")
	})
	if s := startsOf(c, gang.GetId()); len(s) != 0 || len(waiting.GetNodes()) != 0 {
		t.Fatalf("the waiting gang got nodes: starts %v, nodes %v", s, waiting.GetNodes())
	}
	// The free nodes are held for the gang, which is next by policy: the
	// small job behind it waits instead of taking one of them.
	schedtest.WaitJob(t, c.Replica.Jobs, small.GetId(), "to wait behind the gang", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_PENDING && j.GetReason() == "behind job "+gang.GetId()+" (needs 4 H100 nodes) in queue default"
	})

	// Once the blocker ends, the gang gets all four nodes at once, then the
	// small job runs.
	c.Agent(blocking.GetNodes()[0]).Exit(blocking.GetLeaseId(), 0, "")
	running := schedtest.WaitJobState(t, c.Replica.Jobs, gang.GetId(), pb.JobState_JOB_STATE_RUNNING)
	nodes := slices.Clone(running.GetNodes())
	sort.Strings(nodes)
	if !slices.Equal(nodes, []string{"node-0", "node-1", "node-2", "node-3"}) {
		t.Errorf("gang nodes = %v; want all four", running.GetNodes())
	}
	waitStarts(t, c, gang.GetId(), 4)
	for _, n := range running.GetNodes() {
		c.Agent(n).Exit(running.GetLeaseId(), 0, "")
	}
	schedtest.WaitJobState(t, c.Replica.Jobs, small.GetId(), pb.JobState_JOB_STATE_RUNNING)
}

func TestJobsRunInSubmissionOrder(t *testing.T) {
	var blockerID sync.Map // the one job that keeps running until told
	c := cluster(t, 1, schedtest.AgentConfig{OnStart: func(a *schedtest.Agent, m *pb.StartLease) {
		a.Started(m.GetLeaseId())
		if _, ok := blockerID.Load(m.GetJobId()); !ok {
			a.Exit(m.GetLeaseId(), 0, "")
		}
	}}, engine.Config{})
	blockerID.Store("1", true)
	blocker := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	blocking := schedtest.WaitJobState(t, c.Replica.Jobs, blocker.GetId(), pb.JobState_JOB_STATE_RUNNING)
	want := []string{blocker.GetId()}
	for range 6 {
		want = append(want, schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1)).GetId())
	}
	c.Agents[0].Exit(blocking.GetLeaseId(), 0, "")
	schedtest.WaitJobState(t, c.Replica.Jobs, want[len(want)-1], pb.JobState_JOB_STATE_SUCCEEDED)
	var got []string
	for _, s := range c.Agents[0].Starts() {
		got = append(got, s.GetJobId())
	}
	if !slices.Equal(got, want) {
		t.Fatalf("jobs started in order %v; want submission order %v", got, want)
	}
}

func TestAJobPastItsTimeLimitTimesOut(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{}, engine.Config{})
	spec := schedtest.Spec(1)
	spec.TimeLimit = durationpb.New(time.Second)
	j := schedtest.Submit(t, c.Replica.Jobs, spec)
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	timedOut := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_TIMED_OUT)
	if timedOut.GetReason() != "exceeded time limit 1s" {
		t.Errorf("reason = %q", timedOut.GetReason())
	}
	c.Agents[0].WaitRelease(t, running.GetLeaseId())
	waitAllReady(t, c)
}

func TestANodeWhoseAgentStaysAwayIsLostAndFailsItsJobWithoutRetries(t *testing.T) {
	c := cluster(t, 2, schedtest.AgentConfig{}, engine.Config{NodeLostAfter: time.Second})
	spec := schedtest.Spec(2)
	spec.MaxRetries = proto.Int32(0)
	j := schedtest.Submit(t, c.Replica.Jobs, spec)
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	lostNode, other := running.GetNodes()[1], running.GetNodes()[0]
	lost := c.Agent(lostNode)
	lost.Disconnect()

	n := schedtest.WaitNodeState(t, c.Replica.Nodes, lostNode, pb.NodeState_NODE_STATE_LOST)
	if n.GetConnected() {
		t.Errorf("lost node %s shows connected", lostNode)
	}
	failed := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_FAILED)
	if want := "node " + lostNode + " lost (agent gone for 1s)"; failed.GetReason() != want {
		t.Errorf("reason = %q; want %q", failed.GetReason(), want)
	}
	c.Agent(other).WaitRelease(t, running.GetLeaseId())
	schedtest.WaitNodeState(t, c.Replica.Nodes, other, pb.NodeState_NODE_STATE_READY)
	// The lost agent returns holding the ended lease: it is told to drop it.
	lost.Reconnect("")
	lost.WaitRelease(t, running.GetLeaseId())
	waitAllReady(t, c)
}

func TestAJobThatLosesANodeIsRequeuedUnderANewLeaseAndRunsElsewhere(t *testing.T) {
	c := cluster(t, 3, schedtest.AgentConfig{}, engine.Config{NodeLostAfter: time.Second})
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(2))
	first := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	lostNode := first.GetNodes()[1]
	c.Agent(lostNode).Disconnect()
	second := schedtest.WaitJob(t, c.Replica.Jobs, j.GetId(), "to run again under a second lease", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_RUNNING && j.GetLeaseId() == j.GetId()+".2"
	})
	if second.GetRetries() != 1 || second.GetAttempts() != 2 || slices.Contains(second.GetNodes(), lostNode) {
		t.Errorf("after requeue: %s retries=%d attempts=%d; want retry 1, attempt 2, not on %s",
			schedtest.DescribeJob(second), second.GetRetries(), second.GetAttempts(), lostNode)
	}
	for _, n := range second.GetNodes() {
		c.Agent(n).Exit(second.GetLeaseId(), 0, "")
	}
	schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)

	// Losing a node again spends the last retry: the job fails.
	j2 := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	r := schedtest.WaitJobState(t, c.Replica.Jobs, j2.GetId(), pb.JobState_JOB_STATE_RUNNING)
	c.Agent(r.GetNodes()[0]).Disconnect()
	r = schedtest.WaitJob(t, c.Replica.Jobs, j2.GetId(), "to run again", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_RUNNING && j.GetAttempts() == 2
	})
	c.Agent(r.GetNodes()[0]).Disconnect()
	failed := schedtest.WaitJobState(t, c.Replica.Jobs, j2.GetId(), pb.JobState_JOB_STATE_FAILED)
	if !strings.Contains(failed.GetReason(), "(all 1 retries used)") {
		t.Errorf("reason = %q", failed.GetReason())
	}
}

func TestANodeReturnsToServiceWhenItsAgentNoLongerHoldsTheLeaseBeingCleaned(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{OnRelease: schedtest.KeepLeases}, engine.Config{})
	a := c.Agents[0]
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	a.Exit(running.GetLeaseId(), 0, "")
	a.WaitRelease(t, running.GetLeaseId())
	schedtest.WaitNodeState(t, c.Replica.Nodes, a.NodeID(), pb.NodeState_NODE_STATE_CLEANING)

	// The agent cleans up while its stream is down, so its LeaseReleased is
	// lost; its next hello no longer lists the lease.
	a.Disconnect()
	a.Release(running.GetLeaseId(), true, "") // cannot be sent
	a.Reconnect("")
	a.WaitWelcomed(t, 2)
	schedtest.WaitNodeState(t, c.Replica.Nodes, a.NodeID(), pb.NodeState_NODE_STATE_READY)
	next := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	schedtest.WaitJobState(t, c.Replica.Jobs, next.GetId(), pb.JobState_JOB_STATE_RUNNING)
}

func TestAnExitReportedWhileDisconnectedArrivesWithTheNextHello(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{}, engine.Config{})
	a := c.Agents[0]
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	a.Disconnect()
	a.Exit(running.GetLeaseId(), 7, "") // recorded, not sent
	if got := schedtest.GetJob(t, c.Replica.Jobs, j.GetId()); got.GetState() != pb.JobState_JOB_STATE_RUNNING {
		t.Fatalf("job changed while its agent was away: %s", schedtest.DescribeJob(got))
	}
	a.Reconnect("")
	failed := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_FAILED)
	if want := "node node-0 (rank 0) exited with code 7"; failed.GetReason() != want {
		t.Errorf("reason = %q; want %q", failed.GetReason(), want)
	}
	waitAllReady(t, c)
}

func TestAnAgentThatLostItsLeaseGetsTheJobRequeued(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{}, engine.Config{})
	a := c.Agents[0]
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	a.Disconnect()
	a.Forget(running.GetLeaseId()) // the agent restarted without its state
	a.Reconnect("")
	again := schedtest.WaitJob(t, c.Replica.Jobs, j.GetId(), "to run under a new lease", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_RUNNING && j.GetLeaseId() == j.GetId()+".2"
	})
	if again.GetRetries() != 1 {
		t.Errorf("retries = %d, want 1", again.GetRetries())
	}
}

func TestAnAgentThatLostItsLeaseFailsAJobWithoutRetries(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{}, engine.Config{})
	a := c.Agents[0]
	spec := schedtest.Spec(1)
	spec.MaxRetries = proto.Int32(0)
	j := schedtest.Submit(t, c.Replica.Jobs, spec)
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	a.Disconnect()
	a.Forget(running.GetLeaseId())
	a.Reconnect("")
	failed := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_FAILED)
	if !strings.Contains(failed.GetReason(), "restarted and lost the lease") {
		t.Errorf("reason = %q", failed.GetReason())
	}
	waitAllReady(t, c)
}

func TestAStartLeaseLostWithTheStreamIsSentAgain(t *testing.T) {
	var dropped atomic.Bool
	c := cluster(t, 1, schedtest.AgentConfig{OnStart: func(a *schedtest.Agent, m *pb.StartLease) {
		if dropped.CompareAndSwap(false, true) {
			// As if the command never arrived: nothing held, stream gone.
			a.Forget(m.GetLeaseId())
			go func() { a.Disconnect(); a.Reconnect("") }()
			return
		}
		a.Started(m.GetLeaseId())
		a.Exit(m.GetLeaseId(), 0, "")
	}}, engine.Config{})
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	done := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)
	if done.GetAttempts() != 1 || len(c.Agents[0].Starts()) != 2 {
		t.Errorf("attempts = %d, StartLease sent %d times; want 1 lease started twice", done.GetAttempts(), len(c.Agents[0].Starts()))
	}
}

func TestANodeWhoseCleanupFailsIsUnhealthyAndGetsNoNewLease(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{OnRelease: func(a *schedtest.Agent, m *pb.ReleaseLease) {
		a.Release(m.GetLeaseId(), false, "GPU 3 still has processes [4242]")
	}}, engine.Config{})
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	c.Agents[0].Exit(running.GetLeaseId(), 0, "")
	n := schedtest.WaitNodeState(t, c.Replica.Nodes, "node-0", pb.NodeState_NODE_STATE_UNHEALTHY)
	if want := "cleanup after lease " + running.GetLeaseId() + " failed: GPU 3 still has processes [4242]"; n.GetReason() != want {
		t.Errorf("reason = %q; want %q", n.GetReason(), want)
	}
	next := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	schedtest.WaitJob(t, c.Replica.Jobs, next.GetId(), "to wait for a healthy node", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_PENDING && strings.HasPrefix(j.GetReason(), "waiting for 1 H100 node; 0 of 1 free")
	})
	// The handover result is recorded on the lease in etcd.
	resp, err := c.Etcd.Client.Get(schedtest.Context(t), "/gpusched/leases/", clientv3.WithPrefix())
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("leases in etcd: %v, %d", err, len(resp.Kvs))
	}
	var l pb.Lease
	if err := proto.Unmarshal(resp.Kvs[0].Value, &l); err != nil {
		t.Fatal(err)
	}
	if got := l.GetNodes()[0].GetCleanup(); got != "GPU 3 still has processes [4242]" {
		t.Errorf("lease cleanup = %q; want the agent's reason", got)
	}
}

func TestJobsAndNodesSurviveASchedulerRestart(t *testing.T) {
	c := cluster(t, 3, schedtest.AgentConfig{}, engine.Config{})
	jobs := c.Replica.Jobs
	succeeded := schedtest.Submit(t, jobs, schedtest.Spec(1))
	s := schedtest.WaitJobState(t, jobs, succeeded.GetId(), pb.JobState_JOB_STATE_RUNNING)
	c.Agent(s.GetNodes()[0]).Exit(s.GetLeaseId(), 0, "")
	schedtest.WaitJobState(t, jobs, succeeded.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)
	waitAllReady(t, c)
	running := schedtest.Submit(t, jobs, schedtest.Spec(1))
	r := schedtest.WaitJobState(t, jobs, running.GetId(), pb.JobState_JOB_STATE_RUNNING)
	cancelled := schedtest.Submit(t, jobs, schedtest.Spec(5))
	if _, err := cancelJob(t, c, cancelled.GetId(), ""); err != nil {
		t.Fatal(err)
	}
	pending := schedtest.Submit(t, jobs, schedtest.Spec(5))
	schedtest.WaitJob(t, jobs, pending.GetId(), "to be placed or refused", func(j *pb.Job) bool {
		return strings.HasPrefix(j.GetReason(), "needs 5")
	})
	before := listJobs(t, jobs)

	c.Replica.Stop(t)
	r2 := schedtest.StartReplica(t, scheduler.Config{Etcd: c.Etcd.Client, Name: "replica-2", Engine: engine.Config{KillGrace: killGrace}})
	token2 := r2.WaitLeader(t)
	if token2 <= c.Token {
		t.Errorf("the new term's token %d is not above the old %d", token2, c.Token)
	}
	// Before any agent is back: every job as it was, every node known.
	after := listJobs(t, r2.Jobs)
	if len(after) != len(before) {
		t.Fatalf("after restart %d jobs; before %d", len(after), len(before))
	}
	for i := range before {
		b, a := before[i], after[i]
		if a.GetId() != b.GetId() || a.GetState() != b.GetState() || a.GetLeaseId() != b.GetLeaseId() ||
			!slices.Equal(a.GetNodes(), b.GetNodes()) || a.GetAttempts() != b.GetAttempts() {
			t.Errorf("job %s changed across the restart:\n before %s\n after  %s", b.GetId(), schedtest.DescribeJob(b), schedtest.DescribeJob(a))
		}
	}
	schedtest.WaitNodes(t, r2.Nodes, 3, func(n *pb.Node) bool {
		want := pb.NodeState_NODE_STATE_READY
		if n.GetId() == r.GetNodes()[0] {
			want = pb.NodeState_NODE_STATE_LEASED
		}
		return n.GetState() == want && !n.GetConnected() && n.GetInventory().GetGpuCount() == 8
	})

	// The agents come back; the running job carries on under the new term.
	for _, a := range c.Agents {
		a.Reconnect(r2.Addr)
	}
	schedtest.WaitNodes(t, r2.Nodes, 3, func(n *pb.Node) bool { return n.GetConnected() })
	schedtest.WaitJob(t, r2.Jobs, pending.GetId(), "to say why it waits", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_PENDING && j.GetReason() == "needs 5 H100 nodes; cluster has 3"
	})
	holder := c.Agent(r.GetNodes()[0])
	holder.Exit(r.GetLeaseId(), 0, "")
	schedtest.WaitJobState(t, r2.Jobs, running.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)
	holder.WaitRelease(t, r.GetLeaseId())
	if tok, _ := holder.TokenOf(func(m *pb.ConnectResponse) bool { return m.GetReleaseLease().GetLeaseId() == r.GetLeaseId() }); tok != token2 {
		t.Errorf("ReleaseLease after the restart carried token %d; want the new term's %d", tok, token2)
	}
	// Job IDs carry on from where the old term stopped.
	if next := schedtest.Submit(t, r2.Jobs, schedtest.Spec(1)); next.GetId() != "5" {
		t.Errorf("first job after the restart is %s; want 5", next.GetId())
	}
}

func listJobs(t *testing.T, jobs pb.JobServiceClient) []*pb.Job {
	t.Helper()
	resp, err := jobs.ListJobs(schedtest.Context(t), &pb.ListJobsRequest{})
	if err != nil {
		t.Fatalf("ListJobs: %v", err)
	}
	return resp.GetJobs()
}

func TestALeaseThatEndedWhileItsAgentWasAwayIsReleasedAfterARestart(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{}, engine.Config{})
	a := c.Agents[0]
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	a.Disconnect()
	if _, err := cancelJob(t, c, j.GetId(), ""); err != nil { // its ReleaseLease has no stream to go to
		t.Fatal(err)
	}
	c.Replica.Stop(t)
	if len(a.Releases()) != 0 {
		t.Fatalf("the disconnected agent got %v", a.Releases())
	}

	r2 := schedtest.StartReplica(t, scheduler.Config{Etcd: c.Etcd.Client, Name: "replica-2", Engine: engine.Config{KillGrace: killGrace}})
	token2 := r2.WaitLeader(t)
	a.Reconnect(r2.Addr) // its hello lists the lease, started and not exited
	a.WaitRelease(t, running.GetLeaseId())
	if tok, _ := a.TokenOf(func(m *pb.ConnectResponse) bool { return m.GetReleaseLease() != nil }); tok != token2 {
		t.Errorf("ReleaseLease carried token %d; want the new leader's %d", tok, token2)
	}
	schedtest.WaitNodeState(t, r2.Nodes, a.NodeID(), pb.NodeState_NODE_STATE_READY)
	if got := schedtest.GetJob(t, r2.Jobs, j.GetId()); got.GetState() != pb.JobState_JOB_STATE_CANCELLED {
		t.Errorf("job after restart: %s; want CANCELLED", schedtest.DescribeJob(got))
	}
}

func TestAStandbyReplicaTakesOverWhenTheLeaderStops(t *testing.T) {
	c := cluster(t, 2, schedtest.AgentConfig{}, engine.Config{})
	standby := schedtest.StartReplica(t, scheduler.Config{Etcd: c.Etcd.Client, Name: "replica-2", Engine: engine.Config{KillGrace: killGrace}})
	ctx := schedtest.Context(t)
	cluster := pb.NewClusterServiceClient(standby.Conn)
	schedtest.Eventually(t, "both replicas in the status, the first leading", func() (bool, string) {
		st, err := cluster.GetStatus(ctx, &pb.GetStatusRequest{})
		if err != nil {
			return false, err.Error()
		}
		return len(st.GetReplicas()) == 2 && st.GetLeader() == c.Replica.Sched.Name() && st.GetFencingToken() == c.Token &&
			st.GetReplicas()[0].GetLeader() != st.GetReplicas()[1].GetLeader() && st.GetAnsweredBy() == "replica-2", st.String()
	})
	// The standby forwards leader-only work: the job lands on the leader.
	j := schedtest.Submit(t, standby.Jobs, schedtest.Spec(2))
	running := schedtest.WaitJobState(t, standby.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	if got := schedtest.GetJob(t, c.Replica.Jobs, j.GetId()); got.GetState() != pb.JobState_JOB_STATE_RUNNING {
		t.Fatalf("the leader does not know the job submitted through the standby: %s", schedtest.DescribeJob(got))
	}
	// An agent must not be served by a follower: its stream belongs on the leader.
	stream, err := pb.NewAgentServiceClient(standby.Conn).Connect(ctx)
	if err == nil {
		_ = stream.Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Hello{Hello: &pb.AgentHello{NodeId: "x"}}})
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("agent Connect on the standby = %v; want Unavailable", err)
	}

	c.Replica.Stop(t)
	token2 := standby.WaitLeader(t)
	if token2 <= c.Token {
		t.Errorf("the standby's token %d is not above the old leader's %d", token2, c.Token)
	}
	st, err := cluster.GetStatus(ctx, &pb.GetStatusRequest{})
	if err != nil || st.GetLeader() != "replica-2" || st.GetFencingToken() != token2 || len(st.GetReplicas()) != 1 {
		t.Errorf("status after failover = %v, %v; want replica-2 alone, leading with token %d", st, err, token2)
	}
	for _, a := range c.Agents {
		a.Reconnect(standby.Addr)
	}
	schedtest.WaitNodes(t, standby.Nodes, 2, func(n *pb.Node) bool {
		return n.GetConnected() && n.GetState() == pb.NodeState_NODE_STATE_LEASED
	})
	for _, node := range running.GetNodes() {
		c.Agent(node).Exit(running.GetLeaseId(), 0, "")
	}
	schedtest.WaitJobState(t, standby.Jobs, j.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)
}

// A term can end without the process stopping (the etcd session expires).
// Agents must then be cut off and re-register with the next term, even
// while they heartbeat on a stream that never fails by itself.
func TestAgentsMoveToTheNextTermWhenLeadershipIsLost(t *testing.T) {
	c := schedtest.StartCluster(t, schedtest.ClusterConfig{
		Scheduler: scheduler.Config{Name: "replica-1", SessionTTL: 2 * time.Second},
		Agents:    1,
		Agent:     schedtest.AgentConfig{Heartbeat: 50 * time.Millisecond},
	})
	ctx := schedtest.Context(t)
	resp, err := c.Etcd.Client.Get(ctx, "/gpusched/leader/", clientv3.WithPrefix())
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("leader key: %v, %d keys", err, len(resp.Kvs))
	}
	if _, err := c.Etcd.Client.Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatalf("revoke the leader's session: %v", err)
	}
	var token2 int64
	schedtest.Eventually(t, "a new term", func() (bool, string) {
		eng, err := c.Replica.Sched.Leader()
		if err != nil {
			return false, err.Error()
		}
		token2 = eng.Token()
		return token2 != c.Token, fmt.Sprintf("token %d", token2)
	})
	a := c.Agents[0]
	schedtest.Eventually(t, "the agent to be welcomed by the new term", func() (bool, string) {
		tok, ok := lastWelcome(a)
		return ok && tok == token2, fmt.Sprintf("last welcome token %d", tok)
	})
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	if s := a.WaitStart(t, j.GetId()); s == nil {
		t.Fatal("no StartLease")
	}
}

func lastWelcome(a *schedtest.Agent) (int64, bool) {
	cmds := a.Commands()
	for i := len(cmds) - 1; i >= 0; i-- {
		if cmds[i].Msg.GetWelcome() != nil {
			return cmds[i].Token, true
		}
	}
	return 0, false
}

func TestANodeIsNeverInTwoLeasesAtOnceUnderABurstOfJobs(t *testing.T) {
	const jobs, agents, submitters = 200, 4, 4
	c := cluster(t, agents, schedtest.AgentConfig{OnStart: schedtest.ExitAtOnce(0)}, engine.Config{})
	var wg sync.WaitGroup
	errs := make(chan error, jobs)
	for range submitters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs / submitters {
				ctx, cancel := context.WithTimeout(context.Background(), schedtest.WaitTimeout)
				_, err := c.Replica.Jobs.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: schedtest.Spec(1)})
				cancel()
				if err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("SubmitJob: %v", err)
	}
	schedtest.Eventually(t, "every job to succeed", func() (bool, string) {
		resp, err := c.Replica.Jobs.ListJobs(context.Background(), &pb.ListJobsRequest{
			States: []pb.JobState{pb.JobState_JOB_STATE_SUCCEEDED}, PageSize: jobs + 1})
		if err != nil {
			return false, err.Error()
		}
		return len(resp.GetJobs()) == jobs, fmt.Sprintf("%d of %d succeeded", len(resp.GetJobs()), jobs)
	})
	waitAllReady(t, c)

	startedOn := map[string]string{}
	for _, a := range c.Agents {
		for _, v := range a.Violations() {
			t.Errorf("node %s: %s", a.NodeID(), v)
		}
		for _, cmd := range a.Commands() {
			if cmd.Token != c.Token {
				t.Errorf("node %s got a command with token %d; the leader's is %d", a.NodeID(), cmd.Token, c.Token)
			}
			if s := cmd.Msg.GetStartLease(); s != nil {
				if prev, dup := startedOn[s.GetJobId()]; dup {
					t.Errorf("job %s started twice, on %s and %s", s.GetJobId(), prev, a.NodeID())
				}
				startedOn[s.GetJobId()] = a.NodeID()
			}
		}
	}
	if len(startedOn) != jobs {
		t.Errorf("%d jobs were started; want %d", len(startedOn), jobs)
	}
	for _, j := range listJobs(t, c.Replica.Jobs) {
		if len(j.GetNodes()) != 1 || startedOn[j.GetId()] != j.GetNodes()[0] || j.GetAttempts() != 1 {
			t.Errorf("%s attempts %d; started on %q", schedtest.DescribeJob(j), j.GetAttempts(), startedOn[j.GetId()])
		}
	}
}

func TestJobLogsAreRelayedFromTheAgentsInRankOrder(t *testing.T) {
	c := cluster(t, 2, schedtest.AgentConfig{OnFetchLogs: func(a *schedtest.Agent, m *pb.FetchLogs) {
		a.SendLog(m.GetRequestId(), []byte(a.NodeID()+" line 1\n"), false)
		a.SendLog(m.GetRequestId(), []byte(a.NodeID()+" line 2\n"), false)
		a.SendLog(m.GetRequestId(), nil, true)
	}}, engine.Config{})
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(2))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	for _, node := range running.GetNodes() {
		c.Agent(node).Exit(running.GetLeaseId(), 0, "")
	}
	schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)

	got, err := fetchLogs(t, c.Replica.Jobs, j.GetId())
	if err != nil {
		t.Fatalf("GetJobLogs: %v", err)
	}
	var want []string
	for rank, node := range running.GetNodes() {
		want = append(want, fmt.Sprintf("%s/%d: %s line 1\n", node, rank, node), fmt.Sprintf("%s/%d: %s line 2\n", node, rank, node))
	}
	if !slices.Equal(got, want) {
		t.Errorf("logs = %q; want %q", got, want)
	}
	for _, node := range running.GetNodes() {
		for _, cmd := range c.Agent(node).Commands() {
			if f := cmd.Msg.GetFetchLogs(); f != nil && (f.GetLeaseId() != running.GetLeaseId() || cmd.Token != c.Token) {
				t.Errorf("FetchLogs on %s = %v token %d", node, f, cmd.Token)
			}
		}
	}

	// A job that never ran has no output; one on a departed node has none
	// available.
	never := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(3))
	if got, err := fetchLogs(t, c.Replica.Jobs, never.GetId()); err != nil || len(got) != 0 {
		t.Errorf("logs of a job that never ran = %q, %v; want none", got, err)
	}
	c.Agent(running.GetNodes()[1]).Disconnect()
	schedtest.Eventually(t, "logs to become unavailable", func() (bool, string) {
		_, err := fetchLogs(t, c.Replica.Jobs, j.GetId())
		return status.Code(err) == codes.Unavailable, fmt.Sprint(err)
	})
	if _, err := fetchLogs(t, c.Replica.Jobs, "404"); status.Code(err) != codes.NotFound {
		t.Errorf("logs of an unknown job: %v; want NotFound", err)
	}
}

// fetchLogs reads a job's logs as "node/rank: data" chunks.
func fetchLogs(t *testing.T, jobs pb.JobServiceClient, id string) ([]string, error) {
	stream, err := jobs.GetJobLogs(schedtest.Context(t), &pb.GetJobLogsRequest{Id: id})
	if err != nil {
		return nil, err
	}
	var out []string
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, fmt.Sprintf("%s/%d: %s", m.GetNode(), m.GetRank(), m.GetData()))
	}
}

func TestTheStreamOfASilentAgentIsClosed(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{Heartbeat: -1}, engine.Config{HeartbeatInterval: 200 * time.Millisecond})
	// The fake agent reconnects at once after its stream ends; a second
	// welcome proves that silence ended the first stream.
	schedtest.Eventually(t, "the silent agent to be welcomed again after its stream was closed", func() (bool, string) {
		return c.Agents[0].Welcomes() >= 2, fmt.Sprintf("welcomes = %d", c.Agents[0].Welcomes())
	})
}

func TestADrainedNodeFinishesItsLeaseAndTakesNoNewOne(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{}, engine.Config{})
	ctx := schedtest.Context(t)
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	resp, err := c.Replica.Nodes.DrainNode(ctx, &pb.DrainNodeRequest{Id: "node-0", Reason: "replace PSU"})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetNode().GetState() != pb.NodeState_NODE_STATE_DRAINING || resp.GetNode().GetDrainReason() != "replace PSU" {
		t.Fatalf("drained a leased node: %v; want DRAINING with the reason", resp.GetNode())
	}
	c.Agents[0].Exit(running.GetLeaseId(), 0, "")
	schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)
	schedtest.WaitNodeState(t, c.Replica.Nodes, "node-0", pb.NodeState_NODE_STATE_DRAINED)
	next := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	schedtest.WaitJob(t, c.Replica.Jobs, next.GetId(), "to wait while the only node is drained", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_PENDING && strings.HasPrefix(j.GetReason(), "waiting for 1 H100 node; 0 of 1 free")
	})
	if _, err := c.Replica.Nodes.UndrainNode(ctx, &pb.UndrainNodeRequest{Id: "node-0"}); err != nil {
		t.Fatal(err)
	}
	schedtest.WaitJobState(t, c.Replica.Jobs, next.GetId(), pb.JobState_JOB_STATE_RUNNING)
	if _, err := c.Replica.Nodes.DrainNode(ctx, &pb.DrainNodeRequest{Id: "nope"}); status.Code(err) != codes.NotFound {
		t.Errorf("draining an unknown node = %v; want NotFound", err)
	}
}

func TestDrainNowRequeuesTheJobWithoutSpendingARetry(t *testing.T) {
	c := cluster(t, 2, schedtest.AgentConfig{}, engine.Config{})
	spec := schedtest.Spec(1)
	spec.MaxRetries = proto.Int32(0)
	j := schedtest.Submit(t, c.Replica.Jobs, spec)
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	node := running.GetNodes()[0]
	if _, err := c.Replica.Nodes.DrainNode(schedtest.Context(t), &pb.DrainNodeRequest{Id: node, Now: true}); err != nil {
		t.Fatal(err)
	}
	c.Agent(node).WaitRelease(t, running.GetLeaseId())
	again := schedtest.WaitJob(t, c.Replica.Jobs, j.GetId(), "to run again elsewhere", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_RUNNING && j.GetAttempts() == 2
	})
	if again.GetNodes()[0] == node || again.GetRetries() != 0 {
		t.Errorf("after drain --now: nodes %v, retries %d; want another node and no retry spent", again.GetNodes(), again.GetRetries())
	}
	schedtest.WaitNodeState(t, c.Replica.Nodes, node, pb.NodeState_NODE_STATE_DRAINED)
}

func TestAnUnhealthyNodeRequeuesItsJobAndRecoversByItself(t *testing.T) {
	c := cluster(t, 2, schedtest.AgentConfig{}, engine.Config{})
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	node := running.GetNodes()[0]
	a := c.Agent(node)
	xid := &pb.NodeEvent{Kind: pb.NodeEventKind_NODE_EVENT_KIND_XID, Gpu: 3, Xid: 79, Message: "XID 79 (fatal): GPU fell off the bus"}
	if err := a.Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_NodeEvent{NodeEvent: xid}}); err != nil {
		t.Fatal(err)
	}
	if err := a.Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Health{Health: &pb.HealthReport{Problems: []string{"GPU 3: fatal XID 79"}}}}); err != nil {
		t.Fatal(err)
	}
	n := schedtest.WaitNodeState(t, c.Replica.Nodes, node, pb.NodeState_NODE_STATE_UNHEALTHY)
	if n.GetReason() != "unhealthy: GPU 3: fatal XID 79" {
		t.Errorf("reason = %q", n.GetReason())
	}
	again := schedtest.WaitJob(t, c.Replica.Jobs, j.GetId(), "to be requeued onto the healthy node", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_RUNNING && j.GetAttempts() == 2
	})
	if again.GetNodes()[0] == node {
		t.Errorf("requeued onto the unhealthy node %s", node)
	}
	// The XID is on the node and on the job whose lease held it.
	kinds := func(evs []*pb.NodeEvent) (out []pb.NodeEventKind) {
		for _, e := range evs {
			out = append(out, e.GetKind())
		}
		return out
	}
	if got := kinds(again.GetEvents()); !slices.Contains(got, pb.NodeEventKind_NODE_EVENT_KIND_XID) {
		t.Errorf("job events = %v; want the XID", got)
	}
	if err := a.Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Health{Health: &pb.HealthReport{Healthy: true}}}); err != nil {
		t.Fatal(err)
	}
	n = schedtest.WaitNodeState(t, c.Replica.Nodes, node, pb.NodeState_NODE_STATE_READY)
	if got := kinds(n.GetEvents()); !slices.Equal(got, []pb.NodeEventKind{
		pb.NodeEventKind_NODE_EVENT_KIND_XID, pb.NodeEventKind_NODE_EVENT_KIND_UNHEALTHY, pb.NodeEventKind_NODE_EVENT_KIND_RECOVERED,
	}) {
		t.Errorf("node events = %v", got)
	}
}

func TestTelemetryIsRelayedToWatchersWithItsLease(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{}, engine.Config{})
	ctx, cancel := context.WithCancel(schedtest.Context(t))
	defer cancel()
	stream, err := pb.NewTelemetryServiceClient(c.Replica.Conn).WatchTelemetry(ctx, &pb.WatchTelemetryRequest{JobId: "1"})
	if err != nil {
		t.Fatal(err)
	}
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	for _, job := range []string{"", j.GetId()} { // only the second matches
		b := &pb.TelemetryBatch{LeaseId: running.GetLeaseId(), JobId: job, Samples: []*pb.GpuSample{{Gpu: 0, GpuUtil: 97}, {Gpu: 1, GpuUtil: 95}}}
		if err := c.Agents[0].Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Telemetry{Telemetry: b}}); err != nil {
			t.Fatal(err)
		}
	}
	for want := range 2 {
		r, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.GetNode() != "node-0" || r.GetJobId() != j.GetId() || r.GetSample().GetGpu() != int32(want) {
			t.Errorf("sample %d = %v", want, r)
		}
	}
}

func TestFaultInjectionIsRelayedToTheAgent(t *testing.T) {
	var got atomic.Uint64
	c := cluster(t, 1, schedtest.AgentConfig{OnMockInject: func(_ *schedtest.Agent, m *pb.MockInject) string {
		if m.GetXid() == 0 {
			return "not a simulated node"
		}
		got.Store(m.GetXid())
		return ""
	}}, engine.Config{})
	mock := pb.NewMockServiceClient(c.Replica.Conn)
	ctx := schedtest.Context(t)
	if _, err := mock.InjectFault(ctx, &pb.InjectFaultRequest{Node: "node-0", Gpu: 2, Fault: &pb.InjectFaultRequest_Xid{Xid: 79}}); err != nil || got.Load() != 79 {
		t.Fatalf("inject xid 79: %v, agent saw %d", err, got.Load())
	}
	_, err := mock.InjectFault(ctx, &pb.InjectFaultRequest{Node: "node-0", Fault: &pb.InjectFaultRequest_Clear{Clear: true}})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "not a simulated node") {
		t.Errorf("an agent's refusal = %v; want FailedPrecondition with its reason", err)
	}
	_, err = mock.InjectFault(ctx, &pb.InjectFaultRequest{Node: "node-0"})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("no fault = %v; want InvalidArgument", err)
	}
	_, err = mock.InjectFault(ctx, &pb.InjectFaultRequest{Node: "nope", Fault: &pb.InjectFaultRequest_Xid{Xid: 13}})
	if status.Code(err) != codes.NotFound {
		t.Errorf("unknown node = %v; want NotFound", err)
	}
}

func TestAGangWithARequiredRackWaitsForOneRackAndOperatorLabelsCount(t *testing.T) {
	c := cluster(t, 4, schedtest.AgentConfig{}, engine.Config{})
	ctx := schedtest.Context(t)
	// Racks set by the operator: node-0 and node-1 in r1, node-2 in r2,
	// node-3 unlabelled.
	for node, rack := range map[string]string{"node-0": "r1", "node-1": "r1", "node-2": "r2"} {
		if _, err := c.Replica.Nodes.LabelNode(ctx, &pb.LabelNodeRequest{Id: node, Set: map[string]string{"rack": rack}}); err != nil {
			t.Fatal(err)
		}
	}
	spec := schedtest.Spec(3)
	spec.Topology = "same-rack"
	big := schedtest.Submit(t, c.Replica.Jobs, spec)
	schedtest.WaitJob(t, c.Replica.Jobs, big.GetId(), "to wait for a rack of 3", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_PENDING && strings.Contains(j.GetReason(), "in one rack")
	})
	spec = schedtest.Spec(2)
	spec.Topology = "same-rack"
	pair := schedtest.Submit(t, c.Replica.Jobs, spec)
	running := schedtest.WaitJobState(t, c.Replica.Jobs, pair.GetId(), pb.JobState_JOB_STATE_RUNNING)
	if got := running.GetNodes(); !slices.Equal(got, []string{"node-0", "node-1"}) {
		t.Errorf("a 2-node same-rack gang ran on %v; want rack r1 (node-0, node-1)", got)
	}
	// A selector on an operator label.
	if _, err := c.Replica.Nodes.LabelNode(ctx, &pb.LabelNodeRequest{Id: "node-3", Set: map[string]string{"pool": "prod"}}); err != nil {
		t.Fatal(err)
	}
	sel := schedtest.Spec(1)
	sel.Selector = map[string]string{"pool": "prod"}
	onProd := schedtest.Submit(t, c.Replica.Jobs, sel)
	if r := schedtest.WaitJobState(t, c.Replica.Jobs, onProd.GetId(), pb.JobState_JOB_STATE_RUNNING); r.GetNodes()[0] != "node-3" {
		t.Errorf("selector pool=prod ran on %v", r.GetNodes())
	}
	if _, err := c.Replica.Nodes.LabelNode(ctx, &pb.LabelNodeRequest{Id: "node-0", Set: map[string]string{"bad key": "x"}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("a bad label key = %v; want InvalidArgument", err)
	}
}

func TestTenantQuotasAndQueues(t *testing.T) {
	c := cluster(t, 3, schedtest.AgentConfig{}, engine.Config{})
	ctx := schedtest.Context(t)
	tenants := pb.NewTenantServiceClient(c.Replica.Conn)
	queues := pb.NewQueueServiceClient(c.Replica.Conn)
	if _, err := tenants.SetTenant(ctx, &pb.SetTenantRequest{Tenant: &pb.Tenant{Name: "acme", MaxNodes: 1}}); err != nil {
		t.Fatal(err)
	}
	acme := func() *pb.JobSpec { s := schedtest.Spec(1); s.Tenant = "acme"; return s }
	first := schedtest.Submit(t, c.Replica.Jobs, acme())
	schedtest.WaitJobState(t, c.Replica.Jobs, first.GetId(), pb.JobState_JOB_STATE_RUNNING)
	second := schedtest.Submit(t, c.Replica.Jobs, acme())
	schedtest.WaitJob(t, c.Replica.Jobs, second.GetId(), "to wait at its tenant's quota", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_PENDING && j.GetReason() == "tenant acme at quota (1/1 nodes)"
	})

	// A paused queue starts nothing; resuming it does.
	if _, err := queues.CreateQueue(ctx, &pb.CreateQueueRequest{Queue: &pb.Queue{Name: "batch", Priority: -5}}); err != nil {
		t.Fatal(err)
	}
	if _, err := queues.CreateQueue(ctx, &pb.CreateQueueRequest{Queue: &pb.Queue{Name: "batch"}}); status.Code(err) != codes.AlreadyExists {
		t.Errorf("creating batch twice = %v; want AlreadyExists", err)
	}
	if _, err := queues.PauseQueue(ctx, &pb.PauseQueueRequest{Name: "batch"}); err != nil {
		t.Fatal(err)
	}
	b := schedtest.Spec(1)
	b.Queue = "batch"
	inBatch := schedtest.Submit(t, c.Replica.Jobs, b)
	schedtest.WaitJob(t, c.Replica.Jobs, inBatch.GetId(), "to wait in its paused queue", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_PENDING && j.GetReason() == "queue batch paused"
	})
	if _, err := queues.ResumeQueue(ctx, &pb.ResumeQueueRequest{Name: "batch"}); err != nil {
		t.Fatal(err)
	}
	schedtest.WaitJobState(t, c.Replica.Jobs, inBatch.GetId(), pb.JobState_JOB_STATE_RUNNING)

	// A queue created paused is filled before any of it starts, and an
	// update (priority, weight) leaves it paused.
	if _, err := queues.CreateQueue(ctx, &pb.CreateQueueRequest{Queue: &pb.Queue{Name: "staged", Paused: true}}); err != nil {
		t.Fatal(err)
	}
	if _, err := queues.UpdateQueue(ctx, &pb.UpdateQueueRequest{Queue: &pb.Queue{Name: "staged", Priority: 3}}); err != nil {
		t.Fatal(err)
	}
	st := schedtest.Spec(1)
	st.Queue = "staged"
	inStaged := schedtest.Submit(t, c.Replica.Jobs, st)
	schedtest.WaitJob(t, c.Replica.Jobs, inStaged.GetId(), "to wait in its queue created paused", func(j *pb.Job) bool {
		return j.GetState() == pb.JobState_JOB_STATE_PENDING && j.GetReason() == "queue staged paused"
	})

	unknown := schedtest.Spec(1)
	unknown.Queue = "nope"
	if _, err := c.Replica.Jobs.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: unknown}); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "spec.queue") {
		t.Errorf("a job in an unknown queue = %v; want InvalidArgument on spec.queue", err)
	}
	list, err := tenants.ListTenants(ctx, &pb.ListTenantsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range list.GetTenants() {
		if u.GetTenant().GetName() == "acme" && (u.GetNodes() != 1 || u.GetPendingJobs() != 1) {
			t.Errorf("acme usage = %v; want 1 node held and 1 job pending", u)
		}
	}
}

func TestAHigherPriorityQueueGoesFirst(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{}, engine.Config{})
	ctx := schedtest.Context(t)
	if _, err := pb.NewQueueServiceClient(c.Replica.Conn).CreateQueue(ctx, &pb.CreateQueueRequest{Queue: &pb.Queue{Name: "urgent", Priority: 100}}); err != nil {
		t.Fatal(err)
	}
	blocker := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, blocker.GetId(), pb.JobState_JOB_STATE_RUNNING)
	normal := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	u := schedtest.Spec(1)
	u.Queue = "urgent"
	urgent := schedtest.Submit(t, c.Replica.Jobs, u)
	c.Agents[0].Exit(running.GetLeaseId(), 0, "")
	schedtest.WaitJobState(t, c.Replica.Jobs, urgent.GetId(), pb.JobState_JOB_STATE_RUNNING)
	if j := schedtest.GetJob(t, c.Replica.Jobs, normal.GetId()); j.GetState() != pb.JobState_JOB_STATE_PENDING {
		t.Errorf("the earlier job in the default queue is %s; want it still PENDING behind the urgent one", j.GetState())
	}
}
