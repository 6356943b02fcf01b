// Package invariants checks, after the fact, that a gpusched cluster kept
// its promises. It replays the whole etcd history under the scheduler's
// prefix in revision order (etcd gives every transaction one revision, a
// total order no client observation can beat) and proves:
//
//  1. no node was ever in two active leases at once;
//  2. every job has exactly one current state, never held two active
//     leases at once, and every job a client saw accepted exists;
//  3. no deposed leader wrote after its successor's first write: every
//     transaction carries its writer's fencing token (store's meta/writer),
//     tokens never go down, and each belongs to a leader key alive at that
//     revision.
//
// A history checker like porcupine is built for histories observed by
// clients, with overlapping operations; here the store itself is the
// serialisation point, so a linear replay is exact and cheaper.
package invariants

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// ErrCompacted: etcd no longer has the history from revision 1.
var ErrCompacted = errors.New("invariants: history compacted; cannot replay")

// Report is what Check found.
type Report struct {
	// Revisions replayed and how many of them were scheduler transactions.
	Revisions, Transactions int64
	Jobs, Leases            int
	// Writers lists the fencing tokens in the order they first wrote.
	Writers []int64
	// Violations is empty when every invariant held.
	Violations []string
}

// OK reports whether every invariant held.
func (r *Report) OK() bool { return len(r.Violations) == 0 }

func (r *Report) violate(format string, args ...any) {
	r.Violations = append(r.Violations, fmt.Sprintf(format, args...))
}

// String summarises the report in one paragraph.
func (r *Report) String() string {
	s := fmt.Sprintf("%d revisions, %d scheduler transactions, %d jobs, %d leases, writers %v",
		r.Revisions, r.Transactions, r.Jobs, r.Leases, r.Writers)
	if r.OK() {
		return s + ": all invariants hold"
	}
	return s + ":\n  " + strings.Join(r.Violations, "\n  ")
}

// Check replays the history under prefix (e.g. "/gpusched"). accepted are
// job IDs that clients saw accepted; each must exist.
func Check(ctx context.Context, cli *clientv3.Client, prefix string, accepted []string) (*Report, error) {
	prefix = strings.TrimSuffix(prefix, "/") + "/"
	head, err := cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return nil, fmt.Errorf("invariants: %w", err)
	}
	last := head.Header.Revision
	r := &Report{Revisions: last}
	rp := newReplay(prefix, r)

	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wch := cli.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(1), clientv3.WithPrevKV())
	var batch []*clientv3.Event
	var rev int64
	for rev < last {
		resp, ok := <-wch
		if !ok {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, errors.New("invariants: watch closed before the end of the history")
		}
		if resp.CompactRevision > 0 {
			return nil, fmt.Errorf("%w (compacted at %d)", ErrCompacted, resp.CompactRevision)
		}
		if err := resp.Err(); err != nil {
			return nil, fmt.Errorf("invariants: %w", err)
		}
		for _, ev := range resp.Events {
			if ev.Kv.ModRevision != rev && len(batch) > 0 {
				rp.revision(rev, batch)
				batch = batch[:0]
			}
			rev = ev.Kv.ModRevision
			batch = append(batch, ev)
		}
	}
	if len(batch) > 0 {
		rp.revision(rev, batch)
	}
	rp.finish(accepted)
	return r, nil
}

// replay holds the state rebuilt so far.
type replay struct {
	prefix string
	r      *Report
	// leaderKeys: election key -> create revision, while the key exists.
	leaderKeys map[string]int64
	// nodeLease: node -> active lease holding it.
	nodeLease map[string]string
	// jobLease: job -> its active lease.
	jobLease map[string]string
	leases   map[string]bool
	jobs     map[string]pb.JobState
	maxToken int64
}

func newReplay(prefix string, r *Report) *replay {
	return &replay{
		prefix: prefix, r: r, leaderKeys: map[string]int64{}, nodeLease: map[string]string{},
		jobLease: map[string]string{}, leases: map[string]bool{}, jobs: map[string]pb.JobState{},
	}
}

// revision applies every event of one etcd revision.
func (p *replay) revision(rev int64, events []*clientv3.Event) {
	var token int64
	scheduled := false
	for _, ev := range events {
		key := strings.TrimPrefix(string(ev.Kv.Key), p.prefix)
		switch {
		case strings.HasPrefix(key, "leader/"):
			if ev.Type == mvccpb.DELETE {
				delete(p.leaderKeys, key)
			} else {
				p.leaderKeys[key] = ev.Kv.CreateRevision
			}
		case key == "meta/writer":
			t, err := strconv.ParseInt(string(ev.Kv.Value), 10, 64)
			if err != nil {
				p.r.violate("revision %d: unreadable writer token %q", rev, ev.Kv.Value)
			}
			token = t
		case strings.HasPrefix(key, "jobs/"), strings.HasPrefix(key, "leases/"),
			strings.HasPrefix(key, "nodes/"), strings.HasPrefix(key, "meta/"):
			scheduled = true
		}
	}
	if !scheduled && token == 0 {
		return // election or replica bookkeeping, not a scheduler write
	}
	p.r.Transactions++
	p.checkWriter(rev, token)
	for _, ev := range events {
		key := strings.TrimPrefix(string(ev.Kv.Key), p.prefix)
		switch {
		case strings.HasPrefix(key, "leases/") && ev.Type == mvccpb.PUT:
			p.lease(rev, ev.Kv.Value)
		case strings.HasPrefix(key, "jobs/") && ev.Type == mvccpb.PUT:
			p.job(rev, key, ev.Kv.Value)
		case ev.Type == mvccpb.DELETE && !strings.HasPrefix(key, "leader/") && !strings.HasPrefix(key, "replicas/") && !strings.HasPrefix(key, "idem/"):
			p.r.violate("revision %d: %s deleted; scheduler records are never deleted (only expired idempotency keys)", rev, key)
		}
	}
}

// checkWriter enforces rule 3 for one transaction.
func (p *replay) checkWriter(rev, token int64) {
	if token == 0 {
		p.r.violate("revision %d: scheduler write without a writer token", rev)
		return
	}
	if token < p.maxToken {
		p.r.violate("revision %d: write by deposed leader (token %d) after its successor (token %d) wrote", rev, token, p.maxToken)
	}
	if token > p.maxToken {
		p.maxToken = token
		p.r.Writers = append(p.r.Writers, token)
	}
	for _, created := range p.leaderKeys {
		if created == token {
			return
		}
	}
	p.r.violate("revision %d: writer token %d is not the create revision of a live leader key", rev, token)
}

// lease applies a lease record (rule 1 and half of rule 2).
func (p *replay) lease(rev int64, value []byte) {
	var l pb.Lease
	if err := proto.Unmarshal(value, &l); err != nil {
		p.r.violate("revision %d: undecodable lease: %v", rev, err)
		return
	}
	p.leases[l.GetId()] = true
	active := l.GetState() == pb.LeaseState_LEASE_STATE_ACTIVE
	if active {
		if other, ok := p.jobLease[l.GetJobId()]; ok && other != l.GetId() {
			p.r.violate("revision %d: job %s has two active leases, %s and %s", rev, l.GetJobId(), other, l.GetId())
		}
		p.jobLease[l.GetJobId()] = l.GetId()
	} else if p.jobLease[l.GetJobId()] == l.GetId() {
		delete(p.jobLease, l.GetJobId())
	}
	for _, n := range l.GetNodes() {
		holder, held := p.nodeLease[n.GetNode()]
		switch {
		case active && held && holder != l.GetId():
			p.r.violate("revision %d: node %s granted to lease %s while lease %s holds it", rev, n.GetNode(), l.GetId(), holder)
		case active:
			p.nodeLease[n.GetNode()] = l.GetId()
		case held && holder == l.GetId():
			delete(p.nodeLease, n.GetNode())
		}
	}
}

// job applies a job record (rule 2).
func (p *replay) job(rev int64, key string, value []byte) {
	var j pb.Job
	if err := proto.Unmarshal(value, &j); err != nil {
		p.r.violate("revision %d: undecodable job %s: %v", rev, key, err)
		return
	}
	seq, err := strconv.ParseUint(strings.TrimPrefix(key, "jobs/"), 10, 64)
	if err != nil || strconv.FormatUint(seq, 10) != j.GetId() {
		p.r.violate("revision %d: job record %s holds job %q", rev, key, j.GetId())
	}
	if _, ok := pb.JobState_name[int32(j.GetState())]; !ok || j.GetState() == pb.JobState_JOB_STATE_UNSPECIFIED {
		p.r.violate("revision %d: job %s has no valid state (%d)", rev, j.GetId(), j.GetState())
	}
	if prev, ok := p.jobs[j.GetId()]; ok && terminal(prev) && prev != j.GetState() {
		p.r.violate("revision %d: job %s left terminal state %s for %s", rev, j.GetId(), prev, j.GetState())
	}
	p.jobs[j.GetId()] = j.GetState()
}

// finish checks what can only be judged at the end.
func (p *replay) finish(accepted []string) {
	p.r.Jobs, p.r.Leases = len(p.jobs), len(p.leases)
	for _, id := range accepted {
		if _, ok := p.jobs[id]; !ok {
			p.r.violate("job %s was accepted but is not in etcd", id)
		}
	}
	for job, lease := range p.jobLease {
		if terminal(p.jobs[job]) {
			p.r.violate("job %s ended (%s) but its lease %s is still active", job, p.jobs[job], lease)
		}
	}
}

func terminal(s pb.JobState) bool {
	switch s {
	case pb.JobState_JOB_STATE_SUCCEEDED, pb.JobState_JOB_STATE_FAILED,
		pb.JobState_JOB_STATE_CANCELLED, pb.JobState_JOB_STATE_TIMED_OUT:
		return true
	}
	return false
}
