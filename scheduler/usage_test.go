package scheduler_test

import (
	"fmt"
	"math"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
	"github.com/gpusched/gpusched/scheduler/store"
	"github.com/gpusched/gpusched/scheduler/wire"
)

// sendTelemetry has a fake agent report one round of samples taken at
// second sec (of a fixed epoch) under lease: GPU i at utils[i] percent,
// 360 W and i GiB of framebuffer.
func sendTelemetry(t *testing.T, a *schedtest.Agent, lease string, sec int64, utils ...uint32) {
	t.Helper()
	b := &pb.TelemetryBatch{Time: timestamppb.New(time.Unix(1_700_000_000+sec, 0)), LeaseId: lease}
	if lease != "" {
		b.JobId = lease[:len(lease)-2]
	}
	for i, u := range utils {
		b.Samples = append(b.Samples, &pb.GpuSample{Gpu: int32(i), GpuUtil: u, PowerUsageMilliwatts: 360_000, FbUsedBytes: uint64(i) << 30})
	}
	if err := a.Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Telemetry{Telemetry: b}}); err != nil {
		t.Fatal(err)
	}
}

func sendEvent(t *testing.T, a *schedtest.Agent, lease string, kind pb.NodeEventKind) {
	t.Helper()
	ev := &pb.NodeEvent{Kind: kind, Gpu: 0, LeaseId: lease, Xid: 13, Pid: 777, Action: "reported"}
	if err := a.Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_NodeEvent{NodeEvent: ev}}); err != nil {
		t.Fatal(err)
	}
}

// storedLease reads a lease as etcd holds it.
func storedLease(t *testing.T, c *schedtest.Cluster, id string) *pb.Lease {
	t.Helper()
	st, err := store.New(c.Etcd.Client, "/gpusched").Load(schedtest.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range st.Leases {
		if l.ID == id {
			return wire.LeaseToProto(l)
		}
	}
	t.Fatalf("lease %s not in etcd", id)
	return nil
}

// checkSummary compares a summary with want, the floating-point figures
// within 1e-9, GPU-hours against the lease's own span.
func checkSummary(t *testing.T, what string, got, want *pb.LeaseSummary, lease *pb.Lease) {
	t.Helper()
	gpus := 0
	for _, n := range lease.GetNodes() {
		gpus += int(n.GetGpuCount())
	}
	wantHours := float64(gpus) * lease.GetEndTime().AsTime().Sub(lease.GetStartTime().AsTime()).Hours()
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	if got.GetLeaseId() != want.GetLeaseId() || !near(got.GetGpuHours(), wantHours) || got.GetGpuHours() <= 0 ||
		!near(got.GetMeanGpuUtil(), want.GetMeanGpuUtil()) || got.GetPeakGpuUtil() != want.GetPeakGpuUtil() ||
		got.GetPeakFbUsedBytes() != want.GetPeakFbUsedBytes() || !near(got.GetEnergyWh(), want.GetEnergyWh()) ||
		got.GetXidEvents() != want.GetXidEvents() || got.GetForeignProcessEvents() != want.GetForeignProcessEvents() ||
		got.GetSamples() != want.GetSamples() || !got.GetFirstSampleTime().AsTime().Equal(want.GetFirstSampleTime().AsTime()) ||
		!got.GetLastSampleTime().AsTime().Equal(want.GetLastSampleTime().AsTime()) {
		t.Errorf("%s summary = %v\nwant %v (GPU-hours %g)", what, got, want, wantHours)
	}
}

func at(sec int64) *timestamppb.Timestamp { return timestamppb.New(time.Unix(1_700_000_000+sec, 0)) }

func TestAJobEndsWithAUsageSummaryOnItsLeaseAndJob(t *testing.T) {
	c := cluster(t, 2, schedtest.AgentConfig{}, engine.Config{})
	spec := schedtest.Spec(2)
	spec.Tenant = "acme"
	j := schedtest.Submit(t, c.Replica.Jobs, spec)
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	if running.GetLastLeaseSummary() != nil {
		t.Errorf("a running job already has a summary: %v", running.GetLastLeaseSummary())
	}
	lease := running.GetLeaseId()
	// Each node: two GPUs (50% and 100%, 360 W each) for 20 s.
	for _, node := range running.GetNodes() {
		a := c.Agent(node)
		for sec := int64(0); sec <= 20; sec += 10 {
			sendTelemetry(t, a, lease, sec, 50, 100)
		}
	}
	sendTelemetry(t, c.Agents[0], "", 30, 100, 100) // no lease: counts for none
	first := c.Agent(running.GetNodes()[0])
	sendEvent(t, first, lease, pb.NodeEventKind_NODE_EVENT_KIND_XID)
	sendEvent(t, first, lease, pb.NodeEventKind_NODE_EVENT_KIND_FOREIGN_PROCESS)
	sendEvent(t, first, lease, pb.NodeEventKind_NODE_EVENT_KIND_XID)
	// Exits follow the samples and events on each agent's stream, so the
	// leader has them all when the lease ends.
	for _, node := range running.GetNodes() {
		c.Agent(node).Exit(lease, 0, "")
	}
	done := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)

	stored := storedLease(t, c, lease)
	want := &pb.LeaseSummary{
		LeaseId: lease, MeanGpuUtil: 75, PeakGpuUtil: 100, PeakFbUsedBytes: 1 << 30,
		EnergyWh:  4 * 2, // four GPUs at 360 W for 20 s, 2 Wh each
		XidEvents: 2, ForeignProcessEvents: 1, Samples: 12, FirstSampleTime: at(0), LastSampleTime: at(20),
	}
	checkSummary(t, "lease", stored.GetSummary(), want, stored)
	if !proto.Equal(done.GetLastLeaseSummary(), stored.GetSummary()) {
		t.Errorf("the job's summary %v is not its lease's %v", done.GetLastLeaseSummary(), stored.GetSummary())
	}
}

func TestTelemetryIsStreamedByTenantAndQueriedThroughAStandby(t *testing.T) {
	c := cluster(t, 2, schedtest.AgentConfig{}, engine.Config{})
	standby := schedtest.StartReplica(t, scheduler.Config{Etcd: c.Etcd.Client, Name: "replica-2", Engine: engine.Config{KillGrace: killGrace}})
	spec := schedtest.Spec(1)
	spec.Tenant = "acme"
	j := schedtest.Submit(t, c.Replica.Jobs, spec)
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	held, idle := c.Agent(running.GetNodes()[0]), c.Agents[0]
	if idle == held {
		idle = c.Agents[1]
	}
	ctx := schedtest.Context(t)
	tel := pb.NewTelemetryServiceClient(standby.Conn)
	stream, err := tel.StreamTelemetry(ctx, &pb.StreamTelemetryRequest{Tenant: "acme", Fields: []string{"gpu_util"}})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := stream.Recv(); err != nil || !m.GetSnapshotComplete() || len(m.GetSamples()) != 0 {
		t.Fatalf("first message = %v, %v; want an empty, complete snapshot", m, err)
	}
	sendTelemetry(t, idle, "", 1, 10)                       // no tenant: filtered out
	sendTelemetry(t, held, running.GetLeaseId(), 1, 60, 70) // acme's
	m, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%s/acme/%s: 60,70", held.NodeID(), running.GetLeaseId())
	got := fmt.Sprintf("%s/%s/%s:", m.GetSamples()[0].GetNode(), m.GetSamples()[0].GetTenant(), m.GetSamples()[0].GetLeaseId())
	for i, s := range m.GetSamples() {
		if s.GetSample().GetPowerUsageMilliwatts() != 0 {
			t.Errorf("sample %d carries a field not asked for: %v", i, s.GetSample())
		}
		sep := ","
		if i == 0 {
			sep = " "
		}
		got += fmt.Sprintf("%s%d", sep, s.GetSample().GetGpuUtil())
	}
	if got != want || m.GetSnapshot() {
		t.Errorf("live message = %s (snapshot %v); want %s", got, m.GetSnapshot(), want)
	}

	hist, err := tel.GetTelemetry(ctx, &pb.GetTelemetryRequest{JobId: j.GetId()})
	if err != nil {
		t.Fatal(err)
	}
	if len(hist.GetSamples()) != 2 || hist.GetSamples()[0].GetTenant() != "acme" || hist.GetTruncated() {
		t.Errorf("GetTelemetry of the job = %v; want its 2 samples", hist)
	}
}

func TestALeaseSummaryKeepsWhatItCanAcrossAFailover(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{}, engine.Config{})
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(1))
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	lease, a := running.GetLeaseId(), c.Agents[0]
	sendTelemetry(t, a, lease, 0, 100)
	sendTelemetry(t, a, lease, 10, 100)
	sendEvent(t, a, lease, pb.NodeEventKind_NODE_EVENT_KIND_XID)
	schedtest.WaitJob(t, c.Replica.Jobs, j.GetId(), "the XID on the job", func(j *pb.Job) bool { return len(j.GetEvents()) == 1 })

	c.Replica.Stop(t)
	r2 := schedtest.StartReplica(t, scheduler.Config{Etcd: c.Etcd.Client, Name: "replica-2", Engine: engine.Config{KillGrace: killGrace}})
	r2.WaitLeader(t)
	a.Reconnect(r2.Addr)
	schedtest.WaitNodes(t, r2.Nodes, 1, func(n *pb.Node) bool { return n.GetConnected() })
	sendTelemetry(t, a, lease, 20, 40)
	sendTelemetry(t, a, lease, 30, 40)
	a.Exit(lease, 0, "")
	done := schedtest.WaitJobState(t, r2.Jobs, j.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)

	// The event count was persisted with the lease; the samples the first
	// leader received are lost, so the figures cover seconds 20 to 30.
	stored := storedLease(t, c, lease)
	want := &pb.LeaseSummary{
		LeaseId: lease, MeanGpuUtil: 40, PeakGpuUtil: 40, EnergyWh: 1, XidEvents: 1,
		Samples: 2, FirstSampleTime: at(20), LastSampleTime: at(30),
	}
	checkSummary(t, "lease", stored.GetSummary(), want, stored)
	if !proto.Equal(done.GetLastLeaseSummary(), stored.GetSummary()) {
		t.Errorf("the job's summary %v is not its lease's %v", done.GetLastLeaseSummary(), stored.GetSummary())
	}
}

// An event a node reports on a lease after its job ended (and was archived,
// kept encoded) joins the job's events, and etcd keeps the whole job.
func TestAnEventAfterTheJobEndedJoinsItsArchivedJob(t *testing.T) {
	c := cluster(t, 1, schedtest.AgentConfig{}, engine.Config{})
	spec := schedtest.Spec(1)
	spec.Env = map[string]string{"LR": "0.1"}
	j := schedtest.Submit(t, c.Replica.Jobs, spec)
	running := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_RUNNING)
	lease, a := running.GetLeaseId(), c.Agents[0]
	a.Exit(lease, 0, "")
	done := schedtest.WaitJobState(t, c.Replica.Jobs, j.GetId(), pb.JobState_JOB_STATE_SUCCEEDED)
	if len(done.GetEvents()) != 0 {
		t.Fatalf("events before = %v", done.GetEvents())
	}
	sendEvent(t, a, lease, pb.NodeEventKind_NODE_EVENT_KIND_XID)
	got := schedtest.WaitJob(t, c.Replica.Jobs, j.GetId(), "to carry the late event", func(j *pb.Job) bool { return len(j.GetEvents()) == 1 })
	if got.GetSpec().GetEnv()["LR"] != "0.1" || got.GetState() != pb.JobState_JOB_STATE_SUCCEEDED || len(got.GetTransitions()) != len(done.GetTransitions()) {
		t.Errorf("the job after the late event = %v; want it whole, as it ended, plus the event", got)
	}
	st, err := store.New(c.Etcd.Client, "/gpusched").Load(schedtest.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, sj := range st.Jobs {
		if sj.ID == j.GetId() && (sj.Spec.Env["LR"] != "0.1" || len(sj.Events) != 1 || len(sj.Spec.Command) == 0) {
			t.Errorf("etcd holds %+v; want the whole job with its one event", sj)
		}
	}
}
