package engine

import (
	"cmp"
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/wire"
)

// The leader keeps every job it knows, and most of them have ended. A job
// in memory is a graph of small objects (spec maps, command, transitions,
// exits, events), and the garbage collector marks all of it on every cycle:
// at 10,000 nodes that mark phase was one of the loop's stalls. So once a
// job's end is committed, the job is archived: its record stays encoded
// (one pointer-free byte slice, as etcd holds it) and what the leader's own
// code reads of an ended job stays in a husk in jobs and order. Reads
// decode the record (jobView).

// husk is what stays of an archived job: what selectors, counts, cancel
// and logs read of an ended job.
func husk(j *model.Job) *model.Job {
	return &model.Job{
		ID: j.ID, Seq: j.Seq, State: j.State, LeaseID: j.LeaseID,
		Spec: model.JobSpec{Tenant: j.Spec.Tenant, Queue: j.Spec.Queue, JobSet: j.Spec.JobSet, Labels: j.Spec.Labels},
	}
}

// archive replaces the ended job j by its husk, keeping record, its
// encoded form.
func (e *Engine) archive(j *model.Job, record []byte) {
	h := husk(j)
	e.archived[j.Seq] = record
	e.replaceJob(h)
}

// replaceJob puts j in place of the job with its ID and Seq.
func (e *Engine) replaceJob(j *model.Job) {
	e.jobs[j.ID] = j
	if i, ok := slices.BinarySearchFunc(e.order, j.Seq, func(o *model.Job, seq uint64) int { return cmp.Compare(o.Seq, seq) }); ok {
		e.order[i] = j
	}
}

// archiveEnded archives the jobs that ended in the turn just committed,
// each with its record as the commit wrote it (or encoded the same way).
func (e *Engine) archiveEnded() {
	for i, j := range e.ended {
		e.ended[i] = nil
		if e.jobs[j.ID] != j || !j.State.Terminal() {
			continue
		}
		record, ok := e.written.jobs[j]
		if !ok {
			record = wire.AppendJobRecord(nil, j)
		}
		e.archive(j, record)
	}
	e.ended = e.ended[:0]
	clear(e.written.jobs)
}

// unarchive brings an archived job back whole, for a change to an ended
// job (an event a node reports on its last lease after it ended). It is
// archived again once the turn commits. A husk must never be persisted:
// every change to a job goes through here or finds it whole.
func (e *Engine) unarchive(j *model.Job) (*model.Job, error) {
	if _, ok := e.archived[j.Seq]; !ok {
		return j, nil
	}
	full, err := e.jobView(j)
	if err != nil {
		return nil, err
	}
	delete(e.archived, j.Seq)
	e.replaceJob(full)
	e.ended = append(e.ended, full)
	return full, nil
}

// jobView returns a copy of j with every field, decoding an archived job.
func (e *Engine) jobView(j *model.Job) (*model.Job, error) {
	record, ok := e.archived[j.Seq]
	if !ok {
		return j.Clone(), nil
	}
	var p pb.Job
	if err := proto.Unmarshal(record, &p); err != nil {
		return nil, fmt.Errorf("engine: decode archived job %s: %w", j.ID, err)
	}
	full := wire.JobFromProto(&p)
	full.Seq = j.Seq
	return full, nil
}

// Leases are archived the same way, once ended and clean on every node:
// until then a node's LeaseReleased still writes its cleanup into the
// lease. The husk keeps what the loop reads of an ended lease (ID, job,
// tenant, not active); a lease whose node never reports back stays whole.

// leaseClean reports whether l has ended and every node reported cleanup.
func leaseClean(l *model.Lease) bool {
	if l.Active {
		return false
	}
	for _, ln := range l.Nodes {
		if ln.Cleanup == "" {
			return false
		}
	}
	return true
}

// archiveLease replaces le's lease by its husk, keeping record.
func (e *Engine) archiveLease(le *leaseEntry, record []byte) {
	l := le.lease
	if le.record != nil || !leaseClean(l) {
		return
	}
	le.record = record
	le.lease = &model.Lease{ID: l.ID, JobID: l.JobID, Tenant: l.Tenant}
}

// archiveEndedLeases archives the leases that ended or got a node's
// cleanup in the turn just committed, once clean on every node.
func (e *Engine) archiveEndedLeases() {
	for i, le := range e.endedLeases {
		e.endedLeases[i] = nil
		if le.record != nil || !leaseClean(le.lease) {
			continue
		}
		record, ok := e.written.leases[le.lease]
		if !ok {
			record = wire.AppendLeaseRecord(nil, le.lease)
		}
		e.archiveLease(le, record)
	}
	e.endedLeases = e.endedLeases[:0]
	clear(e.written.leases)
}

// leaseView returns a copy of le's lease with every field, decoding an
// archived one.
func (e *Engine) leaseView(le *leaseEntry) (*model.Lease, error) {
	if le.record == nil {
		return le.lease.Clone(), nil
	}
	var p pb.Lease
	if err := proto.Unmarshal(le.record, &p); err != nil {
		return nil, fmt.Errorf("engine: decode archived lease %s: %w", le.lease.ID, err)
	}
	return wire.LeaseFromProto(&p), nil
}
