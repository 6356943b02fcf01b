package engine_test

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
	"github.com/gpusched/gpusched/scheduler/wire"
)

// An ended job is kept encoded once its end is committed; every read
// (get, list with any selector, an idempotent retry, a new term's load)
// still returns the whole job, exactly as it was when it ended.
func TestEndedJobsAreArchivedAndReadWhole(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	cfg := engine.Config{}
	tm := startTerm(t, etcd.Client, cfg)
	ctx := schedtest.Context(t)

	sp := spec(2)
	sp.JobSet, sp.Labels = "sweep-b", map[string]string{"team": "vision"}
	sp.Env = map[string]string{"LR": "0.1"}
	sp.Tenant = "acme"
	submitted, err := tm.eng.SubmitIdempotent(ctx, sp, "order-9")
	if err != nil {
		t.Fatal(err)
	}
	ended, err := tm.eng.Cancel(ctx, submitted.ID, "not needed")
	if err != nil {
		t.Fatal(err)
	}
	pending, err := tm.eng.Submit(ctx, spec(1))
	if err != nil {
		t.Fatal(err)
	}
	same := func(what string, got *model.Job) {
		t.Helper()
		if !proto.Equal(wire.JobToProto(got), wire.JobToProto(ended)) {
			t.Errorf("%s:\n%v\nwant the job as it ended:\n%v", what, wire.JobToProto(got), wire.JobToProto(ended))
		}
	}
	if !tm.eng.Archived(ended.ID) {
		t.Fatalf("job %s ended and committed but is not archived", ended.ID)
	}
	if tm.eng.Archived(pending.ID) {
		t.Fatalf("pending job %s is archived", pending.ID)
	}
	got, err := tm.eng.GetJob(ended.ID)
	if err != nil {
		t.Fatal(err)
	}
	same("GetJob", got)
	for _, sel := range []model.JobSelector{
		{JobSet: "sweep-b"},
		{Labels: map[string]string{"team": "vision"}},
		{Tenants: []string{"acme"}, States: []model.JobState{model.JobCancelled}},
		{IDs: []string{ended.ID}},
	} {
		page, err := tm.eng.ListJobs(engine.JobFilter{Selector: sel})
		if err != nil {
			t.Fatal(err)
		}
		if len(page.Jobs) != 1 {
			t.Fatalf("ListJobs(%+v) = %d jobs; want the archived one", sel, len(page.Jobs))
		}
		same("ListJobs", page.Jobs[0])
	}
	retry, err := tm.eng.SubmitIdempotent(ctx, sp, "order-9")
	if err != nil {
		t.Fatal(err)
	}
	same("an idempotent retry", retry)
	if _, err := tm.eng.Cancel(ctx, ended.ID, ""); !errors.Is(err, model.ErrJobEnded) {
		t.Errorf("cancelling the archived job = %v; want ErrJobEnded", err)
	}

	// A new term reads ended jobs from etcd straight into the archive.
	tm.stop(t)
	if err := tm.el.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	tm = startTerm(t, etcd.Client, cfg)
	if !tm.eng.Archived(ended.ID) || tm.eng.Archived(pending.ID) {
		t.Fatalf("after a new term: job %s archived %v, job %s archived %v; want only the ended one",
			ended.ID, tm.eng.Archived(ended.ID), pending.ID, tm.eng.Archived(pending.ID))
	}
	got, err = tm.eng.GetJob(ended.ID)
	if err != nil {
		t.Fatal(err)
	}
	same("GetJob in a new term", got)
	if st := tm.eng.Stats(); st.Jobs[model.JobCancelled] != 1 || st.Jobs[model.JobPending] != 1 {
		t.Errorf("Stats().Jobs = %v; want 1 cancelled (archived) and 1 pending", st.Jobs)
	}
}

// An ended lease is archived once every node reported it clean; reads
// (logs use them) get the whole lease, as etcd holds it, and a new term
// archives it from the record it loads.
func TestCleanEndedLeasesAreArchived(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	cfg := engine.Config{}
	tm := startTerm(t, etcd.Client, cfg)
	ctx := schedtest.Context(t)
	st, served := connectAgent(t, tm, "n1", "H100")
	j, err := tm.eng.Submit(ctx, spec(1))
	if err != nil {
		t.Fatal(err)
	}
	await := func(what string, pred func(*pb.ConnectResponse) bool) {
		t.Helper()
		awaitMessage(t, st, served, what, pred)
	}
	lease := model.LeaseID(j.ID, 1)
	await("StartLease", func(m *pb.ConnectResponse) bool { return m.GetStartLease().GetLeaseId() == lease })
	st.in <- &pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseStarted{LeaseStarted: &pb.LeaseStarted{LeaseId: lease}}}
	st.in <- &pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseExited{LeaseExited: &pb.LeaseExited{LeaseId: lease}}}
	await("ReleaseLease", func(m *pb.ConnectResponse) bool { return m.GetReleaseLease().GetLeaseId() == lease })
	if archived, _, _ := tm.eng.LeaseArchived(lease); archived {
		t.Fatalf("lease %s archived before its node reported it clean", lease)
	}
	st.in <- &pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseReleased{LeaseReleased: &pb.LeaseReleased{LeaseId: lease, Clean: true}}}
	var got *model.Lease
	schedtest.Eventually(t, "the clean lease to be archived", func() (bool, string) {
		archived, l, err := tm.eng.LeaseArchived(lease)
		got = l
		return archived && err == nil, fmt.Sprintf("archived %v, %v", archived, err)
	})
	stored := func() *pb.Lease {
		st, err := store.New(etcd.Client, "/gpusched").Load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range st.Leases {
			if l.ID == lease {
				return wire.LeaseToProto(l)
			}
		}
		t.Fatalf("lease %s not in etcd", lease)
		return nil
	}()
	if !proto.Equal(wire.LeaseToProto(got), stored) || len(got.Nodes) != 1 || got.Nodes[0].Cleanup != "clean" {
		t.Errorf("the archived lease reads as\n%v\nwant it as etcd holds it:\n%v", wire.LeaseToProto(got), stored)
	}

	// An event the node reports on the archived lease still reaches the
	// archived job: it is brought back, changed, persisted and archived again.
	if !tm.eng.Archived(j.ID) {
		t.Fatalf("job %s ended and committed but is not archived", j.ID)
	}
	st.in <- &pb.ConnectRequest{Msg: &pb.ConnectRequest_NodeEvent{NodeEvent: &pb.NodeEvent{
		Kind: pb.NodeEventKind_NODE_EVENT_KIND_XID, Gpu: 3, Xid: 13, LeaseId: lease, Message: "late XID",
	}}}
	schedtest.Eventually(t, "the late event on the ended job", func() (bool, string) {
		v, err := tm.eng.GetJob(j.ID)
		if err != nil {
			return false, err.Error()
		}
		return len(v.Events) == 1 && v.Events[0].Message == "late XID" && tm.eng.Archived(j.ID),
			fmt.Sprintf("events %v, archived %v", v.Events, tm.eng.Archived(j.ID))
	})
	if archived, _, _ := tm.eng.LeaseArchived(lease); !archived {
		t.Errorf("lease %s is no longer archived after an event on it", lease)
	}

	st.cancel()
	tm.stop(t)
	if err := tm.el.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	tm = startTerm(t, etcd.Client, cfg)
	if archived, l, err := tm.eng.LeaseArchived(lease); !archived || err != nil || !proto.Equal(wire.LeaseToProto(l), stored) {
		t.Errorf("after a new term: archived %v, %v, lease %v; want it archived and whole", archived, err, l)
	}
}

// Listing pages through live and archived jobs together, in ID order.
func TestListingMixesLiveAndArchivedJobsInOrder(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	tm := startTerm(t, etcd.Client, engine.Config{})
	ctx := schedtest.Context(t)
	var ids []string
	for i := range 5 {
		j, err := tm.eng.Submit(ctx, spec(1))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, j.ID)
		if i%2 == 1 {
			if _, err := tm.eng.Cancel(ctx, j.ID, ""); err != nil {
				t.Fatal(err)
			}
		}
	}
	schedtest.Eventually(t, "the cancelled jobs to be archived", func() (bool, string) {
		return tm.eng.Archived(ids[1]) && tm.eng.Archived(ids[3]), ""
	})
	for _, tc := range []struct {
		name string
		sel  model.JobSelector
		want []string
	}{
		{"every job", model.JobSelector{}, ids},
		{"only the archived ones", model.JobSelector{States: []model.JobState{model.JobCancelled}}, []string{ids[1], ids[3]}},
		{"only the live ones", model.JobSelector{States: []model.JobState{model.JobPending}}, []string{ids[0], ids[2], ids[4]}},
		{"IDs named out of order and twice", model.JobSelector{IDs: []string{ids[3], ids[0], ids[3], "0" + ids[1]}}, []string{ids[0], ids[3]}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			token := ""
			for range len(ids) + 1 {
				page, err := tm.eng.ListJobs(engine.JobFilter{Selector: tc.sel, PageSize: 2, PageToken: token})
				if err != nil {
					t.Fatal(err)
				}
				for _, j := range page.Jobs {
					got = append(got, j.ID)
				}
				if token = page.NextPageToken; token == "" {
					break
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("listed %v; want %v", got, tc.want)
			}
		})
	}
}
