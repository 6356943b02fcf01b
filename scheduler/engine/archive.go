package engine

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"

	"google.golang.org/protobuf/proto"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/wire"
)

// The leader keeps every job it knows, and most of them have ended. A job
// in memory is a graph of small objects (spec maps, command, transitions,
// exits, events), and the garbage collector marks all of it on every
// cycle: at 10,000 nodes each collection's mark phase is a stall of the
// loop, and it grows with every job that ends. So once a job's end is
// committed, the job is archived: its record (as etcd holds it) is copied
// into a record arena, and what the leader's own code reads of an ended
// job (state, tenant, queue, job set, labels, last lease) goes into an
// archivedJob in a map keyed by Seq. Neither holds a pointer, so the
// collector marks the arena's chunks and the map's buckets without
// looking inside them. Reads decode the record.
//
// Leases are archived the same way once ended and clean on every node:
// until then a node's LeaseReleased still writes its cleanup into the
// lease. A lease whose node never reports back stays whole in e.leases.

// archive holds the archived jobs and leases. Only the loop writes it,
// under e.mu.
type archive struct {
	records recordArena
	jobs    map[uint64]archivedJob
	leases  map[leaseKey]archivedLease
	// names interns tenant, queue and job set names; labels interns
	// label sets. Both are few next to the jobs that share them.
	names  interner
	labels labelSets
	// states counts archived jobs by state, for Stats.
	states map[model.JobState]int
}

// archivedJob is what stays of an archived job outside its record.
type archivedJob struct {
	record recordRef
	state  model.JobState
	// attempts numbers the job's last lease (model.LeaseID); 0: none.
	attempts                      uint32
	tenant, queue, jobSet, labels uint32
}

// archivedLease is what stays of an archived lease outside its record.
type archivedLease struct {
	record recordRef
	tenant uint32
}

// leaseKey names a lease by its job's Seq and attempt (model.LeaseID).
type leaseKey struct {
	job     uint64
	attempt uint32
}

func newArchive() archive {
	return archive{
		jobs: map[uint64]archivedJob{}, leases: map[leaseKey]archivedLease{},
		names: newInterner(), labels: newLabelSets(), states: map[model.JobState]int{},
	}
}

// jobRef is a job the leader knows: live (whole, in e.jobs) or archived.
type jobRef struct {
	live     *model.Job
	seq      uint64
	archived archivedJob
}

// state returns the job's current state.
func (r jobRef) state() model.JobState {
	if r.live != nil {
		return r.live.State
	}
	return r.archived.state
}

// leaseID returns the ID of the job's last lease, or "".
func (r jobRef) leaseID() string {
	if r.live != nil {
		return r.live.LeaseID
	}
	if r.archived.attempts == 0 {
		return ""
	}
	return model.LeaseID(strconv.FormatUint(r.seq, 10), int(r.archived.attempts))
}

// findJob looks a job up by ID, live or archived.
func (e *Engine) findJob(id string) (jobRef, bool) {
	if j := e.jobs[id]; j != nil {
		return jobRef{live: j, seq: j.Seq}, true
	}
	seq, ok := parseSeq(id)
	if !ok {
		return jobRef{}, false
	}
	aj, ok := e.archive.jobs[seq]
	return jobRef{seq: seq, archived: aj}, ok
}

// jobAt returns the job with Seq seq, live or archived; buf is scratch
// space for its ID, so that listing every job allocates nothing.
func (e *Engine) jobAt(seq uint64, buf []byte) (jobRef, bool) {
	if aj, ok := e.archive.jobs[seq]; ok {
		return jobRef{seq: seq, archived: aj}, true
	}
	j := e.jobs[string(strconv.AppendUint(buf[:0], seq, 10))]
	return jobRef{live: j, seq: seq}, j != nil
}

// matches reports whether the job passes sel, state included, without
// decoding an archived job.
func (e *Engine) matches(r jobRef, sel *model.JobSelector) bool {
	if !sel.MatchesState(r.state()) {
		return false
	}
	if r.live != nil {
		return sel.Matches(r.live)
	}
	a := &r.archived
	h := model.Job{Spec: model.JobSpec{
		Tenant: e.archive.names.name(a.tenant), Queue: e.archive.names.name(a.queue),
		JobSet: e.archive.names.name(a.jobSet), Labels: e.archive.labels.set(a.labels),
	}}
	if len(sel.IDs) > 0 {
		h.ID = strconv.FormatUint(r.seq, 10)
	}
	return sel.Matches(&h)
}

// view returns a copy of the job with every field, decoding an archived one.
func (e *Engine) view(r jobRef) (*model.Job, error) {
	if r.live != nil {
		return r.live.Clone(), nil
	}
	var p pb.Job
	if err := proto.Unmarshal(e.archive.records.get(r.archived.record), &p); err != nil {
		return nil, fmt.Errorf("engine: decode archived job %d: %w", r.seq, err)
	}
	full := wire.JobFromProto(&p)
	full.Seq = r.seq
	return full, nil
}

// archiveJob moves the ended job j out of e.jobs into the archive, with
// record, its encoded form.
func (e *Engine) archiveJob(j *model.Job, record []byte) {
	a := &e.archive
	a.jobs[j.Seq] = archivedJob{
		record: a.records.add(record), state: j.State, attempts: uint32(j.Attempts),
		tenant: a.names.id(j.Spec.Tenant), queue: a.names.id(j.Spec.Queue),
		jobSet: a.names.id(j.Spec.JobSet), labels: a.labels.id(j.Spec.Labels),
	}
	a.states[j.State]++
	delete(e.jobs, j.ID)
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
		e.archiveJob(j, record)
	}
	e.ended = e.ended[:0]
	clear(e.written.jobs)
}

// unarchive brings an archived job back whole, for a change to an ended
// job (an event a node reports on its last lease after it ended). It is
// archived again once the turn commits; its old record's bytes stay in the
// arena unused, which is rare enough not to matter.
func (e *Engine) unarchive(r jobRef) (*model.Job, error) {
	if r.live != nil {
		return r.live, nil
	}
	full, err := e.view(r)
	if err != nil {
		return nil, err
	}
	delete(e.archive.jobs, r.seq)
	e.archive.states[r.archived.state]--
	e.jobs[full.ID] = full
	e.ended = append(e.ended, full)
	return full, nil
}

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

// archiveLease moves the clean, ended lease l out of e.leases into the
// archive, with record, its encoded form. A lease whose ID is not one the
// engine hands out (model.LeaseID) stays whole. It reports whether l was
// archived.
func (e *Engine) archiveLease(l *model.Lease, record []byte) bool {
	key, ok := parseLeaseID(l.ID)
	if !ok || !leaseClean(l) {
		return false
	}
	a := &e.archive
	a.leases[key] = archivedLease{record: a.records.add(record), tenant: a.names.id(l.Tenant)}
	delete(e.leases, l.ID)
	return true
}

// archiveEndedLeases archives the leases that ended or got a node's
// cleanup in the turn just committed, once clean on every node.
func (e *Engine) archiveEndedLeases() {
	for i, le := range e.endedLeases {
		e.endedLeases[i] = nil
		if e.leases[le.lease.ID] != le || !leaseClean(le.lease) {
			continue
		}
		record, ok := e.written.leases[le.lease]
		if !ok {
			record = wire.AppendLeaseRecord(nil, le.lease)
		}
		e.archiveLease(le.lease, record)
	}
	e.endedLeases = e.endedLeases[:0]
	clear(e.written.leases)
}

// leaseRef is a lease the leader knows: live (in e.leases) or archived.
type leaseRef struct {
	live     *leaseEntry
	key      leaseKey
	archived archivedLease
}

// findLease looks a lease up by ID, live or archived.
func (e *Engine) findLease(id string) (leaseRef, bool) {
	if le := e.leases[id]; le != nil {
		return leaseRef{live: le}, true
	}
	key, ok := parseLeaseID(id)
	if !ok {
		return leaseRef{}, false
	}
	al, ok := e.archive.leases[key]
	return leaseRef{key: key, archived: al}, ok
}

// jobID returns the ID of the lease's job.
func (r leaseRef) jobID() string {
	if r.live != nil {
		return r.live.lease.JobID
	}
	return strconv.FormatUint(r.key.job, 10)
}

// tenant returns the lease's tenant.
func (e *Engine) leaseRefTenant(r leaseRef) string {
	if r.live != nil {
		return r.live.lease.Tenant
	}
	return e.archive.names.name(r.archived.tenant)
}

// leaseView returns a copy of the lease with every field, decoding an
// archived one.
func (e *Engine) leaseView(r leaseRef) (*model.Lease, error) {
	if r.live != nil {
		return r.live.lease.Clone(), nil
	}
	var p pb.Lease
	if err := proto.Unmarshal(e.archive.records.get(r.archived.record), &p); err != nil {
		return nil, fmt.Errorf("engine: decode archived lease %d.%d: %w", r.key.job, r.key.attempt, err)
	}
	return wire.LeaseFromProto(&p), nil
}

// parseSeq returns the Seq a job ID names: its decimal form, as
// nextJobID writes it, and nothing else ("007" names no job).
func parseSeq(id string) (uint64, bool) {
	if id == "" || (id[0] == '0' && len(id) > 1) {
		return 0, false
	}
	seq, err := strconv.ParseUint(id, 10, 64)
	return seq, err == nil
}

// parseLeaseID splits an ID that model.LeaseID wrote.
func parseLeaseID(id string) (leaseKey, bool) {
	job, attempt, ok := strings.Cut(id, ".")
	seq, ok1 := parseSeq(job)
	n, ok2 := parseSeq(attempt)
	if !ok || !ok1 || !ok2 || n == 0 || n > 1<<31 {
		return leaseKey{}, false
	}
	return leaseKey{job: seq, attempt: uint32(n)}, true
}

// recordArena keeps records back to back in large chunks: one object per
// chunk for the collector, with no pointers inside.
type recordArena struct {
	chunks [][]byte
}

// arenaChunk is the size of a chunk; a larger record gets a chunk of its
// own size.
const arenaChunk = 1 << 20

// recordRef locates a record in the arena.
type recordRef struct {
	chunk, off, len uint32
}

// add copies rec into the arena.
func (a *recordArena) add(rec []byte) recordRef {
	n := len(a.chunks)
	if n == 0 || cap(a.chunks[n-1])-len(a.chunks[n-1]) < len(rec) {
		a.chunks = append(a.chunks, make([]byte, 0, max(arenaChunk, len(rec))))
		n++
	}
	c := &a.chunks[n-1]
	ref := recordRef{chunk: uint32(n - 1), off: uint32(len(*c)), len: uint32(len(rec))}
	*c = append(*c, rec...)
	return ref
}

// get returns the record at r; the caller must not modify it.
func (a *recordArena) get(r recordRef) []byte {
	return a.chunks[r.chunk][r.off : r.off+r.len : r.off+r.len]
}

// interner numbers strings; 0 is "".
type interner struct {
	ids   map[string]uint32
	names []string
}

func newInterner() interner {
	return interner{ids: map[string]uint32{"": 0}, names: []string{""}}
}

func (in *interner) id(s string) uint32 {
	if id, ok := in.ids[s]; ok {
		return id
	}
	id := uint32(len(in.names))
	in.ids[s] = id
	in.names = append(in.names, s)
	return id
}

func (in *interner) name(id uint32) string { return in.names[id] }

// labelSets numbers label sets; 0 is the empty set. A set is shared by
// every job that has it, so it must not be modified.
type labelSets struct {
	ids  map[string]uint32
	sets []map[string]string
}

func newLabelSets() labelSets {
	return labelSets{ids: map[string]uint32{"": 0}, sets: []map[string]string{nil}}
}

func (ls *labelSets) id(labels map[string]string) uint32 {
	if len(labels) == 0 {
		return 0
	}
	var b []byte
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		b = strconv.AppendInt(b, int64(len(k)), 10)
		b = append(append(b, ':'), k...)
		b = strconv.AppendInt(b, int64(len(labels[k])), 10)
		b = append(append(b, ':'), labels[k]...)
	}
	key := string(b)
	if id, ok := ls.ids[key]; ok {
		return id
	}
	id := uint32(len(ls.sets))
	ls.ids[key] = id
	ls.sets = append(ls.sets, maps.Clone(labels))
	return id
}

func (ls *labelSets) set(id uint32) map[string]string { return ls.sets[id] }
