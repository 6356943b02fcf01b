package placement

import (
	"fmt"
	"slices"
	"sort"
	"strings"
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

// NewSnapshot indexes placeable nodes (free) and all known nodes (all).
func NewSnapshot(free, all []Node) *Snapshot {
	idx := map[bucketKey]int32{}
	var keys []bucketKey
	var nFree, nAll []int32 // nodes per bucket
	bucketOf := func(n *Node) int32 {
		k := bucketKey{n.GPUModel, n.GPUCount, n.GPUMemoryBytes}
		b, ok := idx[k]
		if !ok {
			b = int32(len(keys))
			idx[k] = b
			keys = append(keys, k)
			nFree, nAll = append(nFree, 0), append(nAll, 0)
		}
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
		sort.Slice(bk.freeIdx, func(i, j int) bool { return free[bk.freeIdx[i]].ID < free[bk.freeIdx[j]].ID })
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
	// Pending maps each request that was not placed to why it waits.
	Pending map[string]string
}

// cursor is Place's per-bucket consumption state; the Snapshot is untouched.
type cursor struct {
	taken []bool // by index into the bucket's free list
	n     int    // how many are taken
	next  int    // every node before next is taken
}

func (c *cursor) take(i int) {
	c.taken[i] = true
	c.n++
	for c.next < len(c.taken) && c.taken[c.next] {
		c.next++
	}
}

// candidate is a free node that passed every filter for one request.
type candidate struct {
	b, i   int    // bucket, index in its free list
	domain string // value of the topology label
	has    bool   // the node has the topology label
}

// Place assigns nodes to requests in the order given (the caller's policy
// order). A request gets all its nodes or none (gang); a request that does
// not fit leaves its nodes to later requests.
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
	plan := Plan{Pending: map[string]string{}}
	cur := make([]cursor, len(s.buckets))
	for b := range cur {
		cur[b].taken = make([]bool, len(s.buckets[b].freeIdx))
	}
	var cands []candidate // scratch, reused across requests
	for _, r := range reqs {
		if r.simple() {
			free := 0
			for b := range s.buckets {
				if r.matches(s.buckets[b].key) {
					free += len(s.buckets[b].freeIdx) - cur[b].n
				}
			}
			if free < r.Nodes {
				plan.Pending[r.JobID] = s.reason(r, free, nil)
				continue
			}
			nodes := make([]string, 0, r.Nodes)
			for b := range s.buckets {
				if !r.matches(s.buckets[b].key) {
					continue
				}
				c := &cur[b]
				for i := c.next; i < len(c.taken) && len(nodes) < r.Nodes; i++ {
					if !c.taken[i] {
						nodes = append(nodes, s.buckets[b].freeNode(i).ID)
						c.take(i)
					}
				}
			}
			plan.Assignments = append(plan.Assignments, Assignment{JobID: r.JobID, Nodes: nodes})
			continue
		}

		cands = s.candidates(r, cur, cands[:0])
		if len(cands) < r.Nodes {
			plan.Pending[r.JobID] = s.reason(r, len(cands), nil)
			continue
		}
		pick, ok := choose(r, cands)
		if !ok {
			plan.Pending[r.JobID] = s.reason(r, len(cands), cands)
			continue
		}
		nodes := make([]string, len(pick))
		for j, c := range pick {
			nodes[j] = s.buckets[c.b].freeNode(c.i).ID
			cur[c.b].take(c.i)
		}
		plan.Assignments = append(plan.Assignments, Assignment{JobID: r.JobID, Nodes: nodes})
	}
	return plan
}

// candidates appends the untaken free nodes that pass every node filter, in
// scan order (bucket order, then ID).
func (s *Snapshot) candidates(r Request, cur []cursor, out []candidate) []candidate {
	for b := range s.buckets {
		if !r.matches(s.buckets[b].key) {
			continue
		}
		c := &cur[b]
		for i := c.next; i < len(c.taken); i++ {
			if c.taken[i] {
				continue
			}
			n := s.buckets[b].freeNode(i)
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
func (s *Snapshot) reason(r Request, free int, cands []candidate) string {
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
		return fmt.Sprintf("needs %s; cluster has %d", r.describe(), total)
	case r.required() && largest < r.Nodes:
		return fmt.Sprintf("needs %s; largest %s has %d", r.describe(), r.Topology.Key, largest)
	case free < r.Nodes:
		return fmt.Sprintf("waiting for %s; %d of %d free", r.describe(), free, total)
	default: // only a required topology refuses with enough free nodes
		return fmt.Sprintf("needs %s; best %s has %d free", r.describe(), r.Topology.Key, bestFree)
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
