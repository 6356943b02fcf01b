package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/gpusched/gpusched/internal/embedetcd"
	"github.com/gpusched/gpusched/scheduler/model"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The store's tests cannot use scheduler/internal/schedtest (it imports the
// scheduler, which imports this package), so they start etcd themselves.
func startEtcd(t *testing.T) *clientv3.Client {
	t.Helper()
	srv, err := embedetcd.Start(embedetcd.Config{Dir: t.TempDir(), NoFsync: true})
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(srv.Close)
	cli, err := srv.Client(context.Background())
	if err != nil {
		t.Fatalf("etcd client: %v", err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// leader campaigns in a real election and returns the fence of the won
// term and the election.
func leader(t *testing.T, cli *clientv3.Client, prefix string) (Fence, *concurrency.Election) {
	t.Helper()
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(10))
	if err != nil {
		t.Fatalf("session: %v", err)
	}
	t.Cleanup(func() { _ = sess.Close() })
	el := concurrency.NewElection(sess, prefix+"/leader")
	if err := el.Campaign(testContext(t), "me"); err != nil {
		t.Fatalf("campaign: %v", err)
	}
	return Fence{Key: el.Key(), Revision: el.Rev()}, el
}

func at(sec int) time.Time { return time.Date(2026, 1, 2, 3, 4, sec, 0, time.UTC) }

func job(seq uint64) *model.Job {
	id := strconv.FormatUint(seq, 10)
	return &model.Job{ID: id, Seq: seq, State: model.JobPending, Reason: "waiting",
		Spec:       model.JobSpec{Tenant: "default", Nodes: 1, Command: []string{"true"}},
		CreateTime: at(int(seq % 60))}
}

func node(id string) *model.Node {
	return &model.Node{ID: id, State: model.NodeReady, Address: id + ":29500", RegisterTime: at(1),
		Labels:    map[string]string{"rack": "r1"},
		Inventory: model.Inventory{GPUModel: "H100", GPUCount: 1, GPUs: []model.GPU{{Index: 0, UUID: "GPU-" + id}}}}
}

func lease(j *model.Job, attempt int, nodes ...string) *model.Lease {
	l := &model.Lease{ID: model.LeaseID(j.ID, attempt), JobID: j.ID, Tenant: "default", Active: true, FencingToken: 7, StartTime: at(2)}
	for i, n := range nodes {
		l.Nodes = append(l.Nodes, model.LeaseNode{Node: n, Rank: i, GPUModel: "H100", GPUCount: 1, GPUUUIDs: []string{"GPU-" + n}})
	}
	return l
}

func TestCommitThenLoadReturnsTheSameRecords(t *testing.T) {
	cli := startEtcd(t)
	fence, _ := leader(t, cli, "/gpusched")
	s := New(cli, "/gpusched/") // a trailing slash is tolerated
	ctx := testContext(t)

	j1, j2, j10 := job(1), job(2), job(10)
	j2.State, j2.LeaseID, j2.Nodes, j2.Attempts, j2.ScheduleTime = model.JobRunning, "2.1", []string{"n1", "n2"}, 1, at(3)
	l2 := lease(j2, 1, "n1", "n2")
	j10.State, j10.LeaseID, j10.Attempts, j10.EndTime = model.JobSucceeded, "10.1", 1, at(9)
	j10.Exits = []model.NodeExit{{Node: "n3", Time: at(8)}}
	l10 := lease(j10, 1, "n3")
	l10.Active, l10.EndTime, l10.EndReason = false, at(9), "SUCCEEDED: "
	n1, n2, n3 := node("n1"), node("n2"), node("n3")
	n1.Connected, n1.LeaseID, n1.JobID = true, "2.1", "2" // derived in memory, never stored

	_, err := s.Commit(ctx, fence, []Change{
		{Job: j10, Lease: l10, Node: n3},
		{Job: j1},
		{Job: j2, Lease: l2, Node: n1},
		{Node: n2},
	}, 10)
	if err != nil {
		t.Fatalf("Commit: %v", err)
	}
	st, err := s.Load(ctx)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if st.JobSeq != 10 {
		t.Errorf("JobSeq = %d; want 10", st.JobSeq)
	}
	if st.Revision == 0 {
		t.Error("Load did not report its revision")
	}
	// Jobs and leases come back in sequence order (10 after 2, not
	// between 1 and 2 as strings would sort); nodes in name order.
	if want := []*model.Job{j1, j2, j10}; !reflect.DeepEqual(st.Jobs, want) {
		t.Errorf("jobs:\n got %+v\nwant %+v", st.Jobs, want)
	}
	if want := []*model.Lease{l2, l10}; !reflect.DeepEqual(st.Leases, want) {
		t.Errorf("leases:\n got %+v\nwant %+v", st.Leases, want)
	}
	stored := n1.Clone()
	stored.Connected, stored.LeaseID, stored.JobID = false, "", ""
	if want := []*model.Node{stored, n2, n3}; !reflect.DeepEqual(st.Nodes, want) {
		t.Errorf("nodes:\n got %+v\nwant %+v", st.Nodes, want)
	}
	if !n1.Connected || n1.LeaseID != "2.1" {
		t.Error("Commit modified the caller's node")
	}

	// Keys follow the documented layout.
	for _, key := range []string{"/gpusched/jobs/00000000000000000010", "/gpusched/leases/00000000000000000002.1",
		"/gpusched/nodes/n1", "/gpusched/meta/job_seq"} {
		resp, err := cli.Get(ctx, key)
		if err != nil || len(resp.Kvs) != 1 {
			t.Errorf("key %s: %v, %d kvs", key, err, len(resp.Kvs))
		}
	}
}

func TestJobSeq(t *testing.T) {
	cases := []struct {
		name    string
		commits []uint64 // jobSeq of each commit, each with one job change
		want    uint64
	}{
		{"an empty store has sequence zero", nil, 0},
		{"the sequence is persisted", []uint64{5}, 5},
		{"a later sequence replaces the earlier", []uint64{5, 9}, 9},
		{"a commit with sequence zero leaves it alone", []uint64{5, 0}, 5},
	}
	cli := startEtcd(t)
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			prefix := fmt.Sprintf("/case%d", i) // cases share one etcd
			fence, _ := leader(t, cli, prefix)
			s := New(cli, prefix)
			ctx := testContext(t)
			for i, seq := range c.commits {
				if _, err := s.Commit(ctx, fence, []Change{{Job: job(uint64(i + 1))}}, seq); err != nil {
					t.Fatalf("Commit: %v", err)
				}
			}
			st, err := s.Load(ctx)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if st.JobSeq != c.want {
				t.Fatalf("JobSeq = %d; want %d", st.JobSeq, c.want)
			}
		})
	}
}

func TestCommitIsFenced(t *testing.T) {
	cases := []struct {
		name  string
		fence func(t *testing.T, good Fence, el *concurrency.Election) Fence
	}{
		{"a fence with the wrong revision fails", func(_ *testing.T, good Fence, _ *concurrency.Election) Fence {
			return Fence{Key: good.Key, Revision: good.Revision + 1}
		}},
		{"a fence naming another key fails", func(_ *testing.T, good Fence, _ *concurrency.Election) Fence {
			return Fence{Key: good.Key + "x", Revision: good.Revision}
		}},
		{"the right fence fails once the leader resigned", func(t *testing.T, good Fence, el *concurrency.Election) Fence {
			if err := el.Resign(testContext(t)); err != nil {
				t.Fatalf("resign: %v", err)
			}
			return good
		}},
	}
	cli := startEtcd(t)
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			prefix := fmt.Sprintf("/case%d", i) // cases share one etcd
			good, el := leader(t, cli, prefix)
			s := New(cli, prefix)
			ctx := testContext(t)
			fence := c.fence(t, good, el)
			before, err := cli.Get(ctx, prefix+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
			if err != nil {
				t.Fatal(err)
			}
			// Enough changes for several transactions: none may land.
			var changes []Change
			for i := uint64(1); i <= 100; i++ {
				changes = append(changes, Change{Job: job(i), Node: node(fmt.Sprintf("n%d", i))})
			}
			_, err = s.Commit(ctx, fence, changes, 100)
			if !errors.Is(err, ErrFenced) {
				t.Fatalf("Commit = %v; want ErrFenced", err)
			}
			after, err := cli.Get(ctx, prefix+"/jobs/", clientv3.WithPrefix(), clientv3.WithCountOnly())
			if err != nil {
				t.Fatal(err)
			}
			if after.Count != 0 || after.Header.Revision != before.Header.Revision {
				t.Fatalf("a fenced commit wrote: %d job keys, revision %d -> %d", after.Count, before.Header.Revision, after.Header.Revision)
			}
		})
	}
}

func TestCommitSplitsLargeBatchesIntoTransactions(t *testing.T) {
	cli := startEtcd(t)
	fence, _ := leader(t, cli, "/gpusched")
	s := New(cli, "/gpusched")
	ctx := testContext(t)

	// 150 changes of 3 records each: 451 ops with the sequence, far over
	// one transaction's 128.
	var changes []Change
	for i := uint64(1); i <= 150; i++ {
		j := job(i)
		n := fmt.Sprintf("n%03d", i)
		j.LeaseID = model.LeaseID(j.ID, 1)
		changes = append(changes, Change{Job: j, Lease: lease(j, 1, n), Node: node(n)})
	}
	if _, err := s.Commit(ctx, fence, changes, 150); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	resp, err := cli.Get(ctx, "/gpusched/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	// One etcd revision per transaction: count keys per revision.
	perRev := map[int64]int{}
	revOf := map[string]int64{}
	for _, kv := range resp.Kvs {
		if strings.HasPrefix(string(kv.Key), "/gpusched/leader/") {
			continue // the election's key, not ours
		}
		if string(kv.Key) == s.WriterKey() {
			if string(kv.Value) != strconv.FormatInt(fence.Revision, 10) {
				t.Errorf("writer = %s; want the leader's token %d", kv.Value, fence.Revision)
			}
			continue // put by every transaction; checked below
		}
		perRev[kv.ModRevision]++
		revOf[string(kv.Key)] = kv.ModRevision
	}
	if want := 150*3 + 1; len(revOf) != want {
		t.Fatalf("%d keys landed; want %d", len(revOf), want)
	}
	if len(perRev) < 4 {
		t.Errorf("%d ops landed in %d transactions; want at least 4 of at most %d", len(revOf), len(perRev), MaxOpsPerTxn)
	}
	for rev, n := range perRev {
		if n > MaxOpsPerTxn {
			t.Errorf("transaction at revision %d wrote %d keys; max is %d", rev, n, MaxOpsPerTxn)
		}
	}
	// A change is never split across transactions, and every transaction
	// writes the sequence (they are sent concurrently, and whichever
	// commits must carry a counter at least as high as its job IDs).
	for _, kv := range resp.Kvs {
		if string(kv.Key) == "/gpusched/meta/job_seq" && int(kv.Version) != len(perRev) {
			t.Errorf("job seq was written %d times; want once in each of the %d transactions", kv.Version, len(perRev))
		}
	}
	for i := uint64(1); i <= 150; i++ {
		jr := revOf[fmt.Sprintf("/gpusched/jobs/%020d", i)]
		lr := revOf[fmt.Sprintf("/gpusched/leases/%020d.1", i)]
		nr := revOf[fmt.Sprintf("/gpusched/nodes/n%03d", i)]
		if jr == 0 || jr != lr || jr != nr {
			t.Errorf("change %d was split: job@%d lease@%d node@%d", i, jr, lr, nr)
		}
	}
	st, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Jobs) != 150 || len(st.Leases) != 150 || len(st.Nodes) != 150 || st.JobSeq != 150 {
		t.Errorf("Load: %d jobs, %d leases, %d nodes, seq %d", len(st.Jobs), len(st.Leases), len(st.Nodes), st.JobSeq)
	}
}

func TestCommitPutsARecordChangedTwiceOnce(t *testing.T) {
	cases := []struct {
		name    string
		changes func(j *model.Job, l *model.Lease, n *model.Node) []Change
	}{
		{"the same job twice", func(j *model.Job, _ *model.Lease, _ *model.Node) []Change {
			return []Change{{Job: j}, {Job: j}}
		}},
		{"a job placed and then ended in one turn", func(j *model.Job, l *model.Lease, n *model.Node) []Change {
			return []Change{{Job: j}, {Job: j, Lease: l}, {Node: n}, {Job: j, Lease: l, Node: n}}
		}},
		{"the same node in many changes", func(_ *model.Job, _ *model.Lease, n *model.Node) []Change {
			return []Change{{Node: n}, {Node: n}, {Node: n}}
		}},
	}
	cli := startEtcd(t)
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			prefix := fmt.Sprintf("/case%d", i) // cases share one etcd
			fence, _ := leader(t, cli, prefix)
			s := New(cli, prefix)
			ctx := testContext(t)
			j, n := job(1), node("n1")
			l := lease(j, 1, "n1")
			changes := c.changes(j, l, n) // Commit fills in their records
			// The records' final values, as the engine would have them at
			// commit time.
			j.State, j.Reason, j.LeaseID = model.JobSucceeded, "", l.ID
			l.Active = false
			n.Reason = "final"
			if _, err := s.Commit(ctx, fence, changes, 1); err != nil {
				t.Fatalf("Commit: %v", err)
			}
			st, err := s.Load(ctx)
			if err != nil {
				t.Fatal(err)
			}
			stored := func(key string) []byte {
				resp, err := cli.Get(ctx, key)
				if err != nil || len(resp.Kvs) != 1 {
					t.Fatalf("get %s: %v", key, err)
				}
				return resp.Kvs[0].Value
			}
			for _, ch := range changes {
				// Every change carries its records as written, once each.
				if ch.Job != nil && !bytes.Equal(ch.JobRecord, stored(s.jobKey(j.Seq))) {
					t.Errorf("JobRecord %q; want the stored value", ch.JobRecord)
				}
				if ch.Lease != nil && !bytes.Equal(ch.LeaseRecord, stored(s.leaseKey(l.ID))) {
					t.Errorf("LeaseRecord %q; want the stored value", ch.LeaseRecord)
				}
				if ch.Job != nil && (len(st.Jobs) != 1 || !reflect.DeepEqual(st.Jobs[0], j)) {
					t.Errorf("jobs = %+v; want [%+v]", st.Jobs, j)
				}
				if ch.Lease != nil && (len(st.Leases) != 1 || !reflect.DeepEqual(st.Leases[0], l)) {
					t.Errorf("leases = %+v; want [%+v]", st.Leases, l)
				}
				if ch.Node != nil && (len(st.Nodes) != 1 || !reflect.DeepEqual(st.Nodes[0], n)) {
					t.Errorf("nodes = %+v; want [%+v]", st.Nodes, n)
				}
			}
		})
	}
}

func TestLoadPagesThroughLargeState(t *testing.T) {
	cli := startEtcd(t)
	fence, _ := leader(t, cli, "/gpusched")
	s := New(cli, "/gpusched")
	ctx := testContext(t)
	const total = loadPageSize + 200
	// Tiny records, so this stays fast; Commit splits them into
	// transactions itself. Committed in a few calls, as the engine would.
	for from := 1; from <= total; from += 1000 {
		var changes []Change
		for i := from; i < from+1000 && i <= total; i++ {
			changes = append(changes, Change{Job: &model.Job{ID: strconv.Itoa(i), Seq: uint64(i), State: model.JobPending}})
		}
		if _, err := s.Commit(ctx, fence, changes, uint64(from+len(changes)-1)); err != nil {
			t.Fatalf("Commit: %v", err)
		}
	}
	// Written after the jobs: a load must not mix other prefixes in.
	if _, err := s.Commit(ctx, fence, []Change{{Node: node("n1")}}, 0); err != nil {
		t.Fatal(err)
	}
	st, err := s.Load(ctx)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if len(st.Jobs) != total || st.JobSeq != total || len(st.Nodes) != 1 {
		t.Fatalf("Load: %d jobs (want %d), seq %d, %d nodes", len(st.Jobs), total, st.JobSeq, len(st.Nodes))
	}
	if !sort.SliceIsSorted(st.Jobs, func(a, b int) bool { return st.Jobs[a].Seq < st.Jobs[b].Seq }) {
		t.Error("jobs are not in sequence order")
	}
	for i, j := range st.Jobs {
		if j.Seq != uint64(i+1) || j.ID != strconv.Itoa(i+1) {
			t.Fatalf("job %d is %s (seq %d); want seq %d, no gaps or repeats across pages", i, j.ID, j.Seq, i+1)
		}
	}
}

func TestLoadRejectsACorruptSequence(t *testing.T) {
	cli := startEtcd(t)
	ctx := testContext(t)
	if _, err := cli.Put(ctx, "/gpusched/meta/job_seq", "twelve"); err != nil {
		t.Fatal(err)
	}
	if _, err := New(cli, "/gpusched").Load(ctx); err == nil {
		t.Fatal("Load accepted a corrupt job sequence")
	}
}

// Each transaction's context names its Commit, so that a tool watching the
// wire can group a commit's transactions, however many it splits into.
func TestCommitOfNamesEachTransactionsCommit(t *testing.T) {
	cli := startEtcd(t)
	var (
		mu   sync.Mutex
		seen []uint64
	)
	watcher, err := clientv3.New(clientv3.Config{Endpoints: cli.Endpoints(), Logger: zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string,
			req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if n, ok := CommitOf(ctx); ok {
				mu.Lock()
				seen = append(seen, n)
				mu.Unlock()
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		})}})
	if err != nil {
		t.Fatal(err)
	}
	defer watcher.Close()
	fence, _ := leader(t, watcher, "/gpusched")
	s := New(watcher, "/gpusched")
	ctx := testContext(t)
	var big []Change
	for seq := range uint64(MaxOpsPerTxn + 10) { // two transactions
		big = append(big, Change{Job: job(seq + 1)})
	}
	for _, changes := range [][]Change{big, {{Node: node("n1")}}} {
		if _, err := s.Commit(ctx, fence, changes, 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := CommitOf(ctx); ok {
		t.Error("CommitOf names a commit for a context no Commit made")
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []uint64{1, 1, 2}; !reflect.DeepEqual(seen, want) {
		t.Errorf("the transactions' commits = %v; want %v (two transactions of commit 1, one of commit 2)", seen, want)
	}
}
