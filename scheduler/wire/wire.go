package wire

import (
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
)

// ts converts a time, keeping the zero time as "unset".
func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// fromTS converts back; nil becomes the zero time.
func fromTS(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

// JobSpecToProto converts a spec.
func JobSpecToProto(s model.JobSpec) *pb.JobSpec {
	out := &pb.JobSpec{
		Name:              s.Name,
		Tenant:            s.Tenant,
		Nodes:             int32(s.Nodes),
		GpuModel:          s.GPUModel,
		GpusPerNode:       int32(s.GPUsPerNode),
		Command:           s.Command,
		Env:               s.Env,
		MaxRetries:        proto.Int32(int32(s.MaxRetries)),
		MinGpuMemoryBytes: s.MinGPUMemoryBytes,
		Selector:          s.Selector,
		Topology:          s.Topology,
		PreferTopology:    s.PreferTopology,
		Queue:             s.Queue,
		Priority:          int32(s.Priority),
		Labels:            s.Labels,
		JobSet:            s.JobSet,
	}
	if s.TimeLimit > 0 {
		out.TimeLimit = durationpb.New(s.TimeLimit)
	}
	return out
}

// JobSpecFromProto converts a spec without validating it; an invalid
// duration becomes -1ns so that validation reports it.
func JobSpecFromProto(s *pb.JobSpec) model.JobSpec {
	if s == nil {
		return model.JobSpec{}
	}
	out := model.JobSpec{
		Name:              s.GetName(),
		Tenant:            s.GetTenant(),
		Nodes:             int(s.GetNodes()),
		GPUModel:          s.GetGpuModel(),
		GPUsPerNode:       int(s.GetGpusPerNode()),
		Command:           s.GetCommand(),
		Env:               s.GetEnv(),
		MaxRetries:        model.DefaultMaxRetries,
		MinGPUMemoryBytes: s.GetMinGpuMemoryBytes(),
		Selector:          s.GetSelector(),
		Topology:          s.GetTopology(),
		PreferTopology:    s.GetPreferTopology(),
		Queue:             s.GetQueue(),
		Priority:          int(s.GetPriority()),
		Labels:            s.GetLabels(),
		JobSet:            s.GetJobSet(),
	}
	if s.MaxRetries != nil {
		out.MaxRetries = int(s.GetMaxRetries())
	}
	if d := s.GetTimeLimit(); d != nil {
		if err := d.CheckValid(); err != nil {
			out.TimeLimit = -1
		} else {
			out.TimeLimit = d.AsDuration()
		}
	}
	return out
}

// JobToProto converts a job.
func JobToProto(j *model.Job) *pb.Job {
	out := &pb.Job{
		Id:               j.ID,
		Spec:             JobSpecToProto(j.Spec),
		State:            pb.JobState(j.State),
		Reason:           j.Reason,
		LeaseId:          j.LeaseID,
		Nodes:            j.Nodes,
		CreateTime:       ts(j.CreateTime),
		ScheduleTime:     ts(j.ScheduleTime),
		StartTime:        ts(j.StartTime),
		EndTime:          ts(j.EndTime),
		Attempts:         int32(j.Attempts),
		Retries:          int32(j.Retries),
		Events:           eventsToProto(j.Events),
		IdempotencyKey:   j.IdempotencyKey,
		Transitions:      TransitionsToProto(j.Transitions),
		LastLeaseSummary: LeaseSummaryToProto(j.LastLeaseSummary),
	}
	for _, e := range j.Exits {
		out.Exits = append(out.Exits, &pb.NodeExit{
			Node: e.Node, Rank: int32(e.Rank), ExitCode: int32(e.ExitCode),
			Signal: e.Signal, Message: e.Message, Time: ts(e.Time),
		})
	}
	return out
}

// TransitionsToProto converts a job's state changes.
func TransitionsToProto(ts []model.Transition) []*pb.JobTransition {
	out := make([]*pb.JobTransition, len(ts))
	for i, t := range ts {
		out[i] = TransitionToProto(t)
	}
	return out
}

// TransitionToProto converts one state change.
func TransitionToProto(t model.Transition) *pb.JobTransition {
	return &pb.JobTransition{Seq: int32(t.Seq), State: pb.JobState(t.State), Time: ts(t.Time), Reason: t.Reason}
}

// JobFromProto converts a stored job. seq is recovered from the ID by the
// caller (the store), which owns the key layout.
func JobFromProto(p *pb.Job) *model.Job {
	j := &model.Job{
		ID:               p.GetId(),
		Spec:             JobSpecFromProto(p.GetSpec()),
		State:            model.JobState(p.GetState()),
		Reason:           p.GetReason(),
		LeaseID:          p.GetLeaseId(),
		Nodes:            p.GetNodes(),
		CreateTime:       fromTS(p.GetCreateTime()),
		ScheduleTime:     fromTS(p.GetScheduleTime()),
		StartTime:        fromTS(p.GetStartTime()),
		EndTime:          fromTS(p.GetEndTime()),
		Attempts:         int(p.GetAttempts()),
		Retries:          int(p.GetRetries()),
		Events:           eventsFromProto(p.GetEvents()),
		IdempotencyKey:   p.GetIdempotencyKey(),
		LastLeaseSummary: LeaseSummaryFromProto(p.GetLastLeaseSummary()),
	}
	for _, t := range p.GetTransitions() {
		j.Transitions = append(j.Transitions, model.Transition{Seq: int(t.GetSeq()), State: model.JobState(t.GetState()), Time: fromTS(t.GetTime()), Reason: t.GetReason()})
	}
	for _, e := range p.GetExits() {
		j.Exits = append(j.Exits, model.NodeExit{
			Node: e.GetNode(), Rank: int(e.GetRank()), ExitCode: int(e.GetExitCode()),
			Signal: e.GetSignal(), Message: e.GetMessage(), Time: fromTS(e.GetTime()),
		})
	}
	return j
}

// InventoryToProto converts an inventory.
func InventoryToProto(inv model.Inventory) *pb.Inventory {
	out := &pb.Inventory{
		GpuModel:       inv.GPUModel,
		GpuCount:       int32(inv.GPUCount),
		GpuMemoryBytes: inv.GPUMemoryBytes,
		DriverVersion:  inv.DriverVersion,
		CudaVersion:    inv.CUDAVersion,
		Hostname:       inv.Hostname,
	}
	for _, g := range inv.GPUs {
		out.Gpus = append(out.Gpus, &pb.Gpu{
			Index: int32(g.Index), Uuid: g.UUID, Name: g.Name,
			MemoryBytes: g.MemoryBytes, PciBusId: g.PCIBusID,
		})
	}
	return out
}

// InventoryFromProto converts an inventory.
func InventoryFromProto(p *pb.Inventory) model.Inventory {
	inv := model.Inventory{
		GPUModel:       p.GetGpuModel(),
		GPUCount:       int(p.GetGpuCount()),
		GPUMemoryBytes: p.GetGpuMemoryBytes(),
		DriverVersion:  p.GetDriverVersion(),
		CUDAVersion:    p.GetCudaVersion(),
		Hostname:       p.GetHostname(),
	}
	for _, g := range p.GetGpus() {
		inv.GPUs = append(inv.GPUs, model.GPU{
			Index: int(g.GetIndex()), UUID: g.GetUuid(), Name: g.GetName(),
			MemoryBytes: g.GetMemoryBytes(), PCIBusID: g.GetPciBusId(),
		})
	}
	return inv
}

// NodeToProto converts a node.
func NodeToProto(n *model.Node) *pb.Node {
	return &pb.Node{
		Id:             n.ID,
		Inventory:      InventoryToProto(n.Inventory),
		State:          pb.NodeState(n.State),
		Labels:         n.EffectiveLabels(),
		OperatorLabels: n.OperatorLabels,
		LeaseId:        n.LeaseID,
		JobId:          n.JobID,
		Connected:      n.Connected,
		Address:        n.Address,
		RegisterTime:   ts(n.RegisterTime),
		Reason:         n.Reason,
		Drain:          n.Drain,
		DrainReason:    n.DrainReason,
		Events:         eventsToProto(n.Events),
	}
}

// NodeFromProto converts a stored node.
func NodeFromProto(p *pb.Node) *model.Node {
	return &model.Node{
		ID:             p.GetId(),
		Inventory:      InventoryFromProto(p.GetInventory()),
		State:          model.NodeState(p.GetState()),
		Labels:         agentLabels(p),
		OperatorLabels: p.GetOperatorLabels(),
		LeaseID:        p.GetLeaseId(),
		JobID:          p.GetJobId(),
		Connected:      p.GetConnected(),
		Address:        p.GetAddress(),
		RegisterTime:   fromTS(p.GetRegisterTime()),
		Reason:         p.GetReason(),
		Drain:          p.GetDrain(),
		DrainReason:    p.GetDrainReason(),
		Events:         eventsFromProto(p.GetEvents()),
	}
}

// LeaseToProto converts a lease.
func LeaseToProto(l *model.Lease) *pb.Lease {
	out := &pb.Lease{
		Id:           l.ID,
		JobId:        l.JobID,
		Tenant:       l.Tenant,
		State:        pb.LeaseState_LEASE_STATE_ENDED,
		FencingToken: l.FencingToken,
		StartTime:    ts(l.StartTime),
		EndTime:      ts(l.EndTime),
		EndReason:    l.EndReason,
		Summary:      LeaseSummaryToProto(l.Summary),
	}
	if l.Active {
		out.State = pb.LeaseState_LEASE_STATE_ACTIVE
	}
	for _, n := range l.Nodes {
		out.Nodes = append(out.Nodes, &pb.LeaseNode{
			Node: n.Node, Rank: int32(n.Rank), GpuModel: n.GPUModel,
			GpuCount: int32(n.GPUCount), GpuUuids: n.GPUUUIDs, Cleanup: n.Cleanup,
		})
	}
	return out
}

// LeaseFromProto converts a stored lease.
func LeaseFromProto(p *pb.Lease) *model.Lease {
	l := &model.Lease{
		ID:           p.GetId(),
		JobID:        p.GetJobId(),
		Tenant:       p.GetTenant(),
		Active:       p.GetState() == pb.LeaseState_LEASE_STATE_ACTIVE,
		FencingToken: p.GetFencingToken(),
		StartTime:    fromTS(p.GetStartTime()),
		EndTime:      fromTS(p.GetEndTime()),
		EndReason:    p.GetEndReason(),
		Summary:      LeaseSummaryFromProto(p.GetSummary()),
	}
	for _, n := range p.GetNodes() {
		l.Nodes = append(l.Nodes, model.LeaseNode{
			Node: n.GetNode(), Rank: int(n.GetRank()), GPUModel: n.GetGpuModel(),
			GPUCount: int(n.GetGpuCount()), GPUUUIDs: n.GetGpuUuids(), Cleanup: n.GetCleanup(),
		})
	}
	return l
}

// EventToProto converts a node event.
func EventToProto(e model.NodeEvent) *pb.NodeEvent {
	return &pb.NodeEvent{
		Time: ts(e.Time), Kind: pb.NodeEventKind(e.Kind), Node: e.Node, Gpu: int32(e.GPU),
		LeaseId: e.LeaseID, Pid: e.PID, Xid: e.XID, Action: e.Action, Message: e.Message,
	}
}

// EventFromProto converts a node event.
func EventFromProto(p *pb.NodeEvent) model.NodeEvent {
	return model.NodeEvent{
		Time: fromTS(p.GetTime()), Kind: model.NodeEventKind(p.GetKind()), Node: p.GetNode(), GPU: int(p.GetGpu()),
		LeaseID: p.GetLeaseId(), PID: p.GetPid(), XID: p.GetXid(), Action: p.GetAction(), Message: p.GetMessage(),
	}
}

func eventsToProto(es []model.NodeEvent) []*pb.NodeEvent {
	var out []*pb.NodeEvent
	for _, e := range es {
		out = append(out, EventToProto(e))
	}
	return out
}

func eventsFromProto(ps []*pb.NodeEvent) []model.NodeEvent {
	var out []model.NodeEvent
	for _, p := range ps {
		out = append(out, EventFromProto(p))
	}
	return out
}

// agentLabels recovers the agent's own labels from a stored node, whose
// labels field is the merged view: operator labels override, and the
// agent re-reports its labels at every hello anyway.
func agentLabels(p *pb.Node) map[string]string {
	if len(p.GetOperatorLabels()) == 0 {
		return p.GetLabels()
	}
	out := map[string]string{}
	for k, v := range p.GetLabels() {
		if _, op := p.GetOperatorLabels()[k]; !op {
			out[k] = v
		}
	}
	return out
}

// TenantToProto converts a tenant.
func TenantToProto(t model.Tenant) *pb.Tenant {
	out := &pb.Tenant{Name: t.Name, MaxNodes: int32(t.MaxNodes), Weight: t.Weight}
	for m, n := range t.MaxNodesPerModel {
		if out.MaxNodesPerModel == nil {
			out.MaxNodesPerModel = map[string]int32{}
		}
		out.MaxNodesPerModel[m] = int32(n)
	}
	return out
}

// TenantFromProto converts a tenant without validating it.
func TenantFromProto(p *pb.Tenant) model.Tenant {
	t := model.Tenant{Name: p.GetName(), MaxNodes: int(p.GetMaxNodes()), Weight: p.GetWeight()}
	for m, n := range p.GetMaxNodesPerModel() {
		if t.MaxNodesPerModel == nil {
			t.MaxNodesPerModel = map[string]int{}
		}
		t.MaxNodesPerModel[m] = int(n)
	}
	return t
}

// QueueToProto converts a queue.
func QueueToProto(q model.Queue) *pb.Queue {
	return &pb.Queue{Name: q.Name, Priority: int32(q.Priority), Weight: q.Weight, Paused: q.Paused}
}

// QueueFromProto converts a queue without validating it.
func QueueFromProto(p *pb.Queue) model.Queue {
	return model.Queue{Name: p.GetName(), Priority: int(p.GetPriority()), Weight: p.GetWeight(), Paused: p.GetPaused()}
}

// IdempotencyToProto converts an idempotency record.
func IdempotencyToProto(r model.Idempotency) *pb.IdempotencyRecord {
	return &pb.IdempotencyRecord{Tenant: r.Tenant, Key: r.Key, JobId: r.JobID, CreateTime: ts(r.CreateTime)}
}

// IdempotencyFromProto converts an idempotency record.
func IdempotencyFromProto(p *pb.IdempotencyRecord) model.Idempotency {
	return model.Idempotency{Tenant: p.GetTenant(), Key: p.GetKey(), JobID: p.GetJobId(), CreateTime: fromTS(p.GetCreateTime())}
}
