package placement

import (
	"fmt"
	"sort"
	"strings"
)

// Node is what placement needs to know of one node.
type Node struct {
	ID       string
	GPUModel string
	GPUCount int
}

// bucketKey groups interchangeable nodes.
type bucketKey struct {
	model string
	gpus  int
}

// Snapshot is an immutable view of the cluster for one cycle: the nodes
// that may be leased now, and every known node (to tell "wait" from "never").
type Snapshot struct {
	free  map[bucketKey][]string // sorted node IDs
	total map[bucketKey]int
	keys  []bucketKey // sorted, for deterministic scans
}

// NewSnapshot indexes placeable nodes (free) and all known nodes (all).
func NewSnapshot(free, all []Node) *Snapshot {
	s := &Snapshot{free: map[bucketKey][]string{}, total: map[bucketKey]int{}}
	for _, n := range all {
		k := bucketKey{n.GPUModel, n.GPUCount}
		if _, ok := s.total[k]; !ok {
			s.keys = append(s.keys, k)
		}
		s.total[k]++
	}
	for _, n := range free {
		k := bucketKey{n.GPUModel, n.GPUCount}
		s.free[k] = append(s.free[k], n.ID)
		if _, ok := s.total[k]; !ok {
			// A free node is always known; tolerate callers that forgot it.
			s.keys = append(s.keys, k)
			s.total[k]++
		}
	}
	for _, ids := range s.free {
		sort.Strings(ids)
	}
	sort.Slice(s.keys, func(i, j int) bool {
		if s.keys[i].model != s.keys[j].model {
			return s.keys[i].model < s.keys[j].model
		}
		return s.keys[i].gpus < s.keys[j].gpus
	})
	return s
}

// Request is one pending job's needs.
type Request struct {
	JobID       string
	Nodes       int
	GPUModel    string // empty: any
	GPUsPerNode int    // minimum; 0: any
}

func (r Request) matches(k bucketKey) bool {
	return (r.GPUModel == "" || r.GPUModel == k.model) && k.gpus >= r.GPUsPerNode
}

// describe renders the request's node shape for humans: "2 H100 nodes with ≥ 8 GPUs".
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
	if r.GPUsPerNode > 0 {
		fmt.Fprintf(&b, " with at least %d GPUs", r.GPUsPerNode)
	}
	return b.String()
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

// Place assigns nodes to requests in the order given (the caller's policy
// order). A request gets all its nodes or none (gang); a request that does
// not fit leaves its nodes to later requests.
func Place(s *Snapshot, reqs []Request) Plan {
	plan := Plan{Pending: map[string]string{}}
	used := map[bucketKey]int{} // nodes consumed per bucket this cycle
	for _, r := range reqs {
		free, total := 0, 0
		for _, k := range s.keys {
			if r.matches(k) {
				free += len(s.free[k]) - used[k]
				total += s.total[k]
			}
		}
		switch {
		case total < r.Nodes:
			plan.Pending[r.JobID] = fmt.Sprintf("needs %s; cluster has %d", r.describe(), total)
			continue
		case free < r.Nodes:
			plan.Pending[r.JobID] = fmt.Sprintf("waiting for %s; %d of %d free", r.describe(), free, total)
			continue
		}
		nodes := make([]string, 0, r.Nodes)
		for _, k := range s.keys {
			if !r.matches(k) {
				continue
			}
			for used[k] < len(s.free[k]) && len(nodes) < r.Nodes {
				nodes = append(nodes, s.free[k][used[k]])
				used[k]++
			}
		}
		plan.Assignments = append(plan.Assignments, Assignment{JobID: r.JobID, Nodes: nodes})
	}
	return plan
}
