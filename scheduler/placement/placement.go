package placement

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"
)

// Node is what placement needs to know of one node.
type Node struct {
	ID             string
	GPUModel       string
	GPUCount       int
	GPUMemoryBytes uint64 // per GPU
	// Labels come from the agent and from operators (rack, switch, zone,
	// pool, ...). The snapshot keeps a reference: callers must not modify
	// the map while the snapshot is in use.
	Labels map[string]string
}

// bucketKey groups interchangeable nodes. Memory is part of the key so the
// memory filter is decided once per bucket, not once per node: nodes of one
// model nearly always share one memory size, so this adds few buckets.
type bucketKey struct {
	model string
	gpus  int
	mem   uint64
}

func (a bucketKey) less(b bucketKey) bool {
	if a.model != b.model {
		return a.model < b.model
	}
	if a.gpus != b.gpus {
		return a.gpus < b.gpus
	}
	return a.mem < b.mem
}

// Snapshot is an immutable view of the cluster for one cycle: the nodes
// that may be leased now, and every known node (to tell "wait" from "never").
// It is never modified after NewSnapshot and may be shared. It refers to the
// slices given to NewSnapshot instead of copying 10k nodes every cycle:
// callers must not modify them while the snapshot is in use.
type Snapshot struct {
	buckets []bucket // sorted by key, for deterministic scans
	// state is room for a cycle's per-free-node state (one byte each),
	// lent by a SnapshotBuilder; nil: the cycle allocates its own. So a
	// snapshot serves one Place or Schedule at a time.
	state []uint8
}

// bucket indexes interchangeable nodes; the index lists hold no pointers,
// so building them costs the garbage collector nothing.
type bucket struct {
	key     bucketKey
	free    []Node  // the caller's free slice
	freeIdx []int32 // into free, sorted by node ID
	all     []Node  // the caller's all slice (or free, see NewSnapshot)
	allIdx  []int32 // into all, unordered
}

func (b *bucket) freeNode(i int) *Node { return &b.free[b.freeIdx[i]] }

// SnapshotBuilder builds snapshots cycle after cycle, reusing the index
// memory of the previous one: a cycle over 10,000 nodes otherwise makes
// most of the scheduler's garbage. The zero value is ready to use.
type SnapshotBuilder struct {
	// FreeInIDOrder promises that free lists nodes in ID order, as the
	// engine keeps them, so BuildFree does not sort.
	FreeInIDOrder bool
	backing       []int32 // the free index lists of the last snapshot
	state         []uint8 // the last snapshot's Snapshot.state

	// BuildFree's index of all, kept while allVersion stays the same.
	allVersion uint64
	allOf      []int32     // bucket of each node of all
	allKeys    []bucketKey // by bucket
	allIdx     [][]int32   // by bucket: indices into all
	nFree      []int32     // scratch: free nodes per bucket
}

// BuildFree is NewSnapshot for a caller that keeps every node in one
// slice: free holds the indices in all of the placeable nodes. allVersion
// names the contents of all: while it stays the same, how all divides into
// buckets is kept from the last build, so a cycle costs a pass over free,
// not the hashing of every node. Change it whenever all changes. The
// snapshot it returned before must no longer be in use.
func (sb *SnapshotBuilder) BuildFree(all []Node, allVersion uint64, free []int32) *Snapshot {
	if sb.allIdx == nil || allVersion != sb.allVersion || len(all) != len(sb.allOf) {
		sb.indexAll(all)
		sb.allVersion = allVersion
	}
	nb := len(sb.allKeys)
	sb.nFree = slices.Grow(sb.nFree[:0], nb)[:nb]
	clear(sb.nFree)
	for _, i := range free {
		sb.nFree[sb.allOf[i]]++
	}
	sb.backing = slices.Grow(sb.backing[:0], len(free))[:len(free)]
	backing := sb.backing
	s := &Snapshot{buckets: make([]bucket, nb)}
	for b, k := range sb.allKeys {
		s.buckets[b] = bucket{key: k, free: all, all: all, allIdx: sb.allIdx[b], freeIdx: backing[:0:sb.nFree[b]]}
		backing = backing[sb.nFree[b]:]
	}
	for _, i := range free {
		bk := &s.buckets[sb.allOf[i]]
		bk.freeIdx = append(bk.freeIdx, i)
	}
	if !sb.FreeInIDOrder {
		for b := range s.buckets {
			byID := func(x, y int32) int { return strings.Compare(all[x].ID, all[y].ID) }
			slices.SortFunc(s.buckets[b].freeIdx, byID)
		}
	}
	sort.Slice(s.buckets, func(i, j int) bool { return s.buckets[i].key.less(s.buckets[j].key) })
	sb.state = slices.Grow(sb.state[:0], len(free))[:len(free)]
	s.state = sb.state
	return s
}

// indexAll divides all into buckets for BuildFree. The index lists are
// allocated anew: snapshots built before may still refer to the old ones.
func (sb *SnapshotBuilder) indexAll(all []Node) {
	idx := map[bucketKey]int32{}
	sb.allKeys = nil
	sb.allOf = slices.Grow(sb.allOf[:0], len(all))[:len(all)]
	var counts []int
	for i := range all {
		n := &all[i]
		k := bucketKey{n.GPUModel, n.GPUCount, n.GPUMemoryBytes}
		b, ok := idx[k]
		if !ok {
			b = int32(len(sb.allKeys))
			idx[k] = b
			sb.allKeys = append(sb.allKeys, k)
			counts = append(counts, 0)
		}
		sb.allOf[i] = b
		counts[b]++
	}
	sb.allIdx = make([][]int32, len(sb.allKeys))
	for b, c := range counts {
		sb.allIdx[b] = make([]int32, 0, c)
	}
	for i, b := range sb.allOf {
		sb.allIdx[b] = append(sb.allIdx[b], int32(i))
	}
}

// NewSnapshot indexes placeable nodes (free) and all known nodes (all).
func NewSnapshot(free, all []Node) *Snapshot {
	idx := map[bucketKey]int32{}
	var keys []bucketKey
	var nFree, nAll []int32 // nodes per bucket
	var lastKey bucketKey
	var last int32 = -1
	bucketOf := func(n *Node) int32 {
		k := bucketKey{n.GPUModel, n.GPUCount, n.GPUMemoryBytes}
		if last >= 0 && k == lastKey {
			return last // nodes come in runs of one shape; skip hashing
		}
		b, ok := idx[k]
		if !ok {
			b = int32(len(keys))
			idx[k] = b
			keys = append(keys, k)
			nFree, nAll = append(nFree, 0), append(nAll, 0)
		}
		lastKey, last = k, b
		return b
	}
	// Counting sort by bucket into one backing array per list.
	of := make([]int32, len(all)+len(free))
	allOf, freeOf := of[:len(all)], of[len(all):]
	for i := range all {
		allOf[i] = bucketOf(&all[i])
		nAll[allOf[i]]++
	}
	for i := range free {
		freeOf[i] = bucketOf(&free[i])
		nFree[freeOf[i]]++
	}
	s := &Snapshot{buckets: make([]bucket, len(keys))}
	backing := make([]int32, len(all)+len(free))
	for b, k := range keys {
		s.buckets[b] = bucket{key: k, free: free, all: all,
			allIdx: backing[:0:nAll[b]], freeIdx: backing[nAll[b] : nAll[b] : nAll[b]+nFree[b]]}
		backing = backing[nAll[b]+nFree[b]:]
	}
	for i, b := range allOf {
		s.buckets[b].allIdx = append(s.buckets[b].allIdx, int32(i))
	}
	for i, b := range freeOf {
		s.buckets[b].freeIdx = append(s.buckets[b].freeIdx, int32(i))
	}
	for b := range s.buckets {
		bk := &s.buckets[b]
		// Callers that list nodes in ID order (the engine does) skip the sort.
		byID := func(a, b int32) int { return strings.Compare(free[a].ID, free[b].ID) }
		if !slices.IsSortedFunc(bk.freeIdx, byID) {
			slices.SortFunc(bk.freeIdx, byID)
		}
		if len(bk.allIdx) < len(bk.freeIdx) {
			// A free node is always known; tolerate callers that forgot it.
			bk.all, bk.allIdx = free, bk.freeIdx
		}
	}
	sort.Slice(s.buckets, func(i, j int) bool { return s.buckets[i].key.less(s.buckets[j].key) })
	return s
}

// Topology asks for a gang's nodes to share one value of a node label.
type Topology struct {
	Key      string // label key, e.g. "rack" or "switch"; empty = none
	Required bool   // false = preferred
}

// Request is one pending job's needs.
type Request struct {
	JobID             string
	Nodes             int
	GPUModel          string // empty: any
	GPUsPerNode       int    // minimum; 0: any
	MinGPUMemoryBytes uint64 // per GPU, minimum; 0: any
	// Selector: every label must be present on the node with exactly
	// this value.
	Selector map[string]string
	Topology Topology

	// Policy inputs, used by Schedule (Place ignores them).
	Tenant   string
	Queue    string        // empty: DefaultQueue
	Priority int           // within the queue; higher first
	Seq      uint64        // submission order, unique
	Waited   time.Duration // how long the job has been pending
}

// matches is the bucket-level filter: model, GPU count and memory.
func (r Request) matches(k bucketKey) bool {
	return (r.GPUModel == "" || r.GPUModel == k.model) && k.gpus >= r.GPUsPerNode && k.mem >= r.MinGPUMemoryBytes
}

// selects is the node-level label filter.
func (r Request) selects(n *Node) bool {
	for k, v := range r.Selector {
		if got, ok := n.Labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// simple requests need no per-node look: counts per bucket decide them.
func (r Request) simple() bool { return len(r.Selector) == 0 && r.Topology.Key == "" }

func (r Request) required() bool { return r.Topology.Key != "" && r.Topology.Required }

// describe renders the request's node shape for humans, e.g.
// "4 H100 nodes with at least 8 GPUs, at least 80 GiB per GPU and pool=prod in one rack".
func (r Request) describe() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d", r.Nodes)
	if r.GPUModel != "" {
		b.WriteString(" " + r.GPUModel)
	}
	if r.Nodes == 1 {
		b.WriteString(" node")
	} else {
		b.WriteString(" nodes")
	}
	var with []string
	if r.GPUsPerNode > 0 {
		with = append(with, fmt.Sprintf("at least %d GPUs", r.GPUsPerNode))
	}
	if r.MinGPUMemoryBytes > 0 {
		with = append(with, "at least "+formatBytes(r.MinGPUMemoryBytes)+" per GPU")
	}
	if len(r.Selector) > 0 {
		sel := make([]string, 0, len(r.Selector))
		for k, v := range r.Selector {
			sel = append(sel, k+"="+v)
		}
		sort.Strings(sel)
		with = append(with, strings.Join(sel, ","))
	}
	if len(with) > 0 {
		b.WriteString(" with ")
		if len(with) > 1 {
			b.WriteString(strings.Join(with[:len(with)-1], ", ") + " and ")
		}
		b.WriteString(with[len(with)-1])
	}
	if r.Topology.Key != "" {
		if r.Topology.Required {
			b.WriteString(" in one " + r.Topology.Key)
		} else {
			b.WriteString(" preferably in one " + r.Topology.Key)
		}
	}
	return b.String()
}

const gib = 1 << 30

// formatBytes renders memory in GiB: "80 GiB", "79.6 GiB".
func formatBytes(n uint64) string {
	if n%gib == 0 {
		return fmt.Sprintf("%d GiB", n/gib)
	}
	return fmt.Sprintf("%.1f GiB", float64(n)/gib)
}

// Assignment gives a job its nodes, in rank order.
type Assignment struct {
	JobID string
	Nodes []string
}

// Plan is the output of one cycle.
type Plan struct {
	Assignments []Assignment
	// Why holds, by index of the requests given, why each request that was
	// not placed waits; "" for a placed one. (A slice, not a map by job ID:
	// a deep queue made that map the most expensive part of a cycle.)
	Why []string
	// reqs are the requests Why is indexed by.
	reqs []Request
}

// PendingReasons maps each request that was not placed to why it waits.
func (p Plan) PendingReasons() map[string]string {
	out := make(map[string]string)
	for i, why := range p.Why {
		if why != "" {
			out[p.reqs[i].JobID] = why
		}
	}
	return out
}

// cursor is a cycle's per-bucket consumption state; the Snapshot is untouched.
type cursor struct {
	state []uint8 // by index into the bucket's free list: nodeFree, nodeTaken or nodeHeld
	n     int     // how many are not free (taken or held)
	held  int     // how many are held
	next  int     // every node before next is taken or held
}

const (
	nodeFree uint8 = iota
	nodeTaken
	nodeHeld // kept free for a blocked gang (Schedule only)
)

func (c *cursor) mark(i int, st uint8) {
	c.state[i] = st
	c.n++
	if st == nodeHeld {
		c.held++
	}
	for c.next < len(c.state) && c.state[c.next] != nodeFree {
		c.next++
	}
}

func (c *cursor) take(i int) { c.mark(i, nodeTaken) }

// candidate is a free node that passed every filter for one request.
type candidate struct {
	b, i   int    // bucket, index in its free list
	domain string // value of the topology label
	has    bool   // the node has the topology label
}

// cycle is the consumption state of one Place or Schedule call.
type cycle struct {
	s             *Snapshot
	cur           []cursor
	cands, cands2 []candidate // scratch, reused across requests
	holds         int         // nodes held (Schedule only)
	// reasons memoizes the why-pending text of simple requests: a deep
	// queue holds many requests of one shape facing the same free count,
	// and formatting each one's reason anew dominated a cycle.
	reasons map[simpleReasonKey]outcome
}

// simpleReasonKey is everything a simple request's reason depends on.
type simpleReasonKey struct {
	nodes, gpus int
	model       string
	mem         uint64
	free        int
}

func newCycle(s *Snapshot) *cycle {
	c := &cycle{s: s, cur: make([]cursor, len(s.buckets)), reasons: map[simpleReasonKey]outcome{}}
	n := 0
	for b := range s.buckets {
		n += len(s.buckets[b].freeIdx)
	}
	state := s.state
	if len(state) < n {
		state = make([]uint8, n)
	}
	clear(state[:n])
	for b := range c.cur {
		k := len(s.buckets[b].freeIdx)
		c.cur[b].state, state = state[:k:k], state[k:]
	}
	return c
}

// Place assigns nodes to requests in the order given (the caller's policy
// order). A request gets all its nodes or none (gang); a request that does
// not fit leaves its nodes to later requests. Place holds no nodes and
// applies no quota: Schedule is the policy-driven entry point.
//
// Filters, in order: (model, GPUs/node, memory) bucket → label selector →
// topology domain. Simple requests (no selector, no topology) are decided
// from per-bucket counts alone; the others look at the free nodes of the
// matching buckets only.
//
// For 10k-node clusters with many selector or topology requests, a label
// index belongs in the Snapshot: per bucket, free node indices by label
// key=value (and per-domain free lists for topology keys), so a selector
// intersects short posting lists instead of scanning a bucket, and domain
// counts come from list lengths minus what this call has taken.
func Place(s *Snapshot, reqs []Request) Plan {
	plan := Plan{Why: make([]string, len(reqs)), reqs: reqs}
	c := newCycle(s)
	for i, r := range reqs {
		a := c.attempt(r, nil)
		if !a.ok {
			plan.Why[i] = a.why
			continue
		}
		plan.Assignments = append(plan.Assignments, Assignment{JobID: r.JobID, Nodes: c.commit(a.pick)})
	}
	return plan
}

// outcome is one attempt to place a request.
type outcome struct {
	ok   bool
	pick []candidate // when ok: the nodes, in rank order
	why  string      // when not ok
	// wait: not ok only because nodes are busy or held; the cluster as it
	// stands could hold the request.
	wait bool
	// behind: it would fit if the held nodes were free.
	behind bool
	// capped: it would fit (by count) without the per-model budget.
	capped bool
}

// attempt decides r against the free, unheld nodes. budget, when not nil,
// is how many more nodes of each listed model r may take (a tenant's
// per-model caps for a request of any model); unlisted models are
// unlimited. attempt changes nothing: commit takes the pick.
func (c *cycle) attempt(r Request, budget map[string]int) outcome {
	if r.simple() {
		free := c.simpleFree(r, budget, false)
		if free >= r.Nodes {
			c.cands = c.simplePick(r, budget, r.Nodes, c.cands[:0])
			return outcome{ok: true, pick: c.cands}
		}
		if c.holds > 0 && c.simpleFree(r, budget, true) >= r.Nodes {
			return outcome{behind: true, wait: true}
		}
		if budget != nil && c.simpleFree(r, nil, false) >= r.Nodes {
			return outcome{capped: true}
		}
		k := simpleReasonKey{nodes: r.Nodes, gpus: r.GPUsPerNode, model: r.GPUModel, mem: r.MinGPUMemoryBytes, free: free}
		o, ok := c.reasons[k]
		if !ok {
			o.why, o.wait = c.s.reason(r, free, nil)
			c.reasons[k] = o
		}
		return o
	}

	c.cands = c.candidates(r, budget, false, c.cands[:0])
	if len(c.cands) >= r.Nodes {
		if pick, ok := choose(r, c.cands); ok {
			return outcome{ok: true, pick: pick}
		}
	}
	if c.holds > 0 {
		c.cands2 = c.candidates(r, budget, true, c.cands2[:0])
		if len(c.cands2) >= r.Nodes {
			if _, ok := choose(r, c.cands2); ok {
				return outcome{behind: true, wait: true}
			}
		}
	}
	if budget != nil {
		c.cands2 = c.candidates(r, nil, false, c.cands2[:0])
		if len(c.cands2) >= r.Nodes {
			if _, ok := choose(r, c.cands2); ok {
				return outcome{capped: true}
			}
		}
	}
	var why string
	var wait bool
	if len(c.cands) < r.Nodes {
		why, wait = c.s.reason(r, len(c.cands), nil)
	} else {
		why, wait = c.s.reason(r, len(c.cands), c.cands)
	}
	return outcome{why: why, wait: wait}
}

// commit takes the picked nodes and returns their IDs in rank order.
func (c *cycle) commit(pick []candidate) []string {
	nodes := make([]string, len(pick))
	for j, cd := range pick {
		nodes[j] = c.s.buckets[cd.b].freeNode(cd.i).ID
		c.cur[cd.b].take(cd.i)
	}
	return nodes
}

// simpleFree counts the free nodes a simple request may take: per bucket
// counts, capped per model by budget. withHeld counts held nodes as free.
func (c *cycle) simpleFree(r Request, budget map[string]int, withHeld bool) int {
	total, run, model, open := 0, 0, "", false
	flush := func() {
		if lim, ok := budget[model]; ok {
			run = min(run, lim)
		}
		total += run
	}
	for b := range c.s.buckets {
		k := c.s.buckets[b].key
		if !r.matches(k) {
			continue
		}
		if !open || k.model != model { // buckets are sorted by model first
			if open {
				flush()
			}
			model, run, open = k.model, 0, true
		}
		run += len(c.cur[b].state) - c.cur[b].n
		if withHeld {
			run += c.cur[b].held
		}
	}
	if open {
		flush()
	}
	return total
}

// simplePick appends up to n free, unheld nodes that match a simple request,
// in bucket and ID order, within budget.
func (c *cycle) simplePick(r Request, budget map[string]int, n int, out []candidate) []candidate {
	got, model, left, capped, open := 0, "", 0, false, false
	for b := range c.s.buckets {
		k := c.s.buckets[b].key
		if !r.matches(k) {
			continue
		}
		if !open || k.model != model { // buckets are sorted by model first
			model, open = k.model, true
			left, capped = budget[model]
		}
		cu := &c.cur[b]
		for i := cu.next; i < len(cu.state) && got < n && (!capped || left > 0); i++ {
			if cu.state[i] == nodeFree {
				out = append(out, candidate{b: b, i: i})
				got++
				left--
			}
		}
		if got == n {
			break
		}
	}
	return out
}

// candidates appends the untaken free nodes that pass every node filter, in
// scan order (bucket order, then ID), within budget (see attempt). withHeld
// includes held nodes.
func (c *cycle) candidates(r Request, budget map[string]int, withHeld bool, out []candidate) []candidate {
	model, left, capped, open := "", 0, false, false
	for b := range c.s.buckets {
		k := c.s.buckets[b].key
		if !r.matches(k) {
			continue
		}
		if !open || k.model != model { // buckets are sorted by model first
			model, open = k.model, true
			left, capped = budget[model]
		}
		cu := &c.cur[b]
		start := cu.next
		if withHeld {
			start = 0
		}
		for i := start; i < len(cu.state) && (!capped || left > 0); i++ {
			if st := cu.state[i]; st == nodeTaken || st == nodeHeld && !withHeld {
				continue
			}
			n := c.s.buckets[b].freeNode(i)
			if !r.selects(n) {
				continue
			}
			cd := candidate{b: b, i: i}
			if r.Topology.Key != "" {
				cd.domain, cd.has = n.Labels[r.Topology.Key]
				if !cd.has && r.Topology.Required {
					continue // required: a node without the label is in no domain
				}
			}
			out = append(out, cd)
			left--
		}
	}
	return out
}

// choose picks r.Nodes of cands (len(cands) >= r.Nodes) honouring the
// topology, or reports false when a required topology cannot be met.
//
// Best fit: the domain with the fewest free candidates that still holds the
// whole gang, ties by domain name. This packs gangs into small domains and
// keeps big domains whole for big gangs. Preferred topology with no domain
// big enough spans the fewest domains: largest first (ties by name), then
// nodes without the label.
func choose(r Request, cands []candidate) ([]candidate, bool) {
	if r.Topology.Key == "" {
		return cands[:r.Nodes], true
	}
	count := map[string]int{} // free candidates per domain
	for _, c := range cands {
		if c.has {
			count[c.domain]++
		}
	}
	best, found := "", false
	for d, n := range count {
		if n >= r.Nodes && (!found || n < count[best] || (n == count[best] && d < best)) {
			best, found = d, true
		}
	}
	if found {
		pick := make([]candidate, 0, r.Nodes)
		for _, c := range cands {
			if c.has && c.domain == best {
				if pick = append(pick, c); len(pick) == r.Nodes {
					break
				}
			}
		}
		return pick, true
	}
	if r.Topology.Required {
		return nil, false
	}
	domains := make([]string, 0, len(count))
	for d := range count {
		domains = append(domains, d)
	}
	sort.Slice(domains, func(i, j int) bool {
		if a, b := count[domains[i]], count[domains[j]]; a != b {
			return a > b
		}
		return domains[i] < domains[j]
	})
	rank := make(map[string]int, len(domains))
	for i, d := range domains {
		rank[d] = i
	}
	pick := slices.Clone(cands)
	sort.SliceStable(pick, func(i, j int) bool { return domainRank(pick[i], rank) < domainRank(pick[j], rank) })
	return pick[:r.Nodes], true
}

// domainRank orders a candidate for spanning: by its domain's rank, nodes
// without the label last.
func domainRank(c candidate, rank map[string]int) int {
	if !c.has {
		return len(rank)
	}
	return rank[c.domain]
}

// reason explains why r waits, given how many free nodes pass its filters
// (free) and, for a required topology that did not fit, those nodes (cands).
// "needs" means the cluster cannot hold r as it stands; "waiting for" means
// it could once enough nodes are released.
//
// wait reports that the cluster as it stands could hold r: it waits only
// for busy nodes (the "waiting for" and "best ... has N free" cases).
func (s *Snapshot) reason(r Request, free int, cands []candidate) (why string, wait bool) {
	total, domains := s.totals(r)
	total = max(total, free) // a free node is always known
	largest := 0
	for _, n := range domains {
		largest = max(largest, n)
	}
	bestFree := 0
	if cands != nil {
		perDomain := map[string]int{}
		for _, c := range cands {
			perDomain[c.domain]++
			bestFree = max(bestFree, perDomain[c.domain])
		}
		largest = max(largest, bestFree)
	}
	switch {
	case total < r.Nodes:
		return fmt.Sprintf("needs %s; cluster has %d", r.describe(), total), false
	case r.required() && largest < r.Nodes:
		return fmt.Sprintf("needs %s; largest %s has %d", r.describe(), r.Topology.Key, largest), false
	case free < r.Nodes:
		return fmt.Sprintf("waiting for %s; %d of %d free", r.describe(), free, total), true
	default: // only a required topology refuses with enough free nodes
		return fmt.Sprintf("needs %s; best %s has %d free", r.describe(), r.Topology.Key, bestFree), true
	}
}

// totals counts every known node that passes r's filters and, for a
// required topology, those nodes per domain (nodes without the label are
// not counted at all).
func (s *Snapshot) totals(r Request) (int, map[string]int) {
	total := 0
	var domains map[string]int
	if r.required() {
		domains = map[string]int{}
	}
	for b := range s.buckets {
		bk := &s.buckets[b]
		if !r.matches(bk.key) {
			continue
		}
		if len(r.Selector) == 0 && !r.required() {
			total += len(bk.allIdx)
			continue
		}
		for _, i := range bk.allIdx {
			n := &bk.all[i]
			if !r.selects(n) {
				continue
			}
			if domains != nil {
				d, ok := n.Labels[r.Topology.Key]
				if !ok {
					continue
				}
				domains[d]++
			}
			total++
		}
	}
	return total, domains
}
