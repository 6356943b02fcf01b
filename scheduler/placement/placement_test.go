package placement

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
)

func nodes(model string, gpus int, ids ...string) []Node {
	out := make([]Node, len(ids))
	for i, id := range ids {
		out[i] = Node{ID: id, GPUModel: model, GPUCount: gpus}
	}
	return out
}

func cat(ls ...[]Node) []Node {
	var out []Node
	for _, l := range ls {
		out = append(out, l...)
	}
	return out
}

func TestPlace(t *testing.T) {
	h100 := nodes("H100", 8, "h1", "h2", "h3", "h4")
	a100 := nodes("A100", 8, "a1", "a2")
	small := nodes("H100", 4, "s1")
	cases := []struct {
		name    string
		free    []Node
		all     []Node
		reqs    []Request
		want    []Assignment
		pending map[string]string
	}{
		{
			name: "a single-node job gets the first free matching node",
			free: h100, all: h100,
			reqs: []Request{{JobID: "1", Nodes: 1, GPUModel: "H100"}},
			want: []Assignment{{"1", []string{"h1"}}},
		},
		{
			name: "a gang gets all its nodes at once",
			free: h100, all: h100,
			reqs: []Request{{JobID: "1", Nodes: 3, GPUModel: "H100"}},
			want: []Assignment{{"1", []string{"h1", "h2", "h3"}}},
		},
		{
			name: "a gang larger than the free nodes waits and takes nothing",
			free: h100[:2], all: h100,
			reqs:    []Request{{JobID: "1", Nodes: 3, GPUModel: "H100"}, {JobID: "2", Nodes: 2, GPUModel: "H100"}},
			want:    []Assignment{{"2", []string{"h1", "h2"}}},
			pending: map[string]string{"1": "waiting for 3 H100 nodes; 2 of 4 free"},
		},
		{
			name: "a job larger than the cluster says so",
			free: h100, all: h100,
			reqs:    []Request{{JobID: "1", Nodes: 6, GPUModel: "H100"}},
			pending: map[string]string{"1": "needs 6 H100 nodes; cluster has 4"},
		},
		{
			name: "the GPU model constraint excludes other models",
			free: cat(a100, h100[:1]), all: cat(a100, h100[:1]),
			reqs:    []Request{{JobID: "1", Nodes: 2, GPUModel: "H100"}, {JobID: "2", Nodes: 2, GPUModel: "A100"}},
			want:    []Assignment{{"2", []string{"a1", "a2"}}},
			pending: map[string]string{"1": "needs 2 H100 nodes; cluster has 1"},
		},
		{
			name: "any model takes nodes across models",
			free: cat(a100, h100[:1]), all: cat(a100, h100[:1]),
			reqs: []Request{{JobID: "1", Nodes: 3}},
			want: []Assignment{{"1", []string{"a1", "a2", "h1"}}},
		},
		{
			name: "GPUs per node excludes smaller nodes",
			free: cat(small, h100[:1]), all: cat(small, h100[:1]),
			reqs:    []Request{{JobID: "1", Nodes: 2, GPUModel: "H100", GPUsPerNode: 8}},
			pending: map[string]string{"1": "needs 2 H100 nodes with at least 8 GPUs; cluster has 1"},
		},
		{
			name: "requests are served in the order given",
			free: h100[:2], all: h100[:2],
			reqs:    []Request{{JobID: "7", Nodes: 2}, {JobID: "3", Nodes: 1}},
			want:    []Assignment{{"7", []string{"h1", "h2"}}},
			pending: map[string]string{"3": "waiting for 1 node; 0 of 2 free"},
		},
		{
			name:    "an empty cluster explains itself",
			reqs:    []Request{{JobID: "1", Nodes: 1, GPUModel: "B200"}},
			pending: map[string]string{"1": "needs 1 B200 node; cluster has 0"},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			plan := Place(NewSnapshot(c.free, c.all), c.reqs)
			if !reflect.DeepEqual(plan.Assignments, c.want) {
				t.Errorf("assignments = %v, want %v", plan.Assignments, c.want)
			}
			if c.pending == nil {
				c.pending = map[string]string{}
			}
			if !reflect.DeepEqual(plan.PendingReasons(), c.pending) {
				t.Errorf("pending = %v, want %v", plan.PendingReasons(), c.pending)
			}
		})
	}
}

// randomCase builds a random cluster and request mix for one seed. With
// allRequired, every request asks for a required topology domain.
func randomCase(seed int, allRequired bool) (free, all []Node, reqs []Request) {
	rng := rand.New(rand.NewPCG(uint64(seed), 42))
	models := []string{"H100", "A100", "H200"}
	pick := func(p float64) bool { return rng.Float64() < p }
	for i := range 1 + rng.IntN(60) {
		n := Node{
			ID:             fmt.Sprintf("n%03d", i),
			GPUModel:       models[rng.IntN(3)],
			GPUCount:       4 + 4*rng.IntN(2),
			GPUMemoryBytes: uint64(40+40*rng.IntN(2)) * gib,
		}
		if pick(0.9) {
			n.Labels = map[string]string{}
			if pick(0.8) {
				n.Labels["rack"] = fmt.Sprintf("r%d", rng.IntN(5))
			}
			if pick(0.7) {
				n.Labels["switch"] = fmt.Sprintf("s%d", rng.IntN(3))
			}
			if pick(0.6) {
				n.Labels["pool"] = []string{"prod", "dev"}[rng.IntN(2)]
			}
		}
		all = append(all, n)
		if pick(0.6) {
			free = append(free, n)
		}
	}
	rng.Shuffle(len(free), func(i, j int) { free[i], free[j] = free[j], free[i] })
	for i := range 1 + rng.IntN(12) {
		r := Request{
			JobID:             fmt.Sprint(i),
			Nodes:             1 + rng.IntN(5),
			GPUsPerNode:       4 * rng.IntN(3) / 2,
			MinGPUMemoryBytes: uint64(40*rng.IntN(4)/2) * gib,
		}
		if pick(0.4) {
			r.GPUModel = models[rng.IntN(3)]
		}
		switch rng.IntN(4) {
		case 1:
			r.Selector = map[string]string{"pool": "prod"}
		case 2:
			r.Selector = map[string]string{"pool": "dev", "rack": fmt.Sprintf("r%d", rng.IntN(5))}
		}
		switch {
		case allRequired:
			r.Topology = Topology{Key: []string{"rack", "switch"}[rng.IntN(2)], Required: true}
		case pick(0.5):
			r.Topology = Topology{Key: []string{"rack", "switch"}[rng.IntN(2)], Required: pick(0.5)}
		}
		reqs = append(reqs, r)
	}
	return free, all, reqs
}

// fits is the property tests' reference filter, written independently of
// Place: model, GPU count, memory, selector.
func fits(n Node, r Request) bool {
	if (r.GPUModel != "" && n.GPUModel != r.GPUModel) || n.GPUCount < r.GPUsPerNode || n.GPUMemoryBytes < r.MinGPUMemoryBytes {
		return false
	}
	for k, v := range r.Selector {
		if got, ok := n.Labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// TestPlaceNeverDoubleAssigns checks, over many random clusters and request
// mixes, that every assignment has distinct, free, matching nodes, that a
// required topology keeps a gang in one best-fit domain, and (replaying the
// requests in order against a brute-force reference) that a request is
// placed exactly when it fits at its turn: no gang is partially placed and
// none waits while it could run.
func TestPlaceNeverDoubleAssigns(t *testing.T) {
	for seed := range 200 {
		free, all, reqs := randomCase(seed, false)
		plan := Place(NewSnapshot(free, all), reqs)
		if len(plan.Assignments)+len(plan.PendingReasons()) != len(reqs) {
			t.Fatalf("seed %d: %d placed + %d pending != %d requests", seed, len(plan.Assignments), len(plan.PendingReasons()), len(reqs))
		}
		avail := map[string]Node{} // free and not yet assigned
		for _, n := range free {
			avail[n.ID] = n
		}
		next := 0 // assignments come in request order
		for _, r := range reqs {
			var a *Assignment
			if next < len(plan.Assignments) && plan.Assignments[next].JobID == r.JobID {
				a = &plan.Assignments[next]
				next++
			}
			// Reference: matching available nodes, per topology domain.
			matching, domains := 0, map[string]int{}
			for _, n := range avail {
				if !fits(n, r) {
					continue
				}
				d, ok := n.Labels[r.Topology.Key]
				if r.Topology.Key != "" && ok {
					domains[d]++
				}
				if !r.Topology.Required || ok {
					matching++
				}
			}
			best := ""
			for d, c := range domains {
				if c >= r.Nodes && (best == "" || c < domains[best] || (c == domains[best] && d < best)) {
					best = d
				}
			}
			feasible := matching >= r.Nodes
			if r.Topology.Key != "" && r.Topology.Required {
				feasible = best != ""
			}
			if a == nil {
				if feasible {
					t.Fatalf("seed %d: job %+v waits (%q) but fits", seed, r, plan.PendingReasons()[r.JobID])
				}
				if plan.PendingReasons()[r.JobID] == "" {
					t.Fatalf("seed %d: job %s neither placed nor explained", seed, r.JobID)
				}
				continue
			}
			if !feasible {
				t.Fatalf("seed %d: job %+v placed on %v but does not fit", seed, r, a.Nodes)
			}
			if _, ok := plan.PendingReasons()[r.JobID]; ok {
				t.Fatalf("seed %d: job %s both placed and pending", seed, r.JobID)
			}
			if len(a.Nodes) != r.Nodes {
				t.Fatalf("seed %d: job %s got %d nodes, wants %d", seed, a.JobID, len(a.Nodes), r.Nodes)
			}
			gangDomains := map[string]bool{}
			for _, id := range a.Nodes {
				n, ok := avail[id]
				if !ok {
					t.Fatalf("seed %d: job %s got node %s that is not free or already assigned", seed, a.JobID, id)
				}
				if !fits(n, r) {
					t.Fatalf("seed %d: node %+v does not match %+v", seed, n, r)
				}
				if d, ok := n.Labels[r.Topology.Key]; ok {
					gangDomains[d] = true
				} else if r.Topology.Key != "" {
					gangDomains["<unlabelled "+id+">"] = true
				}
				delete(avail, id) // also catches a node listed twice
			}
			if best != "" && (len(gangDomains) != 1 || !gangDomains[best]) {
				t.Fatalf("seed %d: job %+v spans %v, want best-fit %s %s of %v", seed, r, gangDomains, r.Topology.Key, best, domains)
			}
		}
		if next != len(plan.Assignments) {
			t.Fatalf("seed %d: assignments out of request order or for unknown jobs: %v", seed, plan.Assignments)
		}
	}
}

// TestPlaceRequiredTopologyNeverSpansDomains: with Topology.Required, no
// gang in the plan ever spans two domains or uses an unlabelled node.
func TestPlaceRequiredTopologyNeverSpansDomains(t *testing.T) {
	for seed := range 200 {
		free, all, reqs := randomCase(seed, true)
		byID := map[string]Node{}
		for _, n := range free {
			byID[n.ID] = n
		}
		byJob := map[string]Request{}
		for _, r := range reqs {
			byJob[r.JobID] = r
		}
		for _, a := range Place(NewSnapshot(free, all), reqs).Assignments {
			key := byJob[a.JobID].Topology.Key
			domains := map[string]bool{}
			for _, id := range a.Nodes {
				d, ok := byID[id].Labels[key]
				if !ok {
					t.Fatalf("seed %d: job %s got node %s without label %s", seed, a.JobID, id, key)
				}
				domains[d] = true
			}
			if len(domains) != 1 {
				t.Fatalf("seed %d: job %s spans %s domains %v", seed, a.JobID, key, domains)
			}
		}
	}
}

// benchCluster is a 10,000-node cluster of four models, 32 nodes a rack,
// half of it free, and 1,000 pending requests of mixed gang sizes.
func benchCluster() (free, all []Node, reqs []Request) {
	models := []string{"H100", "A100", "H200", "B200"}
	all = make([]Node, 10000)
	for i := range all {
		all[i] = Node{
			ID: fmt.Sprintf("n%05d", i), GPUModel: models[i%4], GPUCount: 8, GPUMemoryBytes: 80 * gib,
			Labels: map[string]string{"rack": fmt.Sprintf("r%03d", i/32), "pool": []string{"prod", "dev"}[i/16%2]},
		}
	}
	free = all[:5000]
	reqs = make([]Request, 1000)
	for i := range reqs {
		reqs[i] = Request{JobID: fmt.Sprint(i), Nodes: 1 + i%8, GPUModel: models[i%4]}
	}
	return free, all, reqs
}

// BenchmarkPlace measures one cycle (snapshot and place) on benchCluster
// with unconstrained requests: the per-bucket count path.
func BenchmarkPlace(b *testing.B) {
	free, all, reqs := benchCluster()
	b.ReportAllocs()
	for b.Loop() {
		Place(NewSnapshot(free, all), reqs)
	}
}

// BenchmarkPlaceConstrained is BenchmarkPlace with every other request
// asking for a rack (alternately required and preferred) and every fourth
// for pool=prod: the per-node path.
func BenchmarkPlaceConstrained(b *testing.B) {
	free, all, reqs := benchCluster()
	for i := range reqs {
		if i%2 == 0 {
			reqs[i].Topology = Topology{Key: "rack", Required: i%4 == 0}
		}
		if i%4 == 1 {
			reqs[i].Selector = map[string]string{"pool": "prod"}
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		Place(NewSnapshot(free, all), reqs)
	}
}
