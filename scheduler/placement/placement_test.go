package placement

import (
	"fmt"
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
			if !reflect.DeepEqual(plan.Pending, c.pending) {
				t.Errorf("pending = %v, want %v", plan.Pending, c.pending)
			}
		})
	}
}

// TestPlaceNeverDoubleAssigns checks, over many random clusters and request
// mixes, that no node is handed out twice and no gang is partially placed.
func TestPlaceNeverDoubleAssigns(t *testing.T) {
	models := []string{"H100", "A100", "H200"}
	for seed := 0; seed < 200; seed++ {
		var all []Node
		for i := 0; i < 1+seed%23; i++ {
			all = append(all, Node{ID: fmt.Sprintf("n%03d", i), GPUModel: models[(i*7+seed)%3], GPUCount: 4 + 4*((i+seed)%2)})
		}
		free := all[:len(all)*(1+seed%3)/3]
		var reqs []Request
		for i := 0; i < 1+seed%11; i++ {
			r := Request{JobID: fmt.Sprint(i), Nodes: 1 + (i*seed)%5, GPUsPerNode: 4 * ((i + seed) % 3)}
			if (i+seed)%4 != 0 {
				r.GPUModel = models[(i+seed)%3]
			}
			reqs = append(reqs, r)
		}
		plan := Place(NewSnapshot(free, all), reqs)
		seen := map[string]bool{}
		byID := map[string]Node{}
		for _, n := range free {
			byID[n.ID] = n
		}
		for _, a := range plan.Assignments {
			r := reqs[0]
			for _, q := range reqs {
				if q.JobID == a.JobID {
					r = q
				}
			}
			if len(a.Nodes) != r.Nodes {
				t.Fatalf("seed %d: job %s got %d nodes, wants %d", seed, a.JobID, len(a.Nodes), r.Nodes)
			}
			for _, id := range a.Nodes {
				n, ok := byID[id]
				if !ok {
					t.Fatalf("seed %d: job %s got non-free node %s", seed, a.JobID, id)
				}
				if seen[id] {
					t.Fatalf("seed %d: node %s assigned twice", seed, id)
				}
				if (r.GPUModel != "" && n.GPUModel != r.GPUModel) || n.GPUCount < r.GPUsPerNode {
					t.Fatalf("seed %d: node %+v does not match %+v", seed, n, r)
				}
				seen[id] = true
			}
		}
		if len(plan.Assignments)+len(plan.Pending) != len(reqs) {
			t.Fatalf("seed %d: %d placed + %d pending != %d requests", seed, len(plan.Assignments), len(plan.Pending), len(reqs))
		}
	}
}

// BenchmarkPlace measures one cycle on a 10,000-node cluster of four
// models with 1,000 pending requests of mixed gang sizes.
func BenchmarkPlace(b *testing.B) {
	models := []string{"H100", "A100", "H200", "B200"}
	all := make([]Node, 10000)
	for i := range all {
		all[i] = Node{ID: fmt.Sprintf("n%05d", i), GPUModel: models[i%4], GPUCount: 8}
	}
	free := all[:5000]
	reqs := make([]Request, 1000)
	for i := range reqs {
		reqs[i] = Request{JobID: fmt.Sprint(i), Nodes: 1 + i%8, GPUModel: models[i%4]}
	}
	b.ReportAllocs()
	for b.Loop() {
		Place(NewSnapshot(free, all), reqs)
	}
}
