package placement

import (
	"reflect"
	"testing"
)

// labelled returns nodes of one shape carrying the given labels.
func labelled(model string, gpus int, mem uint64, labels map[string]string, ids ...string) []Node {
	out := nodes(model, gpus, ids...)
	for i := range out {
		out[i].GPUMemoryBytes = mem
		out[i].Labels = labels
	}
	return out
}

func rack(name string, ids ...string) []Node {
	return labelled("H100", 8, 80*gib, map[string]string{"rack": name}, ids...)
}

func TestPlaceConstraints(t *testing.T) {
	big := labelled("H100", 8, 80*gib, map[string]string{"pool": "prod"}, "b1", "b2")
	smallMem := labelled("H100", 8, 40*gib, map[string]string{"pool": "prod"}, "m1", "m2")
	prod := labelled("H100", 8, 80*gib, map[string]string{"pool": "prod", "team": "ml"}, "p1", "p2")
	dev := labelled("H100", 8, 80*gib, map[string]string{"pool": "dev"}, "d1")
	bare := labelled("H100", 8, 80*gib, nil, "u1", "u2", "u3")
	r1, r2, r3 := rack("r1", "r1a", "r1b", "r1c", "r1d"), rack("r2", "r2a", "r2b"), rack("r3", "r3a", "r3b", "r3c")
	inRack := Topology{Key: "rack", Required: true}
	preferRack := Topology{Key: "rack"}
	cases := []struct {
		name    string
		free    []Node
		all     []Node
		reqs    []Request
		want    []Assignment
		pending map[string]string
	}{
		{
			name: "a memory minimum excludes nodes with smaller GPUs",
			free: cat(smallMem, big), all: cat(smallMem, big),
			reqs: []Request{
				{JobID: "1", Nodes: 2, GPUModel: "H100", MinGPUMemoryBytes: 80 * gib},
				{JobID: "2", Nodes: 1, GPUModel: "H100", MinGPUMemoryBytes: 80 * gib},
			},
			want:    []Assignment{{"1", []string{"b1", "b2"}}},
			pending: map[string]string{"2": "waiting for 1 H100 node with at least 80 GiB per GPU; 0 of 2 free"},
		},
		{
			name: "a memory minimum below every node takes any node",
			free: cat(smallMem, big), all: cat(smallMem, big),
			reqs: []Request{{JobID: "1", Nodes: 4, MinGPUMemoryBytes: 40 * gib}},
			want: []Assignment{{"1", []string{"m1", "m2", "b1", "b2"}}},
		},
		{
			name: "memory and selector are described in GiB and k=v",
			free: cat(smallMem, big, dev), all: cat(smallMem, big, dev),
			reqs:    []Request{{JobID: "1", Nodes: 4, GPUModel: "H100", MinGPUMemoryBytes: 80 * gib, Selector: map[string]string{"pool": "prod"}}},
			pending: map[string]string{"1": "needs 4 H100 nodes with at least 80 GiB per GPU and pool=prod; cluster has 2"},
		},
		{
			name: "a memory minimum that is not whole GiB is described with a decimal",
			free: smallMem, all: smallMem,
			reqs:    []Request{{JobID: "1", Nodes: 1, MinGPUMemoryBytes: 81559 << 20 /* NVML's H100 80GB */, GPUsPerNode: 8}},
			pending: map[string]string{"1": "needs 1 node with at least 8 GPUs and at least 79.6 GiB per GPU; cluster has 0"},
		},
		{
			name: "a selector takes only matching nodes and skips nodes without the label",
			free: cat(bare[:1], dev, prod), all: cat(bare[:1], dev, prod),
			reqs: []Request{
				{JobID: "1", Nodes: 2, Selector: map[string]string{"pool": "prod"}},
				{JobID: "2", Nodes: 1, Selector: map[string]string{"pool": "prod"}},
				{JobID: "3", Nodes: 2},
			},
			want:    []Assignment{{"1", []string{"p1", "p2"}}, {"3", []string{"d1", "u1"}}},
			pending: map[string]string{"2": "waiting for 1 node with pool=prod; 0 of 2 free"},
		},
		{
			name: "a selector with several labels needs all of them and lists them sorted",
			free: cat(big, prod), all: cat(big, prod),
			reqs:    []Request{{JobID: "1", Nodes: 3, Selector: map[string]string{"team": "ml", "pool": "prod"}}},
			pending: map[string]string{"1": "needs 3 nodes with pool=prod,team=ml; cluster has 2"},
		},
		{
			name: "a required rack goes to the smallest rack that fits",
			free: cat(r1, r2, r3), all: cat(r1, r2, r3),
			reqs: []Request{
				{JobID: "1", Nodes: 2, Topology: inRack},
				{JobID: "2", Nodes: 3, Topology: inRack},
				{JobID: "3", Nodes: 4, Topology: inRack},
			},
			want: []Assignment{
				{"1", []string{"r2a", "r2b"}},
				{"2", []string{"r3a", "r3b", "r3c"}},
				{"3", []string{"r1a", "r1b", "r1c", "r1d"}},
			},
		},
		{
			name: "racks of equal size are chosen by name",
			free: cat(r3, rack("r0", "r0a", "r0b", "r0c")), all: cat(r3, rack("r0", "r0a", "r0b", "r0c")),
			reqs: []Request{{JobID: "1", Nodes: 2, Topology: inRack}},
			want: []Assignment{{"1", []string{"r0a", "r0b"}}},
		},
		{
			name: "a required rack that no rack can hold now reports the best rack's free nodes",
			free: cat(r1[:2], r3[:2]), all: cat(r1, r3),
			reqs:    []Request{{JobID: "1", Nodes: 4, GPUModel: "H100", Topology: inRack}},
			pending: map[string]string{"1": "needs 4 H100 nodes in one rack; best rack has 2 free"},
		},
		{
			name: "a required rack larger than every rack says it never fits",
			free: cat(r2, r3), all: cat(r2, r3),
			reqs:    []Request{{JobID: "1", Nodes: 4, GPUModel: "H100", Topology: inRack}},
			pending: map[string]string{"1": "needs 4 H100 nodes in one rack; largest rack has 3"},
		},
		{
			name: "a required rack with too few free nodes overall waits",
			free: r1[:2], all: cat(r1, r2),
			reqs:    []Request{{JobID: "1", Nodes: 3, GPUModel: "H100", Topology: inRack}},
			pending: map[string]string{"1": "waiting for 3 H100 nodes in one rack; 2 of 6 free"},
		},
		{
			name: "a preferred rack uses one rack when one fits, by best fit",
			free: cat(r1, r2, r3), all: cat(r1, r2, r3),
			reqs: []Request{{JobID: "1", Nodes: 3, Topology: preferRack}},
			want: []Assignment{{"1", []string{"r3a", "r3b", "r3c"}}},
		},
		{
			name: "a preferred rack falls back to spanning the fewest racks, largest first",
			free: cat(r1[:3], r2, r3[:1]), all: cat(r1, r2, r3),
			reqs: []Request{{JobID: "1", Nodes: 5, Topology: preferRack}},
			want: []Assignment{{"1", []string{"r1a", "r1b", "r1c", "r2a", "r2b"}}},
		},
		{
			name: "nodes without the topology label are skipped for a required rack",
			free: cat(bare, r2), all: cat(bare, r2),
			reqs: []Request{
				{JobID: "1", Nodes: 3, Topology: inRack},
				{JobID: "2", Nodes: 2, Topology: inRack},
			},
			want:    []Assignment{{"2", []string{"r2a", "r2b"}}},
			pending: map[string]string{"1": "needs 3 nodes in one rack; cluster has 2"},
		},
		{
			name: "nodes without the topology label are used last for a preferred rack",
			free: cat(bare, r2), all: cat(bare, r2),
			reqs: []Request{{JobID: "1", Nodes: 3, Topology: preferRack}},
			want: []Assignment{{"1", []string{"r2a", "r2b", "u1"}}},
		},
		{
			name: "a preferred rack with too few free nodes waits and says so",
			free: r2, all: cat(r2, r3),
			reqs:    []Request{{JobID: "1", Nodes: 3, Topology: preferRack}},
			pending: map[string]string{"1": "waiting for 3 nodes preferably in one rack; 2 of 5 free"},
		},
		{
			name: "a gang that does not fit its rack takes nothing and later jobs still run",
			free: cat(r2, r3[:2]), all: cat(r2, r3),
			reqs: []Request{
				{JobID: "1", Nodes: 3, Topology: inRack},
				{JobID: "2", Nodes: 4},
			},
			want:    []Assignment{{"2", []string{"r2a", "r2b", "r3a", "r3b"}}},
			pending: map[string]string{"1": "needs 3 nodes in one rack; best rack has 2 free"},
		},
		{
			name: "constrained requests are served in the order given",
			free: cat(r2, prod), all: cat(r2, prod),
			reqs: []Request{
				{JobID: "9", Nodes: 2, Topology: inRack},
				{JobID: "4", Nodes: 1, Selector: map[string]string{"rack": "r2"}},
				{JobID: "5", Nodes: 2, Selector: map[string]string{"pool": "prod"}},
			},
			want:    []Assignment{{"9", []string{"r2a", "r2b"}}, {"5", []string{"p1", "p2"}}},
			pending: map[string]string{"4": "waiting for 1 node with rack=r2; 0 of 2 free"},
		},
		{
			name: "simple and constrained requests share the nodes they take",
			free: cat(r2, r3), all: cat(r2, r3),
			reqs: []Request{
				{JobID: "1", Nodes: 1},
				{JobID: "2", Nodes: 3, Topology: inRack},
				{JobID: "3", Nodes: 1},
				{JobID: "4", Nodes: 1},
			},
			want: []Assignment{
				{"1", []string{"r2a"}},
				{"2", []string{"r3a", "r3b", "r3c"}},
				{"3", []string{"r2b"}},
			},
			pending: map[string]string{"4": "waiting for 1 node; 0 of 5 free"},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := NewSnapshot(c.free, c.all)
			plan := Place(s, c.reqs)
			if !reflect.DeepEqual(plan.Assignments, c.want) {
				t.Errorf("assignments = %v, want %v", plan.Assignments, c.want)
			}
			if c.pending == nil {
				c.pending = map[string]string{}
			}
			if !reflect.DeepEqual(plan.PendingReasons(), c.pending) {
				t.Errorf("pending = %v, want %v", plan.PendingReasons(), c.pending)
			}
			if again := Place(s, c.reqs); !reflect.DeepEqual(again, plan) {
				t.Errorf("a second Place on the same snapshot = %v, want %v (snapshot modified?)", again, plan)
			}
		})
	}
}
