package engine_test

import (
	"fmt"
	"reflect"
	"testing"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/placement"
)

// The usage each tenant holds is kept as leases are granted and end, not
// recounted per cycle; it must always equal a fresh count over the nodes,
// free a tenant's quota when its lease ends, and be rebuilt by a new term.
func TestTenantUsageFollowsLeasesAcrossATerm(t *testing.T) {
	etcd := schedtest.StartEtcd(t)
	tm := startTerm(t, etcd.Client, engine.Config{})
	ctx := schedtest.Context(t)
	if _, err := tm.eng.SetTenant(ctx, model.Tenant{Name: "acme", MaxNodes: 1, Weight: 1}); err != nil {
		t.Fatal(err)
	}
	streams := map[string]*memStream{}
	connect := func(node, gpuModel string) { streams[node], _ = connectAgent(t, tm, node, gpuModel) }
	connect("n1", "H100")
	connect("n2", "H100")
	connect("n3", "A100")

	submit := func(tenant, gpuModel string) *model.Job {
		t.Helper()
		sp := spec(1)
		sp.Tenant, sp.GPUModel = tenant, gpuModel
		j, err := tm.eng.Submit(ctx, sp)
		if err != nil {
			t.Fatal(err)
		}
		return j
	}
	waitState := func(id string, want model.JobState) *model.Job {
		t.Helper()
		var j *model.Job
		schedtest.Eventually(t, fmt.Sprintf("job %s %s", id, want), func() (bool, string) {
			got, err := tm.eng.GetJob(id)
			if err != nil {
				return false, err.Error()
			}
			j = got
			return got.State == want, got.State.String() + " " + got.Reason
		})
		return j
	}
	expect := func(when string, want map[string]placement.Usage) {
		t.Helper()
		kept, counted := tm.eng.Usage()
		if !reflect.DeepEqual(kept, counted) {
			t.Errorf("%s: usage kept %v; counted over the nodes %v", when, kept, counted)
		}
		if !reflect.DeepEqual(kept, want) {
			t.Errorf("%s: usage %v; want %v", when, kept, want)
		}
	}

	first := waitState(submit("acme", "H100").ID, model.JobScheduled)
	second := submit("acme", "H100")
	waitState(submit("beta", "A100").ID, model.JobScheduled)
	if j, _ := tm.eng.GetJob(second.ID); j.State != model.JobPending {
		t.Fatalf("acme's second job is %s; want PENDING at acme's quota of 1 node", j.State)
	}
	expect("two leases", map[string]placement.Usage{
		"acme": {Nodes: 1, PerModel: map[string]int{"H100": 1}},
		"beta": {Nodes: 1, PerModel: map[string]int{"A100": 1}},
	})

	// acme's first job ends: its node is no longer counted, so the second
	// fits the quota and starts on the other H100 node.
	st := streams[first.Nodes[0]]
	st.in <- &pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseStarted{LeaseStarted: &pb.LeaseStarted{LeaseId: first.LeaseID}}}
	st.in <- &pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseExited{LeaseExited: &pb.LeaseExited{LeaseId: first.LeaseID}}}
	waitState(first.ID, model.JobSucceeded)
	waitState(second.ID, model.JobScheduled)
	expect("the first ended, the second started", map[string]placement.Usage{
		"acme": {Nodes: 1, PerModel: map[string]int{"H100": 1}},
		"beta": {Nodes: 1, PerModel: map[string]int{"A100": 1}},
	})
	beta, err := tm.eng.ListJobs(engine.JobFilter{Selector: model.JobSelector{Tenants: []string{"beta"}}})
	if err != nil || len(beta.Jobs) != 1 {
		t.Fatalf("beta's jobs: %v, %v", beta.Jobs, err)
	}
	if _, err := tm.eng.Cancel(ctx, beta.Jobs[0].ID, "done with it"); err != nil {
		t.Fatal(err)
	}
	expect("beta's job cancelled", map[string]placement.Usage{
		"acme": {Nodes: 1, PerModel: map[string]int{"H100": 1}},
	})
	if got := tm.eng.ListTenants(); len(got) != 1 || got[0].Tenant.Name != "acme" || got[0].Nodes != 1 ||
		got[0].NodesPerModel["H100"] != 1 {
		t.Errorf("ListTenants() = %+v; want acme holding 1 H100 node (beta, with no quota and no live job, unlisted)", got)
	}

	// A new term rebuilds usage from the leases it loads.
	for _, st := range streams {
		st.cancel()
	}
	tm.stop(t)
	if err := tm.el.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	tm = startTerm(t, etcd.Client, engine.Config{})
	expect("a new term", map[string]placement.Usage{
		"acme": {Nodes: 1, PerModel: map[string]int{"H100": 1}},
	})
}
