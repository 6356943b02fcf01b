// Package schedtest is shared test support for the scheduler's packages.
// It is used only by tests and never by production code.
//
// Everything here is real: an embedded etcd (internal/embedetcd), scheduler
// replicas serving gRPC on loopback sockets, and fake node agents that speak
// the real AgentService protocol as gRPC clients. The fake agents have no
// GPUs and run no commands; what they do when the scheduler commands them is
// given by closures (see AgentConfig), and they record every command they
// receive so tests can check what the scheduler sent and with which fencing
// token.
//
// Every helper registers its own cleanup with t.Cleanup, so a test stops
// all it started. Nothing here waits for a fixed time: tests wait for
// conditions with Eventually, which polls until a generous deadline.
package schedtest

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/gpusched/gpusched/internal/embedetcd"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler"
)

// WaitTimeout is how long Eventually waits. It is generous on purpose:
// tests run on loaded 2-core machines under the race detector, and a
// condition that holds is found as soon as it holds.
const WaitTimeout = 20 * time.Second

// pollInterval is how often Eventually re-checks its condition.
const pollInterval = 10 * time.Millisecond

// Eventually polls cond until it reports true, failing the test with what
// and cond's last description of the state if WaitTimeout passes first.
func Eventually(t testing.TB, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(WaitTimeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; last state: %s", WaitTimeout, what, state)
		}
		time.Sleep(pollInterval)
	}
}

// Context returns a context bounded by WaitTimeout that ends with the test.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), WaitTimeout)
	t.Cleanup(cancel)
	return ctx
}

// Etcd is an embedded single-member etcd with one client.
type Etcd struct {
	Server *embedetcd.Server
	Client *clientv3.Client
}

// StartEtcd starts an embedded etcd in a temporary directory (no fsync) and
// returns it with a client; both are closed when the test ends.
func StartEtcd(t testing.TB) *Etcd {
	t.Helper()
	srv, err := embedetcd.Start(embedetcd.Config{Dir: t.TempDir(), NoFsync: true})
	if err != nil {
		t.Fatalf("start embedded etcd: %v", err)
	}
	t.Cleanup(srv.Close)
	cli, err := srv.Client(context.Background())
	if err != nil {
		t.Fatalf("etcd client: %v", err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return &Etcd{Server: srv, Client: cli}
}

// Replica is one scheduler replica serving on a loopback listener, with a
// gRPC connection to it for the test to use as a client.
type Replica struct {
	Sched *scheduler.Scheduler
	Addr  string
	Conn  *grpc.ClientConn
	Jobs  pb.JobServiceClient
	Nodes pb.NodeServiceClient

	cancel context.CancelFunc
	done   chan error
}

// StartReplica starts scheduler.New(cfg) serving on 127.0.0.1 and returns
// at once; use WaitLeader to wait for it to lead. It is stopped when the
// test ends (or earlier by Stop).
func StartReplica(t testing.TB, cfg scheduler.Config) *Replica {
	t.Helper()
	if cfg.Name == "" {
		cfg.Name = t.Name()
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Replica{Sched: scheduler.New(cfg), Addr: lis.Addr().String(), cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- r.Sched.Serve(ctx, lis) }()
	t.Cleanup(func() { r.Stop(t) })
	r.Conn = Dial(t, r.Addr)
	r.Jobs = pb.NewJobServiceClient(r.Conn)
	r.Nodes = pb.NewNodeServiceClient(r.Conn)
	return r
}

// Stop ends the replica's Serve and waits for it to return. It may be
// called more than once.
func (r *Replica) Stop(t testing.TB) {
	t.Helper()
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("replica Serve returned %v", err)
		}
	case <-time.After(WaitTimeout):
		t.Fatalf("replica did not stop within %s", WaitTimeout)
	}
}

// WaitLeader waits until the replica leads and has loaded its state, and
// returns its fencing token.
func (r *Replica) WaitLeader(t testing.TB) int64 {
	t.Helper()
	var token int64
	Eventually(t, "replica to become leader", func() (bool, string) {
		eng, err := r.Sched.Leader()
		if err != nil {
			return false, err.Error()
		}
		token = eng.Token()
		return true, ""
	})
	return token
}

// Dial returns a client connection to addr, closed when the test ends.
func Dial(t testing.TB, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// Cluster is an etcd, a leading replica and a set of connected fake agents:
// the usual fixture of an integration test.
type Cluster struct {
	Etcd    *Etcd
	Replica *Replica
	Token   int64
	Agents  []*Agent
}

// ClusterConfig configures StartCluster.
type ClusterConfig struct {
	// Scheduler configures the replica; Etcd is filled in.
	Scheduler scheduler.Config
	// Agents is how many fake agents to start, named node-0, node-1, ...
	Agents int
	// Agent is the template for every agent; NodeID is set per agent.
	Agent AgentConfig
}

// StartCluster starts etcd, one replica, waits for it to lead, then starts
// the agents and waits until every node is registered and connected.
func StartCluster(t testing.TB, cfg ClusterConfig) *Cluster {
	t.Helper()
	c := &Cluster{Etcd: StartEtcd(t)}
	cfg.Scheduler.Etcd = c.Etcd.Client
	c.Replica = StartReplica(t, cfg.Scheduler)
	c.Token = c.Replica.WaitLeader(t)
	for i := 0; i < cfg.Agents; i++ {
		ac := cfg.Agent
		ac.NodeID = fmt.Sprintf("node-%d", i)
		c.Agents = append(c.Agents, StartAgent(t, c.Replica.Addr, ac))
	}
	for _, a := range c.Agents {
		a.WaitWelcomed(t, 1)
	}
	WaitNodes(t, c.Replica.Nodes, cfg.Agents, func(n *pb.Node) bool {
		return n.GetConnected() && n.GetState() == pb.NodeState_NODE_STATE_READY
	})
	return c
}

// Agent returns the fake agent of a node by ID.
func (c *Cluster) Agent(node string) *Agent {
	for _, a := range c.Agents {
		if a.NodeID() == node {
			return a
		}
	}
	return nil
}

// WaitNodes waits until exactly want nodes exist and every one satisfies ok.
func WaitNodes(t testing.TB, nodes pb.NodeServiceClient, want int, ok func(*pb.Node) bool) {
	t.Helper()
	Eventually(t, fmt.Sprintf("%d nodes in the wanted state", want), func() (bool, string) {
		resp, err := nodes.ListNodes(context.Background(), &pb.ListNodesRequest{})
		if err != nil {
			return false, err.Error()
		}
		all := true
		for _, n := range resp.GetNodes() {
			all = all && ok(n)
		}
		return all && len(resp.GetNodes()) == want, DescribeNodes(resp.GetNodes())
	})
}

// DescribeNodes renders nodes for failure messages.
func DescribeNodes(nodes []*pb.Node) string {
	parts := make([]string, len(nodes))
	for i, n := range nodes {
		parts[i] = fmt.Sprintf("%s=%s(connected=%v lease=%q)", n.GetId(), n.GetState(), n.GetConnected(), n.GetLeaseId())
	}
	return "[" + strings.Join(parts, " ") + "]"
}

// Submit submits spec through the JobService and returns the new job.
func Submit(t testing.TB, jobs pb.JobServiceClient, spec *pb.JobSpec) *pb.Job {
	t.Helper()
	resp, err := jobs.SubmitJob(Context(t), &pb.SubmitJobRequest{Spec: spec})
	if err != nil {
		t.Fatalf("SubmitJob(%v): %v", spec, err)
	}
	return resp.GetJob()
}

// Spec returns a valid spec of n H100 nodes running a placeholder command.
func Spec(n int) *pb.JobSpec {
	return &pb.JobSpec{Nodes: int32(n), GpuModel: "H100", Command: []string{"train.sh"}}
}

// GetJob fetches a job, failing the test on error.
func GetJob(t testing.TB, jobs pb.JobServiceClient, id string) *pb.Job {
	t.Helper()
	resp, err := jobs.GetJob(Context(t), &pb.GetJobRequest{Id: id})
	if err != nil {
		t.Fatalf("GetJob(%s): %v", id, err)
	}
	return resp.GetJob()
}

// WaitJob waits until job id satisfies ok and returns it.
func WaitJob(t testing.TB, jobs pb.JobServiceClient, id, what string, ok func(*pb.Job) bool) *pb.Job {
	t.Helper()
	var last *pb.Job
	Eventually(t, fmt.Sprintf("job %s %s", id, what), func() (bool, string) {
		resp, err := jobs.GetJob(context.Background(), &pb.GetJobRequest{Id: id})
		if err != nil {
			return false, err.Error()
		}
		last = resp.GetJob()
		return ok(last), DescribeJob(last)
	})
	return last
}

// WaitJobState waits until job id is in state and returns it.
func WaitJobState(t testing.TB, jobs pb.JobServiceClient, id string, state pb.JobState) *pb.Job {
	t.Helper()
	return WaitJob(t, jobs, id, "to be "+state.String(), func(j *pb.Job) bool { return j.GetState() == state })
}

// DescribeJob renders a job for failure messages.
func DescribeJob(j *pb.Job) string {
	return fmt.Sprintf("job %s %s reason=%q lease=%q nodes=%v", j.GetId(), j.GetState(), j.GetReason(), j.GetLeaseId(), j.GetNodes())
}

// GetNode fetches a node, failing the test on error.
func GetNode(t testing.TB, nodes pb.NodeServiceClient, id string) *pb.Node {
	t.Helper()
	resp, err := nodes.GetNode(Context(t), &pb.GetNodeRequest{Id: id})
	if err != nil {
		t.Fatalf("GetNode(%s): %v", id, err)
	}
	return resp.GetNode()
}

// WaitNodeState waits until node id is in state and returns it.
func WaitNodeState(t testing.TB, nodes pb.NodeServiceClient, id string, state pb.NodeState) *pb.Node {
	t.Helper()
	var last *pb.Node
	Eventually(t, fmt.Sprintf("node %s to be %s", id, state), func() (bool, string) {
		resp, err := nodes.GetNode(context.Background(), &pb.GetNodeRequest{Id: id})
		if err != nil {
			return false, err.Error()
		}
		last = resp.GetNode()
		return last.GetState() == state, DescribeNodes([]*pb.Node{last})
	})
	return last
}
