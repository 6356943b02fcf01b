package engine

import (
	"container/heap"
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"go.uber.org/zap"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/placement"
	"github.com/gpusched/gpusched/scheduler/store"
)

// result carries a job (or an error) back to an RPC handler.
type result struct {
	job *model.Job
	err error
}

// await waits for the loop's answer, or for the term to end.
func (e *Engine) await(ctx context.Context, ch <-chan result) (*model.Job, error) {
	select {
	case r := <-ch:
		return r.job, r.err
	case <-e.stopped:
		return nil, model.ErrStopped
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// SubmitItem is one job of a submission: a spec and an optional
// idempotency key.
type SubmitItem struct {
	Spec           model.JobSpec
	IdempotencyKey string
}

// SubmitResult is the outcome of one SubmitItem: the job, or why not.
type SubmitResult struct {
	Job *model.Job
	Err error
}

type submitEvent struct {
	items []SubmitItem
	// results is filled in before apply for items that failed validation;
	// apply fills in the rest.
	results []SubmitResult
	reply   chan []SubmitResult
}

// Submit records a validated job spec and returns the PENDING job once it
// is durable in etcd.
func (e *Engine) Submit(ctx context.Context, spec model.JobSpec) (*model.Job, error) {
	return e.SubmitIdempotent(ctx, spec, "")
}

// SubmitIdempotent is Submit with an idempotency key: if the spec's tenant
// used key within the retention window, the job created then is returned
// and nothing new is created. The key and the job land in one transaction,
// and the loop applies submits one at a time, so concurrent retries and a
// retry after a leader failover all find the same job.
func (e *Engine) SubmitIdempotent(ctx context.Context, spec model.JobSpec, key string) (*model.Job, error) {
	res, err := e.SubmitBatch(ctx, []SubmitItem{{Spec: spec, IdempotencyKey: key}})
	if err != nil {
		return nil, err
	}
	return res[0].Job, res[0].Err
}

// SubmitBatch submits up to model.MaxSubmitBatch jobs in one turn of the
// loop, so they share one group commit. Each item succeeds or fails on its
// own; the results are in item order. The error is for the batch as a
// whole (too large, the term ended, ctx done).
func (e *Engine) SubmitBatch(ctx context.Context, items []SubmitItem) ([]SubmitResult, error) {
	if err := model.ValidateBatchSize(len(items)); err != nil {
		return nil, err
	}
	ev := &submitEvent{items: make([]SubmitItem, len(items)), results: make([]SubmitResult, len(items)), reply: make(chan []SubmitResult, 1)}
	for i, it := range items {
		spec, err := model.NormalizeJobSpec(it.Spec)
		if err == nil {
			err = model.ValidateIdempotencyKey(it.IdempotencyKey)
		}
		ev.items[i] = SubmitItem{Spec: spec, IdempotencyKey: it.IdempotencyKey}
		ev.results[i].Err = err
	}
	if err := e.post(ctx, ev); err != nil {
		return nil, err
	}
	select {
	case r := <-ev.reply:
		return r, nil
	case <-e.stopped:
		return nil, model.ErrStopped
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (ev *submitEvent) apply(e *Engine) {
	for i, it := range ev.items {
		if ev.results[i].Err == nil {
			ev.results[i] = e.submit(it)
		}
	}
	e.reply(func() { ev.reply <- ev.results })
}

// submit creates one job (or finds the one its idempotency key made).
func (e *Engine) submit(it SubmitItem) SubmitResult {
	spec, key := it.Spec, it.IdempotencyKey
	if key != "" {
		if r, ok := e.idem[idemID(spec.Tenant, key)]; ok {
			if j, ok := e.findJob(r.JobID); ok {
				v, err := e.view(j)
				return SubmitResult{Job: v, Err: err}
			}
		}
	}
	if _, ok := e.queues[spec.Queue]; !ok {
		return SubmitResult{Err: &model.ValidationError{Violations: []model.FieldViolation{{Field: "spec.queue", Description: fmt.Sprintf("no queue %q (create it with gpusched queues create)", spec.Queue)}}}}
	}
	seq, id := e.nextJobID()
	j := &model.Job{ID: id, Seq: seq, Spec: spec, CreateTime: e.cfg.Now()}
	j.SetState(model.JobPending, "submitted", j.CreateTime)
	j.Reason = "waiting for the next scheduling cycle"
	e.jobs[id] = j
	e.order = append(e.order, seq)
	e.queue.push(j)
	e.newWork = true
	change := store.Change{Job: j}
	if key != "" {
		j.IdempotencyKey = key
		r := &model.Idempotency{Tenant: j.Spec.Tenant, Key: key, JobID: id, CreateTime: j.CreateTime}
		e.idem[idemID(r.Tenant, r.Key)] = r
		e.idemOrder = append(e.idemOrder, r)
		change.Idem = r
	}
	e.persist(change)
	// The clone is taken now, before placement may move the job on in this
	// same turn: the caller sees the job as submitted.
	return SubmitResult{Job: j.Clone()}
}

type cancelEvent struct {
	id, reason string
	reply      chan result
}

// Cancel ends a job that has not ended yet.
func (e *Engine) Cancel(ctx context.Context, id, reason string) (*model.Job, error) {
	if err := model.ValidateID("id", id); err != nil {
		return nil, err
	}
	ev := &cancelEvent{id: id, reason: reason, reply: make(chan result, 1)}
	if err := e.post(ctx, ev); err != nil {
		return nil, err
	}
	return e.await(ctx, ev.reply)
}

func (ev *cancelEvent) apply(e *Engine) {
	ref, ok := e.findJob(ev.id)
	var res result
	switch {
	case !ok:
		res.err = model.Errorf(model.ErrNotFound, "job %s not found", ev.id)
	case ref.state().Terminal():
		res.err = model.Errorf(model.ErrJobEnded, "job %s already ended (%s)", ev.id, ref.state())
	default:
		j := ref.live // only ended jobs are archived
		reason := "cancelled by user"
		if ev.reason != "" {
			reason += ": " + ev.reason
		}
		e.endJob(j, model.JobCancelled, reason)
		res.job = j.Clone()
	}
	// Answer after the commit even on error, so replies keep their order.
	e.reply(func() { ev.reply <- res })
}

// schedule runs one placement cycle over the pending queue, ordered by
// policy (queue priority, fair share, job priority with aging, age) and
// bounded by tenants' quotas; see scheduler/placement.
func (e *Engine) schedule() {
	e.queue.compact()
	if len(e.queue.jobs) == 0 {
		return
	}
	// The cycle's inputs reuse last cycle's buffers: a deep queue made
	// rebuilding them the bulk of the garbage. The snapshot refers to them
	// only for this call.
	b := &e.cycleBufs
	// Every node, every cycle: nothing here may hash or allocate per node.
	// The list of all nodes only changes when one joins or is relabelled.
	nodes := e.nodesInOrder()
	if e.nodesChanged || len(b.all) != len(nodes) {
		b.all, e.nodesChanged = b.all[:0], false
		for _, n := range nodes {
			b.all = append(b.all, *n.placementNode())
		}
		b.allVersion++
	}
	b.free = b.free[:0]
	for i, n := range nodes {
		if n.placeable() {
			b.free = append(b.free, int32(i))
		}
	}
	now := e.cfg.Now()
	jobs := e.queue.jobs
	b.reqs = slices.Grow(b.reqs[:0], len(jobs))[:len(jobs)]
	for i, j := range jobs {
		b.reqs[i] = placement.Request{JobID: j.ID, Nodes: j.Spec.Nodes, GPUModel: j.Spec.GPUModel, GPUsPerNode: j.Spec.GPUsPerNode,
			MinGPUMemoryBytes: j.Spec.MinGPUMemoryBytes, Selector: j.Spec.Selector,
			Tenant: j.Spec.Tenant, Queue: j.Spec.Queue, Priority: j.Spec.Priority, Seq: j.Seq, Waited: now.Sub(j.CreateTime)}
		switch {
		case j.Spec.Topology != "":
			b.reqs[i].Topology = placement.Topology{Key: model.TopologyLabel(j.Spec.Topology), Required: true}
		case j.Spec.PreferTopology != "":
			b.reqs[i].Topology = placement.Topology{Key: model.TopologyLabel(j.Spec.PreferTopology)}
		}
	}
	policy := placement.Policy{Tenants: map[string]placement.Tenant{}, Queues: map[string]placement.Queue{},
		Usage: e.usage, AgingStep: e.cfg.AgingStep}
	for name, t := range e.tenants {
		policy.Tenants[name] = placement.Tenant{Name: name, MaxNodes: t.MaxNodes, MaxNodesPerModel: t.MaxNodesPerModel, Weight: t.Weight}
	}
	for name, q := range e.queues {
		policy.Queues[name] = placement.Queue{Name: name, Priority: q.Priority, Weight: q.Weight, Paused: q.Paused}
	}
	b.snapshots.FreeInIDOrder = true // nodesInOrder
	plan := placement.Schedule(b.snapshots.BuildFree(b.all, b.allVersion, b.free), policy, b.reqs)
	for i, why := range plan.Why {
		if why != "" {
			jobs[i].Reason = why
		}
	}
	for _, a := range plan.Assignments {
		e.grant(e.jobs[a.JobID], a.Nodes)
	}
	e.queue.compact()
}

// cycleBufs are a placement cycle's inputs, kept between cycles.
type cycleBufs struct {
	// all is every node in ID order, rebuilt (and allVersion bumped) only
	// when one joins or changes; free indexes its placeable ones.
	all        []placement.Node
	allVersion uint64
	free       []int32
	reqs       []placement.Request
	snapshots  placement.SnapshotBuilder
}

// nodesInOrder returns every node in ID order, so the snapshot's free
// lists come pre-sorted. Nodes are added (never removed) by registration,
// so the order is rebuilt only when the count changes.
func (e *Engine) nodesInOrder() []*nodeEntry {
	if len(e.nodeOrder) != len(e.nodes) {
		e.nodeOrder = e.nodeOrder[:0]
		for _, n := range e.nodes {
			e.nodeOrder = append(e.nodeOrder, n)
		}
		slices.SortFunc(e.nodeOrder, func(a, b *nodeEntry) int { return strings.Compare(a.node.ID, b.node.ID) })
	}
	return e.nodeOrder
}

// grant creates a lease of nodes for job and tells the agents to start.
func (e *Engine) grant(j *model.Job, nodes []string) {
	now := e.cfg.Now()
	j.Attempts++
	l := &model.Lease{
		ID: model.LeaseID(j.ID, j.Attempts), JobID: j.ID, Tenant: j.Spec.Tenant,
		Active: true, FencingToken: e.Token(), StartTime: now,
	}
	for rank, id := range nodes {
		n := e.nodes[id]
		uuids := make([]string, len(n.node.Inventory.GPUs))
		for i, g := range n.node.Inventory.GPUs {
			uuids[i] = g.UUID
		}
		l.Nodes = append(l.Nodes, model.LeaseNode{
			Node: id, Rank: rank, GPUModel: n.node.Inventory.GPUModel,
			GPUCount: n.node.Inventory.GPUCount, GPUUUIDs: uuids,
		})
		e.hold(n, l.ID, l.Tenant)
	}
	j.SetState(model.JobScheduled, "", now)
	j.LeaseID, j.Nodes = l.ID, nodes
	j.ScheduleTime, j.Exits = now, nil
	e.leases[l.ID] = newLeaseEntry(l)
	e.persist(store.Change{Job: j, Lease: l})
	if j.Spec.TimeLimit > 0 {
		heap.Push(&e.deadlines, deadline{at: now.Add(j.Spec.TimeLimit), job: j.ID, lease: l.ID})
	}
	le := e.leases[l.ID]
	for _, id := range nodes {
		e.startOn(le, id, nodes)
	}
	if j.Attempts == 1 {
		e.cfg.Metrics.SubmitToLease(now.Sub(j.CreateTime))
	}
	if ce := e.log.Check(zap.InfoLevel, "lease granted"); ce != nil { // no fields built unless logged
		ce.Write(zap.String("job_id", j.ID), zap.String("lease_id", l.ID),
			zap.Strings("nodes", nodes), zap.Int64("token", e.Token()))
	}
}

// startOn tells one node of a lease to run the job's command. names is
// the lease's nodes in rank order (nil: taken from the lease); the
// commands of a gang share it, as they share the spec's command and env:
// a message is only read once built.
func (e *Engine) startOn(le *leaseEntry, node string, names []string) {
	l, j := le.lease, e.jobs[le.lease.JobID]
	if names == nil {
		names = l.NodeNames()
	}
	e.command(node, &pb.ConnectResponse{Msg: &pb.ConnectResponse_StartLease{StartLease: &pb.StartLease{
		LeaseId: l.ID, JobId: j.ID, Command: j.Spec.Command, Env: j.Spec.Env,
		Rank: int32(le.rank(node)), Nodes: names, MasterAddr: e.nodes[l.Nodes[0].Node].node.Address,
	}}})
}

// endJob moves a job to a terminal state and ends its active lease.
func (e *Engine) endJob(j *model.Job, state model.JobState, reason string) {
	j.EndTime = e.cfg.Now()
	j.SetState(state, reason, j.EndTime)
	e.ended = append(e.ended, j)
	e.persist(store.Change{Job: j, Lease: e.endLease(j, state.String()+": "+reason)})
	e.needCycle = true
	if ce := e.log.Check(zap.InfoLevel, "job ended"); ce != nil {
		ce.Write(zap.String("job_id", j.ID), zap.String("state", state.String()), zap.String("reason", reason))
	}
}

// endLease ends the job's active lease, if any, and asks every node of it
// to stop and clean up. It returns the ended lease for the caller to
// persist together with the job, or nil.
func (e *Engine) endLease(j *model.Job, reason string) *model.Lease {
	le := e.leases[j.LeaseID]
	if le == nil || !le.lease.Active {
		return nil
	}
	l := le.lease
	l.Active, l.EndTime, l.EndReason = false, e.cfg.Now(), reason
	le.progress = nil // read as none from now on, never written
	e.endedLeases = append(e.endedLeases, le)
	var usage model.TelemetryUsage
	if e.cfg.LeaseUsage != nil {
		usage = e.cfg.LeaseUsage(l.ID)
	}
	l.Summary = l.Summarize(usage)
	j.LastLeaseSummary = l.Summary
	for _, ln := range l.Nodes {
		n := e.nodes[ln.Node]
		if n.lease == l.ID {
			e.unhold(n)
			n.cleaning = l.ID
		}
		e.release(ln.Node, l.ID, reason)
	}
	return l
}

// countLeaseEvent counts an XID or foreign-process event in the summary of
// the active lease holding the node, persisted at once so the count
// survives a failover.
func (e *Engine) countLeaseEvent(n *nodeEntry, ev model.NodeEvent) {
	id := ev.LeaseID
	if id == "" {
		id = n.lease
	}
	le := e.leases[id]
	if le == nil || !le.lease.Active || le.rank(n.node.ID) < 0 {
		return
	}
	if le.lease.Summary.CountEvent(ev.Kind) {
		e.persist(store.Change{Lease: le.lease})
	}
}

// leaseTenant returns the tenant of a lease ("" when unknown). Agents'
// receive paths call it, off the loop.
func (e *Engine) leaseTenant(id string) string {
	if id == "" {
		return ""
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	if l, ok := e.findLease(id); ok {
		return e.leaseRefTenant(l)
	}
	return ""
}

// nodeFailed handles losing one node of a job's lease through no fault of
// the job (the node or its agent went away): the job is requeued under a
// new lease while it has retries left, and FAILED otherwise.
func (e *Engine) nodeFailed(j *model.Job, why string) {
	if j.Retries >= j.Spec.MaxRetries {
		if j.Spec.MaxRetries > 0 {
			why += fmt.Sprintf(" (all %d retries used)", j.Spec.MaxRetries)
		}
		e.endJob(j, model.JobFailed, why)
		return
	}
	j.Retries++
	e.requeue(j, why, fmt.Sprintf("requeued after %s (retry %d of %d)", why, j.Retries, j.Spec.MaxRetries))
}

// requeue ends the job's lease and puts it back in the queue at its place.
func (e *Engine) requeue(j *model.Job, why, reason string) {
	l := e.endLease(j, "requeued: "+why)
	j.SetState(model.JobPending, reason, e.cfg.Now())
	j.ScheduleTime, j.StartTime, j.Exits = time.Time{}, time.Time{}, nil
	e.queue.push(j) // keeps its place: the queue is ordered by submission
	e.persist(store.Change{Job: j, Lease: l})
	e.needCycle = true
	e.log.Warn("job requeued", zap.String("job_id", j.ID), zap.String("reason", why), zap.Int("retries", j.Retries))
}

// nodeExited records one node's exit and ends the job when its outcome is known:
// FAILED at the first failing node, SUCCEEDED when every node exited 0.
func (e *Engine) nodeExited(le *leaseEntry, x model.NodeExit) {
	if !le.lease.Active {
		return
	}
	if !le.mark(x.Node, progressExited) {
		return
	}
	le.exited++
	j := e.jobs[le.lease.JobID]
	j.Exits = append(j.Exits, x)
	sort.SliceStable(j.Exits, func(a, b int) bool { return j.Exits[a].Rank < j.Exits[b].Rank })
	if !x.Success() {
		e.endJob(j, model.JobFailed, describeExit(x))
		return
	}
	if le.exited == len(le.lease.Nodes) {
		e.endJob(j, model.JobSucceeded, "")
	}
}

func describeExit(x model.NodeExit) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node %s (rank %d) ", x.Node, x.Rank)
	if x.Signal != "" {
		fmt.Fprintf(&b, "killed by %s", x.Signal)
	} else {
		fmt.Fprintf(&b, "exited with code %d", x.ExitCode)
	}
	// The runner's message often restates the code ("exit status 3").
	if x.Message != "" && !strings.HasPrefix(x.Message, "exit status ") && !strings.HasPrefix(x.Message, "killed by ") {
		fmt.Fprintf(&b, ": %s", x.Message)
	}
	return b.String()
}

// checkTimers ends jobs past their time limit and leases on lost nodes.
func (e *Engine) checkTimers() {
	now := e.cfg.Now()
	e.expireIdempotency(now)
	for e.deadlines.Len() > 0 && !e.deadlines[0].at.After(now) {
		d := heap.Pop(&e.deadlines).(deadline)
		j := e.jobs[d.job]
		if j == nil || j.LeaseID != d.lease || j.State.Terminal() {
			continue
		}
		e.endJob(j, model.JobTimedOut, fmt.Sprintf("exceeded time limit %s", j.Spec.TimeLimit))
	}
	for n := range e.offline {
		if now.Sub(n.disconnectedAt) < e.cfg.NodeLostAfter {
			continue
		}
		id := n.node.ID
		delete(e.offline, n)
		n.lost = true
		e.log.Warn("node lost", zap.String("node", id))
		if n.lease != "" {
			j := e.jobs[e.leases[n.lease].lease.JobID]
			e.nodeFailed(j, fmt.Sprintf("node %s lost (agent gone for %s)", id, e.cfg.NodeLostAfter))
		}
		// A lost node cannot confirm cleanup; it is cleaned when it returns.
	}
}

// idemID keys the in-memory idempotency map.
func idemID(tenant, key string) string { return tenant + "\x00" + key }

// expireIdempotency forgets keys older than the retention, oldest first.
func (e *Engine) expireIdempotency(now time.Time) {
	n := 0
	for _, r := range e.idemOrder {
		if now.Sub(r.CreateTime) < e.cfg.IdempotencyRetention {
			break
		}
		delete(e.idem, idemID(r.Tenant, r.Key))
		e.persist(store.Change{ExpireIdem: r})
		n++
	}
	e.idemOrder = e.idemOrder[n:]
}
