package engine

import (
	"container/heap"
	"context"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/placement"
)

// nodeEntry is a node plus what the leader derives in memory. node.State
// holds only the persisted, operator/health part (READY, DRAINED, UNHEALTHY);
// LEASED, CLEANING and LOST are derived, so a placement writes no node
// records and a restart recomputes them from leases and agent reports.
type nodeEntry struct {
	node *model.Node
	// lease is the active lease holding the node, and tenant its tenant;
	// heldModel is the GPU model the hold counts in the tenant's usage.
	// Set only through Engine.hold and unhold (usage.go).
	lease, tenant, heldModel string
	// cleaning is an ended lease the agent has not yet released.
	cleaning string
	conn     *agentConn
	// disconnectedAt is when the stream went away (or the term started).
	disconnectedAt time.Time
	lost           bool
	// placement is what a placement cycle sees of the node; built on
	// first use and dropped (stale) whenever its inventory or labels change.
	placement *placement.Node
}

// placementNode returns the node as placement sees it, building it once
// per change: every cycle visits every node, so it must not allocate.
func (n *nodeEntry) placementNode() *placement.Node {
	if n.placement == nil {
		inv := n.node.Inventory
		n.placement = &placement.Node{ID: n.node.ID, GPUModel: inv.GPUModel, GPUCount: inv.GPUCount,
			GPUMemoryBytes: inv.GPUMemoryBytes, Labels: n.node.EffectiveLabels()}
	}
	return n.placement
}

// view renders the node as clients see it.
func (n *nodeEntry) view() *model.Node {
	v := n.node.Clone()
	v.Connected = n.conn != nil
	switch {
	case n.lost:
		v.State, v.Reason, v.LeaseID = model.NodeLost, "agent disconnected", n.lease
	case n.node.Drain && (n.lease != "" || n.cleaning != ""):
		v.State, v.LeaseID = model.NodeDraining, n.lease+n.cleaning
	case n.lease != "":
		v.State, v.LeaseID = model.NodeLeased, n.lease
	case n.cleaning != "":
		v.State, v.LeaseID = model.NodeCleaning, n.cleaning
	case n.node.State == model.NodeReady && n.node.Drain:
		v.State = model.NodeDrained
	}
	return v
}

// placeable reports whether the node may be given a new lease now.
func (n *nodeEntry) placeable() bool {
	return n.conn != nil && n.lease == "" && n.cleaning == "" && n.node.State == model.NodeReady && !n.node.Drain
}

// leaseEntry is a lease plus per-node progress kept in memory. Agents
// re-report progress when they reconnect, so none of it needs etcd. Only
// an active lease has progress: the leader holds every lease ever granted.
type leaseEntry struct {
	lease *model.Lease
	// progress is each node's, by rank, while the lease is active (nil
	// once it ended: read as none); started and exited count the nodes
	// with each.
	progress        []nodeProgress
	started, exited int
}

// nodeProgress is what one node of an active lease has reported.
type nodeProgress uint8

const (
	progressStarted nodeProgress = 1 << iota
	progressExited
)

func newLeaseEntry(l *model.Lease) *leaseEntry {
	le := &leaseEntry{lease: l}
	if l.Active {
		le.progress = make([]nodeProgress, len(l.Nodes))
	}
	return le
}

// has reports whether node reported p.
func (l *leaseEntry) has(node string, p nodeProgress) bool {
	r := l.rank(node)
	return r >= 0 && r < len(l.progress) && l.progress[r]&p != 0
}

// mark records that node reported p, and reports whether that is news.
func (l *leaseEntry) mark(node string, p nodeProgress) bool {
	r := l.rank(node)
	if r < 0 || r >= len(l.progress) || l.progress[r]&p != 0 {
		return false
	}
	l.progress[r] |= p
	return true
}

// rank returns the node's rank in the lease, or -1.
func (l *leaseEntry) rank(node string) int {
	for _, n := range l.lease.Nodes {
		if n.Node == node {
			return n.Rank
		}
	}
	return -1
}

// pendingQueue holds pending jobs in FIFO (submission) order.
type pendingQueue struct {
	jobs []*model.Job // sorted by Seq
}

func (q *pendingQueue) push(j *model.Job) {
	n := len(q.jobs)
	if n == 0 || q.jobs[n-1].Seq < j.Seq {
		q.jobs = append(q.jobs, j)
		return
	}
	i := sort.Search(n, func(i int) bool { return q.jobs[i].Seq >= j.Seq })
	q.jobs = append(q.jobs, nil)
	copy(q.jobs[i+1:], q.jobs[i:])
	q.jobs[i] = j
}

// compact drops jobs that are no longer pending.
func (q *pendingQueue) compact() {
	out := q.jobs[:0]
	for _, j := range q.jobs {
		if j.State == model.JobPending {
			out = append(out, j)
		}
	}
	for i := len(out); i < len(q.jobs); i++ {
		q.jobs[i] = nil
	}
	q.jobs = out
}

// deadline is a running lease's time limit.
type deadline struct {
	at    time.Time
	job   string
	lease string
}

type deadlineHeap []deadline

func (h deadlineHeap) Len() int           { return len(h) }
func (h deadlineHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h deadlineHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *deadlineHeap) Push(x any)        { *h = append(*h, x.(deadline)) }
func (h *deadlineHeap) Pop() any {
	old := *h
	d := old[len(old)-1]
	*h = old[:len(old)-1]
	return d
}

// load rebuilds memory from etcd at the start of the term.
func (e *Engine) load(ctx context.Context) error {
	st, err := e.cfg.Store.Load(ctx)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	now := e.cfg.Now()
	e.jobSeq, e.rev = st.JobSeq, st.Revision
	for _, t := range st.Tenants {
		e.tenants[t.Name] = t
	}
	for _, q := range st.Queues {
		e.queues[q.Name] = q
	}
	for i := range st.Idem {
		r := &st.Idem[i]
		e.idem[idemID(r.Tenant, r.Key)] = r
		e.idemOrder = append(e.idemOrder, r)
	}
	sort.Slice(e.idemOrder, func(i, j int) bool { return e.idemOrder[i].CreateTime.Before(e.idemOrder[j].CreateTime) })
	for _, n := range st.Nodes {
		ne := &nodeEntry{node: n, disconnectedAt: now}
		e.nodes[n.ID] = ne
		e.nodeCount.Store(int64(len(e.nodes)))
		e.offline[ne] = struct{}{}
	}
	for _, j := range st.Jobs {
		e.jobs[j.ID] = j
		e.order = append(e.order, j.Seq) // the store returns jobs in key (Seq) order
		if j.Seq > e.jobSeq {
			// Cannot happen with fenced writes (seq lands first), but never
			// hand out an ID twice if it somehow did.
			e.jobSeq = j.Seq
		}
		if j.State == model.JobPending {
			e.queue.push(j)
		}
	}
	// Ended jobs stay encoded, as they were read (archive.go).
	for _, j := range st.Jobs {
		if record, ok := st.EndedRecords[j.Seq]; ok && e.jobs[j.ID] == j {
			e.archiveJob(j, record)
		}
	}
	for _, l := range st.Leases {
		if !l.Active {
			if record, ok := st.EndedLeaseRecords[l.ID]; !ok || !e.archiveLease(l, record) {
				e.leases[l.ID] = newLeaseEntry(l)
			}
			continue
		}
		e.leases[l.ID] = newLeaseEntry(l)
		for _, ln := range l.Nodes {
			n, ok := e.nodes[ln.Node]
			if !ok {
				return fmt.Errorf("engine: lease %s names unknown node %s", l.ID, ln.Node)
			}
			e.hold(n, l.ID, l.Tenant)
		}
		if j := e.jobs[l.JobID]; j != nil && j.Spec.TimeLimit > 0 {
			heap.Push(&e.deadlines, deadline{at: j.ScheduleTime.Add(j.Spec.TimeLimit), job: j.ID, lease: l.ID})
		}
	}
	e.ready = true
	e.needCycle = true
	return nil
}

// nextJobID hands out the next job sequence number and its ID.
func (e *Engine) nextJobID() (uint64, string) {
	e.jobSeq++
	e.seqDirty = true
	return e.jobSeq, strconv.FormatUint(e.jobSeq, 10)
}
