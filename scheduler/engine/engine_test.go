package engine_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpusched/gpusched/internal/invariants"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/api"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// clock is a fake clock for Config.Now: time moves only when told.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Date(2026, 5, 1, 9, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// term is one engine leading under a real election, with the API served
// on a loopback listener so fake agents can connect.
type term struct {
	eng    *engine.Engine
	el     *concurrency.Election
	addr   string
	jobs   pb.JobServiceClient
	nodes  pb.NodeServiceClient
	cancel context.CancelFunc
	runErr chan error
}

// startTerm wins the election under /gpusched/leader and runs an engine
// with cfg (Store, Fence and Logger filled in) until the test ends.
func startTerm(t *testing.T, cli *clientv3.Client, cfg engine.Config) *term {
	t.Helper()
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(30))
	if err != nil {
		t.Fatalf("session: %v", err)
	}
	t.Cleanup(func() { _ = sess.Close() })
	el := concurrency.NewElection(sess, "/gpusched/leader")
	if err := el.Campaign(schedtest.Context(t), "engine-test"); err != nil {
		t.Fatalf("campaign: %v", err)
	}
	cfg.Store = store.New(cli, "/gpusched")
	cfg.Fence = store.Fence{Key: el.Key(), Revision: el.Rev()}
	cfg.Logger = zap.NewNop()
	tm := &term{eng: engine.New(cfg), el: el, runErr: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	tm.cancel = cancel
	go func() { tm.runErr <- tm.eng.Run(ctx) }()
	select {
	case <-tm.eng.Loaded():
	case err := <-tm.runErr:
		t.Fatalf("engine Run: %v", err)
	case <-time.After(schedtest.WaitTimeout):
		t.Fatal("engine did not load")
	}

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(api.ServerOptions(zap.NewNop())...)
	api.Register(srv, api.Backend{Leader: func() (*engine.Engine, error) { return tm.eng, nil }})
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() {
		tm.stop(t)
		srv.Stop()
	})
	tm.addr = lis.Addr().String()
	conn := schedtest.Dial(t, tm.addr)
	tm.jobs, tm.nodes = pb.NewJobServiceClient(conn), pb.NewNodeServiceClient(conn)
	return tm
}

// stop ends the term's context and waits for Run to return nil.
func (tm *term) stop(t *testing.T) {
	t.Helper()
	if tm.cancel == nil {
		return
	}
	tm.cancel()
	tm.cancel = nil
	select {
	case err := <-tm.runErr:
		if err != nil {
			t.Errorf("Run after cancel = %v; want nil", err)
		}
	case <-time.After(schedtest.WaitTimeout):
		t.Fatal("Run did not return after its context ended")
	}
}

func spec(n int) model.JobSpec {
	return model.JobSpec{Nodes: n, GPUModel: "H100", Command: []string{"train.sh"}}
}

func TestADeposedLeaderStopsAndItsWritesDoNotLand(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	tm := startTerm(t, etcd.Client, engine.Config{})
	ctx := schedtest.Context(t)
	if _, err := tm.eng.Submit(ctx, spec(1)); err != nil {
		t.Fatalf("Submit as leader: %v", err)
	}
	// Another replica's doing, as far as this engine knows: the leader key
	// is gone, so the fence no longer holds.
	if err := tm.el.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	_, err := tm.eng.Submit(ctx, spec(1))
	if !errors.Is(err, model.ErrStopped) {
		t.Fatalf("Submit after being deposed = %v; want ErrStopped", err)
	}
	select {
	case err := <-tm.runErr:
		if !errors.Is(err, store.ErrFenced) {
			t.Fatalf("Run = %v; want ErrFenced", err)
		}
		tm.cancel = nil
	case <-time.After(schedtest.WaitTimeout):
		t.Fatal("a deposed engine kept running")
	}
	st, err := store.New(etcd.Client, "/gpusched").Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Jobs) != 1 || st.JobSeq != 1 {
		t.Fatalf("etcd has %d jobs, seq %d; want only the job submitted while leading", len(st.Jobs), st.JobSeq)
	}
	if _, err := tm.eng.Cancel(ctx, "1", ""); !errors.Is(err, model.ErrStopped) {
		t.Errorf("Cancel on a stopped engine = %v; want ErrStopped", err)
	}
}

func TestSubmitValidatesBeforeTouchingEtcd(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	tm := startTerm(t, etcd.Client, engine.Config{})
	ctx := schedtest.Context(t)
	_, err := tm.eng.Submit(ctx, model.JobSpec{Nodes: 0, Command: []string{"x"}})
	var verr *model.ValidationError
	if !errors.As(err, &verr) || !errors.Is(err, model.ErrInvalid) || verr.Violations[0].Field != "spec.nodes" {
		t.Fatalf("Submit(nodes=0) = %v; want a validation error on spec.nodes", err)
	}
	resp, err := etcd.Client.Get(ctx, "/gpusched/jobs/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil || resp.Count != 0 {
		t.Fatalf("an invalid job reached etcd: %v, %d keys", err, resp.Count)
	}
	j, err := tm.eng.Submit(ctx, spec(1))
	if err != nil || j.ID != "1" {
		t.Fatalf("the first valid job = %v, %v; want ID 1 (no ID spent on the invalid one)", j, err)
	}
}

func TestListJobs(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	tm := startTerm(t, etcd.Client, engine.Config{})
	ctx := schedtest.Context(t)
	for i := range 7 {
		sp := spec(1)
		if i%2 == 0 { // jobs 1, 3, 5, 7
			sp.JobSet, sp.Labels = "sweep-a", map[string]string{"team": "vision"}
		}
		if i >= 5 { // jobs 6, 7
			sp.Tenant = "globex"
		}
		if _, err := tm.eng.Submit(ctx, sp); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"2", "5"} {
		if _, err := tm.eng.Cancel(ctx, id, ""); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name   string
		filter engine.JobFilter
		want   []string
		next   string
		err    bool
	}{
		{"all jobs in ID order", engine.JobFilter{}, []string{"1", "2", "3", "4", "5", "6", "7"}, "", false},
		{"a first page", engine.JobFilter{PageSize: 3}, []string{"1", "2", "3"}, "3", false},
		{"a middle page", engine.JobFilter{PageSize: 3, PageToken: "3"}, []string{"4", "5", "6"}, "6", false},
		{"the last page", engine.JobFilter{PageSize: 3, PageToken: "6"}, []string{"7"}, "", false},
		{"filtered by state", engine.JobFilter{Selector: model.JobSelector{States: []model.JobState{model.JobCancelled}}}, []string{"2", "5"}, "", false},
		{"filtered and paged", engine.JobFilter{Selector: model.JobSelector{States: []model.JobState{model.JobPending}}, PageSize: 2, PageToken: "1"}, []string{"3", "4"}, "4", false},
		{"a full page with no matching job after it has no token", engine.JobFilter{Selector: model.JobSelector{States: []model.JobState{model.JobCancelled}}, PageSize: 1, PageToken: "2"}, []string{"5"}, "", false},
		{"filtered by job set", engine.JobFilter{Selector: model.JobSelector{JobSet: "sweep-a"}}, []string{"1", "3", "5", "7"}, "", false},
		{"filtered by label", engine.JobFilter{Selector: model.JobSelector{Labels: map[string]string{"team": "vision"}}}, []string{"1", "3", "5", "7"}, "", false},
		{"a label with another value matches nothing", engine.JobFilter{Selector: model.JobSelector{Labels: map[string]string{"team": "nlp"}}}, nil, "", false},
		{"filtered by tenant and job set", engine.JobFilter{Selector: model.JobSelector{Tenants: []string{"globex"}, JobSet: "sweep-a"}}, []string{"7"}, "", false},
		{"filtered by queue", engine.JobFilter{Selector: model.JobSelector{Queues: []string{"default"}}, PageSize: 2}, []string{"1", "2"}, "2", false},
		{"by IDs, in ID order, duplicates once, unknown ones skipped", engine.JobFilter{Selector: model.JobSelector{IDs: []string{"6", "2", "6", "99"}}}, []string{"2", "6"}, "", false},
		{"by IDs and state", engine.JobFilter{Selector: model.JobSelector{IDs: []string{"2", "3"}, States: []model.JobState{model.JobPending}}}, []string{"3"}, "", false},
		{"a page that ends exactly at the last job has no token", engine.JobFilter{PageSize: 7}, []string{"1", "2", "3", "4", "5", "6", "7"}, "", false},
		{"a page size over the maximum is capped", engine.JobFilter{PageSize: engine.MaxPageSize + 1}, []string{"1", "2", "3", "4", "5", "6", "7"}, "", false},
		{"a negative page size is invalid", engine.JobFilter{PageSize: -1}, nil, "", true},
		{"a token that is not a job ID is invalid", engine.JobFilter{PageToken: "abc"}, nil, "", true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			page, err := tm.eng.ListJobs(c.filter)
			jobs, next := page.Jobs, page.NextPageToken
			if c.err {
				if !errors.Is(err, model.ErrInvalid) {
					t.Fatalf("ListJobs = %v; want ErrInvalid", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, j := range jobs {
				ids = append(ids, j.ID)
			}
			if strconv.Quote(join(ids)) != strconv.Quote(join(c.want)) || next != c.next {
				t.Fatalf("ListJobs = %v next %q; want %v next %q", ids, next, c.want, c.next)
			}
		})
	}
}

func join(ids []string) string {
	out := ""
	for _, id := range ids {
		out += id + ","
	}
	return out
}

func TestGetReturnsCopies(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	tm := startTerm(t, etcd.Client, engine.Config{})
	j, err := tm.eng.Submit(schedtest.Context(t), spec(1))
	if err != nil {
		t.Fatal(err)
	}
	j.State, j.Spec.Command[0] = model.JobFailed, "rm"
	got, err := tm.eng.GetJob("1")
	if err != nil {
		t.Fatal(err)
	}
	if got.State != model.JobPending || got.Spec.Command[0] != "train.sh" {
		t.Fatalf("a caller's change to a returned job reached the engine: %+v", got)
	}
	if _, err := tm.eng.GetJob("2"); !errors.Is(err, model.ErrNotFound) {
		t.Errorf("GetJob(2) = %v; want ErrNotFound", err)
	}
	if _, err := tm.eng.GetNode("n1"); !errors.Is(err, model.ErrNotFound) {
		t.Errorf("GetNode(n1) = %v; want ErrNotFound", err)
	}
}

// With a fake clock, time limits and node loss are checked without
// waiting for them: the loop's own tick applies whatever time it reads.
func TestTimersFollowTheClock(t *testing.T) {
	cases := []struct {
		name string
		run  func(t *testing.T, clk *clock, tm *term, a *schedtest.Agent, job *pb.Job)
		want pb.JobState
	}{
		{"a job is not timed out before its limit", func(t *testing.T, clk *clock, tm *term, a *schedtest.Agent, job *pb.Job) {
			clk.Advance(59 * time.Minute)
			a.Exit(job.GetLeaseId(), 0, "")
		}, pb.JobState_JOB_STATE_SUCCEEDED},
		{"a job past its limit times out", func(t *testing.T, clk *clock, tm *term, a *schedtest.Agent, job *pb.Job) {
			clk.Advance(time.Hour)
		}, pb.JobState_JOB_STATE_TIMED_OUT},
		{"a node is not lost while its agent is briefly away", func(t *testing.T, clk *clock, tm *term, a *schedtest.Agent, job *pb.Job) {
			a.Disconnect()
			waitDisconnected(t, tm, a.NodeID())
			clk.Advance(29 * time.Second)
			a.Reconnect("")
			a.WaitWelcomed(t, 2)
			a.Exit(job.GetLeaseId(), 0, "")
		}, pb.JobState_JOB_STATE_SUCCEEDED},
		{"a node away for NodeLostAfter is lost and fails its job", func(t *testing.T, clk *clock, tm *term, a *schedtest.Agent, job *pb.Job) {
			a.Disconnect()
			waitDisconnected(t, tm, a.NodeID())
			clk.Advance(30 * time.Second)
			schedtest.WaitNodeState(t, tm.nodes, a.NodeID(), pb.NodeState_NODE_STATE_LOST)
		}, pb.JobState_JOB_STATE_FAILED},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			clk := newClock()
			etcd := schedtest.StartEtcd(t)
			tm := startTerm(t, etcd.Client, engine.Config{Now: clk.Now, NodeLostAfter: 30 * time.Second})
			a := schedtest.StartAgent(t, tm.addr, schedtest.AgentConfig{NodeID: "n1"})
			a.WaitWelcomed(t, 1)
			s := schedtest.Spec(1)
			s.TimeLimit = durationpb.New(time.Hour)
			s.MaxRetries = proto.Int32(0) // a lost node fails the job at once
			j := schedtest.Submit(t, tm.jobs, s)
			running := schedtest.WaitJobState(t, tm.jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
			c.run(t, clk, tm, a, running)
			got := schedtest.WaitJob(t, tm.jobs, j.GetId(), "to end", func(j *pb.Job) bool {
				return j.GetState() != pb.JobState_JOB_STATE_RUNNING
			})
			if got.GetState() != c.want {
				t.Fatalf("job ended %s; want %s", schedtest.DescribeJob(got), c.want)
			}
		})
	}
}

func waitDisconnected(t *testing.T, tm *term, node string) {
	t.Helper()
	schedtest.Eventually(t, "node "+node+" to be disconnected", func() (bool, string) {
		n, err := tm.eng.GetNode(node)
		if err != nil {
			return false, err.Error()
		}
		return !n.Connected, "still connected"
	})
}

// A new term rebuilds everything from etcd: time limits run from when the
// job was scheduled, and nodes get NodeLostAfter to come back.
func TestANewTermRebuildsTimersFromEtcd(t *testing.T) {
	clk := newClock()
	etcd := schedtest.StartEtcd(t)
	cfg := engine.Config{Now: clk.Now, NodeLostAfter: 20 * time.Minute}
	tm := startTerm(t, etcd.Client, cfg)
	a := schedtest.StartAgent(t, tm.addr, schedtest.AgentConfig{NodeID: "n1"})
	b := schedtest.StartAgent(t, tm.addr, schedtest.AgentConfig{NodeID: "n2"})
	limited := schedtest.Spec(1)
	limited.TimeLimit = durationpb.New(time.Hour)
	j1 := schedtest.Submit(t, tm.jobs, limited)
	noRetry := schedtest.Spec(1)
	noRetry.MaxRetries = proto.Int32(0)
	j2 := schedtest.Submit(t, tm.jobs, noRetry)
	r1 := schedtest.WaitJobState(t, tm.jobs, j1.GetId(), pb.JobState_JOB_STATE_RUNNING)
	r2 := schedtest.WaitJobState(t, tm.jobs, j2.GetId(), pb.JobState_JOB_STATE_RUNNING)
	a.Disconnect()
	b.Disconnect()
	tm.stop(t)
	if err := tm.el.Resign(schedtest.Context(t)); err != nil {
		t.Fatal(err)
	}

	clk.Advance(50 * time.Minute)
	tm2 := startTerm(t, etcd.Client, cfg)
	if tm2.eng.Token() <= tm.eng.Token() {
		t.Fatalf("token %d after %d", tm2.eng.Token(), tm.eng.Token())
	}
	for _, id := range []string{j1.GetId(), j2.GetId()} {
		if j, err := tm2.eng.GetJob(id); err != nil || j.State != model.JobRunning {
			t.Fatalf("job %s in the new term: %v, %v; want RUNNING", id, j, err)
		}
	}
	// Ten more minutes: an hour since j1 was scheduled, though only ten
	// since this term began.
	clk.Advance(10 * time.Minute)
	schedtest.WaitJobState(t, tm2.jobs, j1.GetId(), pb.JobState_JOB_STATE_TIMED_OUT)
	if n, _ := tm2.eng.GetNode(r2.GetNodes()[0]); n.State == model.NodeLost {
		t.Fatal("a node was lost before its grace period in the new term")
	}
	// The other agent never returns: lost NodeLostAfter into the new term.
	clk.Advance(10 * time.Minute)
	schedtest.WaitNodeState(t, tm2.nodes, r2.GetNodes()[0], pb.NodeState_NODE_STATE_LOST)
	schedtest.WaitJobState(t, tm2.jobs, j2.GetId(), pb.JobState_JOB_STATE_FAILED)
	// n1's agent returns holding the timed-out lease and is told to drop it.
	holder := a
	if r1.GetNodes()[0] != a.NodeID() {
		holder = b
	}
	holder.Reconnect(tm2.addr)
	holder.WaitRelease(t, r1.GetLeaseId())
	schedtest.WaitNodeState(t, tm2.nodes, holder.NodeID(), pb.NodeState_NODE_STATE_READY)
}

func TestIdempotentSubmits(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	clk := newClock()
	cfg := engine.Config{Now: clk.Now, IdempotencyRetention: 24 * time.Hour}
	tm := startTerm(t, etcd.Client, cfg)
	ctx := schedtest.Context(t)

	// Fifty concurrent retries of one submit create one job.
	ids := make(chan string, 50)
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			j, err := tm.eng.SubmitIdempotent(ctx, spec(1), "order-17")
			if err != nil {
				t.Error(err)
				return
			}
			ids <- j.ID
		})
	}
	wg.Wait()
	close(ids)
	first := ""
	for id := range ids {
		if first == "" {
			first = id
		}
		if id != first {
			t.Fatalf("concurrent retries created jobs %s and %s", first, id)
		}
	}
	if page, _ := tm.eng.ListJobs(engine.JobFilter{}); len(page.Jobs) != 1 || page.Jobs[0].IdempotencyKey != "order-17" {
		jobs := page.Jobs
		t.Fatalf("jobs = %v; want exactly one, with its key", jobs)
	}
	// The key is per tenant.
	other := spec(1)
	other.Tenant = "globex"
	if j, err := tm.eng.SubmitIdempotent(ctx, other, "order-17"); err != nil || j.ID == first {
		t.Fatalf("another tenant's submit with the same key = %v, %v; want a new job", j, err)
	}
	if _, err := tm.eng.SubmitIdempotent(ctx, spec(1), "bad\nkey"); !errors.Is(err, model.ErrInvalid) {
		t.Errorf("a key with a newline = %v; want invalid", err)
	}

	// A new leader (same etcd) remembers the key.
	tm.stop(t)
	if err := tm.el.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	tm = startTerm(t, etcd.Client, cfg)
	if j, err := tm.eng.SubmitIdempotent(ctx, spec(1), "order-17"); err != nil || j.ID != first {
		t.Fatalf("a retry after a leader change = %v, %v; want job %s", j, err, first)
	}

	// Past the retention the key is forgotten (and deleted from etcd).
	clk.Advance(25 * time.Hour)
	schedtest.Eventually(t, "the expired key to leave etcd", func() (bool, string) {
		resp, err := etcd.Client.Get(ctx, "/gpusched/idem/", clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return false, err.Error()
		}
		return resp.Count == 0, fmt.Sprintf("%d keys left", resp.Count)
	})
	if j, err := tm.eng.SubmitIdempotent(ctx, spec(1), "order-17"); err != nil || j.ID == first {
		t.Fatalf("a submit after the retention = %v, %v; want a new job", j, err)
	}
	r, err := invariants.Check(ctx, etcd.Client, "/gpusched", nil)
	if err != nil || !r.OK() {
		t.Fatalf("invariants after expiry: %v %v", r, err)
	}
}
