package scheduler_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler"
	"github.com/gpusched/gpusched/scheduler/api"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
)

// leaderReads counts the reads of who leads (election keys, replica
// records) a replica's etcd client makes on behalf of an RPC (not its own
// campaign's).
type leaderReads struct {
	clientv3.KV
	n atomic.Int64
}

func (k *leaderReads) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	if _, rpc := grpc.Method(ctx); rpc && (strings.HasPrefix(key, "/gpusched/leader") || strings.HasPrefix(key, "/gpusched/replicas/")) {
		k.n.Add(1)
	}
	return k.KV.Get(ctx, key, opts...)
}

// countingClient is a second client of etcd whose leader reads are counted.
func countingClient(t *testing.T, etcd *schedtest.Etcd) (*clientv3.Client, *leaderReads) {
	t.Helper()
	cli, err := etcd.Server.Client(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	reads := &leaderReads{KV: cli.KV}
	cli.KV = reads
	return cli, reads
}

// refusal opens an agent stream on conn and returns how the replica
// refused it: the leader it named (or "") and whether it said NO_LEADER.
func refusal(t *testing.T, conn *grpc.ClientConn) (hint string, noLeader bool) {
	t.Helper()
	stream, err := pb.NewAgentServiceClient(conn).Connect(schedtest.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	// The replica may refuse before it reads the hello: Send then says
	// io.EOF, and Recv has the status.
	if err := stream.Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Hello{Hello: &pb.AgentHello{NodeId: "n1"}}}); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	_, err = stream.Recv()
	st := status.Convert(err)
	if st.Code() != codes.Unavailable {
		t.Fatalf("agent stream: %v; want Unavailable", err)
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetReason() == api.ReasonNoLeader {
			noLeader = true
		}
	}
	if v := stream.Trailer().Get(api.LeaderTrailer); len(v) > 0 {
		hint = v[0]
	}
	return hint, noLeader
}

// A leader still loading its state turns agents away without a read of
// etcd, names itself so they come back to it, and says NO_LEADER so they
// back off meanwhile; once loaded it serves them.
func TestALoadingLeaderTurnsAgentsAwayCheaplyAndNamesItself(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	cli, reads := countingClient(t, etcd)
	loading := make(chan struct{}) // the engine's clock, hence its load, waits on it
	stopLoading := sync1(func() { close(loading) })
	r := schedtest.StartReplica(t, scheduler.Config{Etcd: cli, Name: "loader", Engine: engine.Config{
		Now: func() time.Time { <-loading; return time.Now() },
	}})
	t.Cleanup(stopLoading) // before the replica stops: a term stuck loading would not
	ctx := schedtest.Context(t)
	schedtest.Eventually(t, "the replica to be elected", func() (bool, string) {
		st, err := pb.NewClusterServiceClient(r.Conn).GetStatus(ctx, &pb.GetStatusRequest{})
		return err == nil && st.GetLeader() == "loader", st.String()
	})
	before := reads.n.Load()
	for range 20 {
		hint, noLeader := refusal(t, r.Conn)
		if hint != r.Addr || !noLeader {
			t.Fatalf("loading leader refused an agent naming %q, NO_LEADER %v; want itself (%s), NO_LEADER", hint, noLeader, r.Addr)
		}
	}
	if n := reads.n.Load() - before; n != 0 {
		t.Errorf("20 refused agents cost %d reads of the leader from etcd; want none", n)
	}
	// A client's leader-only call is refused too, and not forwarded to itself.
	if _, err := r.Jobs.GetJob(ctx, &pb.GetJobRequest{Id: "1"}); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "loading") {
		t.Errorf("GetJob on a loading leader = %v; want Unavailable, still loading", err)
	}

	stopLoading()
	r.WaitLeader(t)
	a := schedtest.StartAgent(t, r.Addr, schedtest.AgentConfig{NodeID: "n1"})
	a.WaitWelcomed(t, 1)
}

// A follower names the leader from the view it keeps by watching etcd: no
// read per refused agent, and the view follows a change of leader.
func TestAFollowerNamesTheLeaderFromItsWatchedView(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	first := schedtest.StartReplica(t, scheduler.Config{Etcd: etcd.Client, Name: "a"})
	first.WaitLeader(t)
	second := schedtest.StartReplica(t, scheduler.Config{Etcd: etcd.Client, Name: "b"})
	// The second campaigns before the follower under test, so it is next.
	schedtest.Eventually(t, "the second replica to campaign", func() (bool, string) {
		resp, err := etcd.Client.Get(schedtest.Context(t), "/gpusched/leader/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		return err == nil && resp.Count == 2, fmt.Sprintf("%v election keys, %v", resp.Count, err)
	})
	cli, reads := countingClient(t, etcd)
	follower := schedtest.StartReplica(t, scheduler.Config{Etcd: cli, Name: "c"})
	schedtest.Eventually(t, "the follower to name the first leader", func() (bool, string) {
		hint, _ := refusal(t, follower.Conn)
		return hint == first.Addr, "hint " + hint
	})
	before := reads.n.Load()
	for range 20 {
		if hint, _ := refusal(t, follower.Conn); hint != first.Addr {
			t.Fatalf("the follower named %q; want the leader %s", hint, first.Addr)
		}
	}
	if n := reads.n.Load() - before; n != 0 {
		t.Errorf("20 refused agents cost %d reads of the leader from etcd; want none", n)
	}
	// Forwarding uses the same view.
	j := schedtest.Submit(t, follower.Jobs, schedtest.Spec(1))
	if got := schedtest.GetJob(t, first.Jobs, j.GetId()); got.GetId() != j.GetId() {
		t.Fatalf("the job submitted through the follower is not on the leader: %s", schedtest.DescribeJob(got))
	}

	first.Stop(t)
	second.WaitLeader(t)
	schedtest.Eventually(t, "the follower to name the new leader", func() (bool, string) {
		hint, _ := refusal(t, follower.Conn)
		return hint == second.Addr, "hint " + hint
	})
	if got := schedtest.GetJob(t, follower.Jobs, j.GetId()); got.GetId() != j.GetId() {
		t.Fatalf("GetJob through the follower after the failover: %s", schedtest.DescribeJob(got))
	}
}

// sync1 returns f made safe to call more than once.
func sync1(f func()) func() {
	var done atomic.Bool
	return func() {
		if done.CompareAndSwap(false, true) {
			f()
		}
	}
}
