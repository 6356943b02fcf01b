package invariants

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/gpusched/gpusched/internal/embedetcd"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func startEtcd(t *testing.T) *clientv3.Client {
	t.Helper()
	srv, err := embedetcd.Start(embedetcd.Config{Dir: t.TempDir(), NoFsync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	cli, err := srv.Client(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// elect makes a real leader key and returns its fence; resign ends it.
func elect(t *testing.T, cli *clientv3.Client) (store.Fence, func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sess, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	if err != nil {
		t.Fatal(err)
	}
	el := concurrency.NewElection(sess, "/gpusched/leader")
	if err := el.Campaign(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	done := false
	resign := func() {
		if !done {
			done = true
			_ = el.Resign(context.Background())
			sess.Close()
		}
	}
	t.Cleanup(resign)
	return store.Fence{Key: el.Key(), Revision: el.Rev()}, resign
}

func job(seq uint64, state model.JobState, lease string) *model.Job {
	return &model.Job{ID: strconv.FormatUint(seq, 10), Seq: seq, State: state, LeaseID: lease,
		Spec: model.JobSpec{Nodes: 1, Command: []string{"x"}}}
}

func lease(id, jobID string, active bool, nodes ...string) *model.Lease {
	l := &model.Lease{ID: id, JobID: jobID, Active: active}
	for i, n := range nodes {
		l.Nodes = append(l.Nodes, model.LeaseNode{Node: n, Rank: i})
	}
	return l
}

func check(t *testing.T, cli *clientv3.Client, accepted ...string) *Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r, err := Check(ctx, cli, "/gpusched", accepted)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func commit(t *testing.T, s *store.Store, f store.Fence, changes ...store.Change) {
	t.Helper()
	if _, err := s.Commit(context.Background(), f, changes, 0); err != nil {
		t.Fatal(err)
	}
}

func TestAWellBehavedHistoryPasses(t *testing.T) {
	cli := startEtcd(t)
	s := store.New(cli, "/gpusched")
	f1, resign := elect(t, cli)
	j := job(1, model.JobPending, "")
	commit(t, s, f1, store.Change{Job: j})
	j.State, j.LeaseID = model.JobRunning, "1.1"
	l := lease("1.1", "1", true, "a", "b")
	commit(t, s, f1, store.Change{Job: j, Lease: l})
	resign()
	// A new leader ends the lease and reuses node a for another job.
	f2, _ := elect(t, cli)
	j.State, l.Active = model.JobSucceeded, false
	commit(t, s, f2, store.Change{Job: j, Lease: l})
	commit(t, s, f2, store.Change{Job: job(2, model.JobRunning, "2.1"), Lease: lease("2.1", "2", true, "a")})
	r := check(t, cli, "1", "2")
	if !r.OK() || r.Jobs != 2 || r.Leases != 2 || len(r.Writers) != 2 {
		t.Fatalf("report: %s", r)
	}
}

func TestViolationsAreFound(t *testing.T) {
	cases := []struct {
		name string
		// write makes the history; it returns accepted job IDs.
		write func(t *testing.T, cli *clientv3.Client, s *store.Store) []string
		want  string
	}{
		{"a node granted to two active leases", func(t *testing.T, cli *clientv3.Client, s *store.Store) []string {
			f, _ := elect(t, cli)
			commit(t, s, f, store.Change{Job: job(1, model.JobRunning, "1.1"), Lease: lease("1.1", "1", true, "a")})
			commit(t, s, f, store.Change{Job: job(2, model.JobRunning, "2.1"), Lease: lease("2.1", "2", true, "b", "a")})
			return nil
		}, "node a granted to lease 2.1 while lease 1.1 holds it"},
		{"a job with two active leases", func(t *testing.T, cli *clientv3.Client, s *store.Store) []string {
			f, _ := elect(t, cli)
			commit(t, s, f, store.Change{Job: job(1, model.JobRunning, "1.1"), Lease: lease("1.1", "1", true, "a")})
			commit(t, s, f, store.Change{Lease: lease("1.2", "1", true, "b")})
			return nil
		}, "job 1 has two active leases"},
		{"an accepted job that is not in etcd", func(t *testing.T, cli *clientv3.Client, s *store.Store) []string {
			f, _ := elect(t, cli)
			commit(t, s, f, store.Change{Job: job(1, model.JobPending, "")})
			return []string{"1", "7"}
		}, "job 7 was accepted but is not in etcd"},
		{"a job that leaves a terminal state", func(t *testing.T, cli *clientv3.Client, s *store.Store) []string {
			f, _ := elect(t, cli)
			commit(t, s, f, store.Change{Job: job(1, model.JobFailed, "")})
			commit(t, s, f, store.Change{Job: job(1, model.JobRunning, "")})
			return nil
		}, "job 1 left terminal state JOB_STATE_FAILED"},
		{"a write by a deposed leader after its successor wrote", func(t *testing.T, cli *clientv3.Client, s *store.Store) []string {
			f1, resign := elect(t, cli)
			commit(t, s, f1, store.Change{Job: job(1, model.JobPending, "")})
			resign()
			f2, _ := elect(t, cli)
			commit(t, s, f2, store.Change{Job: job(2, model.JobPending, "")})
			// What fencing prevents: an unguarded write in the old leader's name.
			b, _ := proto.Marshal(&pb.Job{Id: "3", State: pb.JobState_JOB_STATE_PENDING})
			if _, err := cli.Txn(context.Background()).Then(
				clientv3.OpPut("/gpusched/meta/writer", strconv.FormatInt(f1.Revision, 10)),
				clientv3.OpPut("/gpusched/jobs/00000000000000000003", string(b))).Commit(); err != nil {
				t.Fatal(err)
			}
			return nil
		}, "write by deposed leader"},
		{"a scheduler write without a writer token", func(t *testing.T, cli *clientv3.Client, s *store.Store) []string {
			b, _ := proto.Marshal(&pb.Job{Id: "1", State: pb.JobState_JOB_STATE_PENDING})
			if _, err := cli.Put(context.Background(), "/gpusched/jobs/00000000000000000001", string(b)); err != nil {
				t.Fatal(err)
			}
			return nil
		}, "scheduler write without a writer token"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cli := startEtcd(t)
			accepted := c.write(t, cli, store.New(cli, "/gpusched"))
			r := check(t, cli, accepted...)
			if r.OK() || !strings.Contains(strings.Join(r.Violations, "\n"), c.want) {
				t.Fatalf("want a violation containing %q; report: %s", c.want, r)
			}
		})
	}
}
