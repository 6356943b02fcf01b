package placement

import (
	"container/heap"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"
)

// Tenant is a tenant's policy: hard quotas and a fair-share weight.
type Tenant struct {
	Name             string
	MaxNodes         int            // 0: unlimited
	MaxNodesPerModel map[string]int // GPU model -> cap; absent: unlimited
	Weight           float64        // <= 0: 1
}

// Queue is a queue's policy. Weight is carried for the caller; ordering
// uses Priority only.
type Queue struct {
	Name     string
	Priority int
	Weight   float64
	Paused   bool
}

// Usage is what a tenant holds in active leases now.
type Usage struct {
	Nodes    int
	PerModel map[string]int // GPU model -> nodes
}

// Policy is everything Schedule needs besides the snapshot and the
// requests. Time enters as data (AgingStep, Request.Waited): Schedule reads
// no clock.
type Policy struct {
	Tenants map[string]Tenant // a tenant not listed: unlimited, weight 1
	Queues  map[string]Queue  // a queue not listed: priority 0, not paused
	Usage   map[string]Usage  // by tenant
	// AgingStep: every AgingStep a job has waited adds 1 to its priority
	// (0: no aging).
	AgingStep time.Duration
}

// DefaultQueue names the queue of a request with an empty Queue.
const DefaultQueue = "default"

// Schedule is one policy-driven cycle: it orders reqs (given in any order)
// by policy, applies quotas and paused queues, holds nodes for the first
// blocked gang, and places each request with the same filters, gang and
// topology rules as Place.
//
// Order, re-evaluated after every placement:
//  1. queue priority, higher first;
//  2. the tenant's fair share, lower first: dominant share / weight, where
//     the dominant share is the largest, over GPU models, of the nodes of
//     that model the tenant holds (Usage plus this cycle's assignments)
//     over all known nodes of that model in the snapshot;
//  3. effective job priority, higher first: Priority + Waited/AgingStep;
//  4. Seq, lower first.
//
// Holding: the first request in that order that waits only because nodes
// are busy (its reason is "waiting for ..." or "... best rack has N free":
// the cluster as it stands could hold it) holds the free nodes that match
// it, up to its size (for a required topology: in its domain with the most
// free matching nodes). No later request of the cycle may take them; one
// that fits only with them waits "behind job ID (needs ...) in queue Q",
// one that fits elsewhere is placed. One holder per cycle.
func Schedule(s *Snapshot, p Policy, reqs []Request) Plan {
	// Most requests of a large backlog stay pending: size for them.
	plan := Plan{Why: make([]string, len(reqs)), reqs: reqs}
	c := newCycle(s)
	sc := newScheduler(s, p)

	// Group by (queue, tenant): within a group only the static key (job
	// priority, Seq) orders requests; a heap of group heads orders groups.
	type gk struct{ queue, tenant string }
	groups := map[gk]*group{}
	var order []*group
	paused := map[string]string{} // queue -> reason, formatted once
	for i := range reqs {
		r := &reqs[i]
		qn := r.Queue
		if qn == "" {
			qn = DefaultQueue
		}
		q := p.Queues[qn]
		if q.Paused {
			if paused[qn] == "" {
				paused[qn] = fmt.Sprintf("queue %s paused", qn)
			}
			plan.Why[i] = paused[qn]
			continue
		}
		k := gk{qn, r.Tenant}
		g := groups[k]
		if g == nil {
			t := sc.tenant(r.Tenant)
			g = &group{queue: qn, prio: q.Priority, t: t}
			groups[k] = g
			order = append(order, g)
			t.groups = append(t.groups, g)
		}
		eff := int64(r.Priority)
		if p.AgingStep > 0 && r.Waited > 0 {
			eff += int64(r.Waited / p.AgingStep)
		}
		g.reqs = append(g.reqs, entry{eff: eff, seq: r.Seq, i: int32(i)})
	}
	h := make(groupHeap, 0, len(order))
	for _, g := range order {
		slices.SortFunc(g.reqs, func(a, b entry) int {
			if a.eff != b.eff {
				if a.eff > b.eff {
					return -1
				}
				return 1
			}
			if a.seq != b.seq {
				if a.seq < b.seq {
					return -1
				}
				return 1
			}
			return int(a.i) - int(b.i)
		})
		g.pos = len(h)
		h = append(h, g)
	}
	heap.Init(&h)

	var holder *Request
	var holderQueue string
	var behind string // the reason of requests behind holder, formatted once
	for len(h) > 0 {
		g := h[0]
		ri := g.reqs[g.next].i
		r := reqs[ri]
		g.next++
		if g.next == len(g.reqs) {
			heap.Pop(&h)
		} else {
			heap.Fix(&h, 0)
		}
		t := g.t
		why, budget := t.check(r)
		if why != "" {
			plan.Why[ri] = why
			continue
		}
		a := c.attempt(r, budget)
		switch {
		case a.ok:
			pick := a.pick
			plan.Assignments = append(plan.Assignments, Assignment{JobID: r.JobID, Nodes: c.commit(pick)})
			for _, cd := range pick {
				t.perModel[s.buckets[cd.b].key.model]++
			}
			t.nodes += len(pick)
			t.share = sc.share(t)
			for _, tg := range t.groups {
				if tg.pos >= 0 {
					heap.Fix(&h, tg.pos)
				}
			}
		case a.behind:
			if behind == "" {
				behind = fmt.Sprintf("behind job %s (needs %s) in queue %s", holder.JobID, holder.describe(), holderQueue)
			}
			plan.Why[ri] = behind
		case a.capped:
			plan.Why[ri] = t.cappedReason(c, r, budget)
		default:
			plan.Why[ri] = a.why
			if a.wait && holder == nil && c.hold(r, budget) > 0 {
				holder, holderQueue = &r, g.queue
			}
		}
	}
	return plan
}

// entry is one request in its group: the static part of its order.
type entry struct {
	eff int64 // effective priority
	seq uint64
	i   int32 // index in reqs
}

// group is the requests of one tenant in one queue, in static order; next
// is its head.
type group struct {
	queue string
	prio  int
	t     *tenantState
	reqs  []entry
	next  int
	pos   int // index in the heap; -1 once popped
}

type groupHeap []*group

func (h groupHeap) Len() int { return len(h) }
func (h groupHeap) Less(i, j int) bool {
	a, b := h[i], h[j]
	if a.prio != b.prio {
		return a.prio > b.prio
	}
	if a.t.share != b.t.share {
		return a.t.share < b.t.share
	}
	ea, eb := a.reqs[a.next], b.reqs[b.next]
	if ea.eff != eb.eff {
		return ea.eff > eb.eff
	}
	if ea.seq != eb.seq {
		return ea.seq < eb.seq
	}
	return ea.i < eb.i
}
func (h groupHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].pos, h[j].pos = i, j
}
func (h *groupHeap) Push(x any) {
	g := x.(*group)
	g.pos = len(*h)
	*h = append(*h, g)
}
func (h *groupHeap) Pop() any {
	old := *h
	g := old[len(old)-1]
	g.pos = -1
	*h = old[:len(old)-1]
	return g
}

// scheduler holds a Schedule call's per-tenant state.
type scheduler struct {
	p          Policy
	modelTotal map[string]int // known nodes per GPU model
	total      int            // known nodes
	tenants    map[string]*tenantState
}

func newScheduler(s *Snapshot, p Policy) *scheduler {
	sc := &scheduler{p: p, modelTotal: map[string]int{}, tenants: map[string]*tenantState{}}
	for b := range s.buckets {
		n := len(s.buckets[b].allIdx)
		sc.modelTotal[s.buckets[b].key.model] += n
		sc.total += n
	}
	return sc
}

// tenantState is a tenant's policy and what it holds, this cycle included.
type tenantState struct {
	name     string
	spec     Tenant
	weight   float64
	nodes    int
	perModel map[string]int
	share    float64 // dominant share / weight
	groups   []*group
	// atQuota and atModelQuota cache the "at quota" reasons, which every
	// waiting request of a full tenant shares, keyed by the usage they
	// were formatted at.
	atQuota      quotaReason
	atModelQuota map[string]quotaReason
}

// quotaReason is a formatted reason and the usage it describes.
type quotaReason struct {
	nodes int
	why   string
}

func (sc *scheduler) tenant(name string) *tenantState {
	if t := sc.tenants[name]; t != nil {
		return t
	}
	spec := sc.p.Tenants[name]
	u := sc.p.Usage[name]
	t := &tenantState{name: name, spec: spec, weight: spec.Weight, nodes: u.Nodes, perModel: map[string]int{}}
	if t.weight <= 0 {
		t.weight = 1
	}
	for m, n := range u.PerModel {
		t.perModel[m] = n
	}
	t.share = sc.share(t)
	sc.tenants[name] = t
	return t
}

// share is t's dominant share over its weight. nodes/total is a lower bound
// of the per-model maximum when PerModel is complete, and stands in for it
// when the caller gave only a node count.
func (sc *scheduler) share(t *tenantState) float64 {
	d := 0.0
	if sc.total > 0 {
		d = float64(t.nodes) / float64(sc.total)
	}
	for m, n := range t.perModel {
		if tot := sc.modelTotal[m]; tot > 0 {
			d = max(d, float64(n)/float64(tot))
		}
	}
	return d / t.weight
}

// check applies t's quotas to r: a reason when r would exceed one, else,
// for a request of any model under per-model caps, how many more nodes of
// each capped model r may take (nil: no limit).
func (t *tenantState) check(r Request) (string, map[string]int) {
	if lim := t.spec.MaxNodes; lim > 0 {
		if r.Nodes > lim {
			return fmt.Sprintf("needs %d nodes; tenant %s quota is %d nodes", r.Nodes, t.name, lim), nil
		}
		if t.nodes+r.Nodes > lim {
			// Every waiting request of a tenant at quota gets this text:
			// format it once per usage level, not once per request.
			if t.atQuota.nodes != t.nodes || t.atQuota.why == "" {
				t.atQuota.nodes, t.atQuota.why = t.nodes, fmt.Sprintf("tenant %s at quota (%d/%d nodes)", t.name, t.nodes, lim)
			}
			return t.atQuota.why, nil
		}
	}
	caps := t.spec.MaxNodesPerModel
	if len(caps) == 0 {
		return "", nil
	}
	if r.GPUModel != "" {
		lim, ok := caps[r.GPUModel]
		switch {
		case !ok:
		case r.Nodes > lim:
			return fmt.Sprintf("needs %d %s nodes; tenant %s quota is %d %s nodes", r.Nodes, r.GPUModel, t.name, lim, r.GPUModel), nil
		case t.perModel[r.GPUModel]+r.Nodes > lim:
			used := t.perModel[r.GPUModel]
			q, ok := t.atModelQuota[r.GPUModel]
			if !ok || q.nodes != used {
				if t.atModelQuota == nil {
					t.atModelQuota = map[string]quotaReason{}
				}
				q = quotaReason{nodes: used, why: fmt.Sprintf("tenant %s at quota for %s (%d/%d nodes)", t.name, r.GPUModel, used, lim)}
				t.atModelQuota[r.GPUModel] = q
			}
			return q.why, nil
		}
		return "", nil
	}
	budget := make(map[string]int, len(caps))
	for m, lim := range caps {
		budget[m] = max(0, lim-t.perModel[m])
	}
	return "", budget
}

// cappedReason explains a request of any model that fits the free nodes
// only beyond t's per-model caps: it names the capped models whose cap
// left fewer nodes than are free for r, e.g.
// "tenant acme at quota for A100 (2/2 nodes) and H100 (3/4 nodes)".
func (t *tenantState) cappedReason(c *cycle, r Request, budget map[string]int) string {
	c.cands2 = c.candidates(r, nil, false, c.cands2[:0])
	free := map[string]int{}
	for _, cd := range c.cands2 {
		free[c.s.buckets[cd.b].key.model]++
	}
	var parts []string
	for m, left := range budget {
		if free[m] > left {
			parts = append(parts, fmt.Sprintf("%s (%d/%d nodes)", m, t.perModel[m], t.spec.MaxNodesPerModel[m]))
		}
	}
	sort.Strings(parts)
	if len(parts) > 1 {
		return fmt.Sprintf("tenant %s at quota for %s and %s", t.name, strings.Join(parts[:len(parts)-1], ", "), parts[len(parts)-1])
	}
	return fmt.Sprintf("tenant %s at quota for %s", t.name, strings.Join(parts, ""))
}

// hold marks the free, unheld nodes that match r (within budget), up to
// r.Nodes, as held; for a required topology only those of the domain with
// the most of them (ties by name). It returns how many it held.
func (c *cycle) hold(r Request, budget map[string]int) int {
	var set []candidate
	if r.simple() {
		set = c.simplePick(r, budget, r.Nodes, c.cands[:0])
	} else {
		set = c.candidates(r, budget, false, c.cands[:0])
		if r.required() {
			count := map[string]int{}
			best := ""
			for _, cd := range set {
				count[cd.domain]++
			}
			for d, n := range count {
				if n > count[best] || (n == count[best] && d < best) {
					best = d
				}
			}
			kept := set[:0]
			for _, cd := range set {
				if cd.domain == best {
					kept = append(kept, cd)
				}
			}
			set = kept
		}
		if len(set) > r.Nodes {
			set = set[:r.Nodes]
		}
	}
	for _, cd := range set {
		c.cur[cd.b].mark(cd.i, nodeHeld)
	}
	c.holds += len(set)
	return len(set)
}
