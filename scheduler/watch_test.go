package scheduler_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/gpusched/gpusched/client"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
)

// eventLog collects watch events and the last cursor, safely across the
// watch goroutine and the test.
type eventLog struct {
	mu     sync.Mutex
	events []*pb.JobEvent
	cursor string
}

func (l *eventLog) add(r *pb.WatchJobsResponse) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, r.GetEvents()...)
	l.cursor = r.GetCursor()
	return nil
}

// seqs returns, per job, the transition seqs seen in arrival order.
func (l *eventLog) seqs() map[string][]int32 {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string][]int32{}
	for _, ev := range l.events {
		out[ev.GetJobId()] = append(out[ev.GetJobId()], ev.GetTransition().GetSeq())
	}
	return out
}

func (l *eventLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	for _, ev := range l.events {
		fmt.Fprintf(&b, "%s#%d %s; ", ev.GetJobId(), ev.GetTransition().GetSeq(), ev.GetTransition().GetState())
	}
	return b.String()
}

// watch runs c.Watch in the background until the returned stop is called.
func watch(t *testing.T, c *client.Client, sel *pb.JobSelector, cursor string, log *eventLog) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Watch(ctx, sel, cursor, log.add) }()
	return func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch returned %v", err)
		}
	}
}

// waitSeqs waits until the log holds, for each job, exactly the seqs
// 1..want[job] in order.
func waitSeqs(t *testing.T, log *eventLog, want map[string]int) {
	t.Helper()
	schedtest.Eventually(t, fmt.Sprintf("watch events %v", want), func() (bool, string) {
		got := log.seqs()
		for job, n := range want {
			if len(got[job]) < n {
				return false, log.String()
			}
		}
		return true, ""
	})
	for job, n := range want {
		var exp []int32
		for i := 1; i <= n; i++ {
			exp = append(exp, int32(i))
		}
		if got := log.seqs()[job]; !slices.Equal(got, exp) {
			t.Fatalf("job %s: transitions seen %v; want %v (every change once, in order)\n%s", job, got, exp, log)
		}
	}
}

func newClient(t *testing.T, endpoints ...string) *client.Client {
	t.Helper()
	c, err := client.New(context.Background(), client.Config{Endpoints: endpoints})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func runToSuccess(t *testing.T, c *schedtest.Cluster, jobs pb.JobServiceClient, id string) {
	t.Helper()
	running := schedtest.WaitJobState(t, jobs, id, pb.JobState_JOB_STATE_RUNNING)
	for _, node := range running.GetNodes() {
		c.Agent(node).Exit(running.GetLeaseId(), 0, "")
	}
	schedtest.WaitJobState(t, jobs, id, pb.JobState_JOB_STATE_SUCCEEDED)
}

func TestAWatchSeesEveryTransitionOnceAcrossADroppedStreamAndALeaderChange(t *testing.T) {
	c := cluster(t, 2, schedtest.AgentConfig{}, engine.Config{})
	standby := schedtest.StartReplica(t, scheduler.Config{Etcd: c.Etcd.Client, Name: "replica-2", Engine: engine.Config{KillGrace: killGrace}})
	sdk := newClient(t, c.Replica.Addr, standby.Addr)
	ctx := schedtest.Context(t)
	set := &pb.JobSelector{JobSet: "watched"}
	spec := func() *pb.JobSpec { s := schedtest.Spec(1); s.JobSet = "watched"; return s }

	log := &eventLog{}
	stop := watch(t, sdk, set, "", log)
	schedtest.Eventually(t, "the watch's first cursor", func() (bool, string) {
		log.mu.Lock()
		defer log.mu.Unlock()
		return log.cursor != "", ""
	})
	a, err := sdk.Submit(ctx, spec())
	if err != nil {
		t.Fatal(err)
	}
	other, err := sdk.Submit(ctx, schedtest.Spec(1)) // not in the set: never seen
	if err != nil {
		t.Fatal(err)
	}
	schedtest.WaitJobState(t, c.Replica.Jobs, a.GetId(), pb.JobState_JOB_STATE_RUNNING)
	waitSeqs(t, log, map[string]int{a.GetId(): 3}) // PENDING, SCHEDULED, RUNNING

	// Drop the stream and resume from its last cursor: nothing repeats,
	// and what happened in between arrives.
	stop()
	log.mu.Lock()
	cursor := log.cursor
	log.mu.Unlock()
	running := schedtest.GetJob(t, c.Replica.Jobs, a.GetId())
	c.Agent(running.GetNodes()[0]).Exit(running.GetLeaseId(), 0, "")
	schedtest.WaitJobState(t, c.Replica.Jobs, a.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)
	stop = watch(t, sdk, set, cursor, log)
	defer func() { stop() }()
	waitSeqs(t, log, map[string]int{a.GetId(): 4})

	// The leader goes away under the watch; the SDK resumes on the
	// standby from its cursor.
	c.Replica.Stop(t)
	standby.WaitLeader(t)
	for _, ag := range c.Agents {
		ag.Reconnect(standby.Addr)
	}
	b, err := sdk.Submit(ctx, spec())
	if err != nil {
		t.Fatal(err)
	}
	runToSuccess(t, c, standby.Jobs, b.GetId())
	waitSeqs(t, log, map[string]int{a.GetId(): 4, b.GetId(): 4})
	if got := log.seqs()[other.GetId()]; len(got) != 0 {
		t.Errorf("job %s outside the job set was delivered: %v", other.GetId(), got)
	}
	// The transitions carry the states in order.
	final := schedtest.GetJob(t, standby.Jobs, b.GetId())
	var states []string
	for _, tr := range final.GetTransitions() {
		states = append(states, tr.GetState().String())
	}
	if want := "JOB_STATE_PENDING JOB_STATE_SCHEDULED JOB_STATE_RUNNING JOB_STATE_SUCCEEDED"; strings.Join(states, " ") != want {
		t.Errorf("transitions = %v; want %s", states, want)
	}
}

func TestAWatchFromACompactedCursorFailsDistinctlyAndListAndWatchRecovers(t *testing.T) {
	c := cluster(t, 0, schedtest.AgentConfig{}, engine.Config{})
	sdk := newClient(t, c.Replica.Addr)
	ctx := schedtest.Context(t)
	first, err := sdk.Submit(ctx, schedtest.Spec(1))
	if err != nil {
		t.Fatal(err)
	}
	_, cursor, err := sdk.ListAll(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	compact := func() {
		t.Helper()
		if _, err := sdk.Submit(ctx, schedtest.Spec(1)); err != nil {
			t.Fatal(err)
		}
		// A revision past the submit, so the submit itself is compacted.
		resp, err := c.Etcd.Client.Put(ctx, "compact-probe", "x")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Etcd.Client.Compact(ctx, resp.Header.Revision); err != nil {
			t.Fatal(err)
		}
	}
	compact()
	err = sdk.Watch(ctx, nil, cursor, func(*pb.WatchJobsResponse) error { return nil })
	if !errors.Is(err, client.ErrCursorCompacted) {
		t.Fatalf("Watch from a compacted cursor = %v; want ErrCursorCompacted", err)
	}

	// ListAndWatch: compaction strikes between its listing and its watch;
	// it lists again and goes on watching.
	var lists [][]*pb.Job
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var third *pb.Job
	err = sdk.ListAndWatch(wctx, nil, func(jobs []*pb.Job) error {
		lists = append(lists, jobs)
		switch len(lists) {
		case 1:
			compact()
		case 2:
			third, err = sdk.Submit(ctx, schedtest.Spec(1))
			return err
		}
		return nil
	}, func(ev *pb.JobEvent) error {
		if ev.GetJobId() == third.GetId() && ev.GetTransition().GetState() == pb.JobState_JOB_STATE_PENDING {
			cancel()
		}
		return nil
	})
	if err != nil {
		t.Fatalf("ListAndWatch = %v", err)
	}
	if len(lists) != 2 || len(lists[0]) != 2 || len(lists[1]) != 3 || lists[0][0].GetId() != first.GetId() {
		t.Fatalf("listings = %d (%v); want two: 2 jobs, then 3 after the compaction", len(lists), lists)
	}
}

func TestABatchAcceptsValidItemsAndReportsInvalidOnesByIndex(t *testing.T) {
	c := cluster(t, 0, schedtest.AgentConfig{}, engine.Config{})
	sdk := newClient(t, c.Replica.Addr)
	ctx := schedtest.Context(t)
	bad := schedtest.Spec(1)
	bad.Nodes = 0
	noQueue := schedtest.Spec(1)
	noQueue.Queue = "nowhere"
	labelled := schedtest.Spec(1)
	labelled.Labels = map[string]string{"bad key!": "x"}
	items := []client.BatchItem{
		{Spec: schedtest.Spec(1)},
		{Spec: bad},
		{Spec: schedtest.Spec(1), IdempotencyKey: "k1"},
		{Spec: schedtest.Spec(1), IdempotencyKey: "k1"},
		{Spec: noQueue},
		{Spec: labelled},
		{Spec: nil},
	}
	res, err := sdk.SubmitBatch(ctx, items)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != len(items) {
		t.Fatalf("got %d results for %d items", len(res), len(items))
	}
	violation := func(r client.BatchResult) string {
		var e *client.Error
		if !errors.As(r.Err, &e) || len(e.Violations) == 0 {
			return ""
		}
		return e.Violations[0].Field
	}
	for i, want := range []string{"", "spec.nodes", "", "", "spec.queue", "spec.labels", "spec.nodes"} {
		r := res[i]
		switch {
		case want == "" && (r.Err != nil || r.Job.GetId() == ""):
			t.Errorf("item %d = %v; want a job", i, r.Err)
		case want != "" && (!errors.Is(r.Err, client.ErrInvalid) || violation(r) != want):
			t.Errorf("item %d = %v (field %q); want invalid %s", i, r.Err, violation(r), want)
		}
	}
	if res[2].Job.GetId() != res[3].Job.GetId() {
		t.Errorf("the same idempotency key twice in a batch made jobs %s and %s", res[2].Job.GetId(), res[3].Job.GetId())
	}
	jobs, _, err := sdk.ListAll(ctx, nil)
	if err != nil || len(jobs) != 2 {
		t.Fatalf("jobs after the batch = %d, %v; want 2", len(jobs), err)
	}
	for _, n := range []int{0, client.MaxBatch + 1} {
		if _, err := sdk.SubmitBatch(ctx, make([]client.BatchItem, n)); !errors.Is(err, client.ErrInvalid) {
			t.Errorf("a batch of %d = %v; want ErrInvalid", n, err)
		}
	}
}

func TestConcurrentBatchesWithTheSameKeysMakeOneJobPerKey(t *testing.T) {
	c := cluster(t, 0, schedtest.AgentConfig{}, engine.Config{})
	sdk := newClient(t, c.Replica.Addr)
	ctx := schedtest.Context(t)
	const keys, writers = 50, 8
	var wg sync.WaitGroup
	ids := make([][]string, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			items := make([]client.BatchItem, keys)
			for k := range keys {
				// Each writer sends the keys in its own order.
				items[k] = client.BatchItem{Spec: schedtest.Spec(1), IdempotencyKey: fmt.Sprintf("msg-%d", (k+w*7)%keys)}
			}
			res, err := sdk.SubmitBatch(ctx, items)
			if err != nil {
				t.Error(err)
				return
			}
			ids[w] = make([]string, keys)
			for k, r := range res {
				if r.Err != nil {
					t.Error(r.Err)
					return
				}
				ids[w][(k+w*7)%keys] = r.Job.GetId()
			}
		}()
	}
	wg.Wait()
	for w := 1; w < writers; w++ {
		if !slices.Equal(ids[w], ids[0]) {
			t.Fatalf("writer %d got jobs %v; writer 0 got %v", w, ids[w], ids[0])
		}
	}
	jobs, _, err := sdk.ListAll(ctx, nil)
	if err != nil || len(jobs) != keys {
		t.Fatalf("%d jobs exist (%v); want exactly %d, one per key", len(jobs), err, keys)
	}
}
