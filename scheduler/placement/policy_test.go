package placement

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"
)

func TestSchedule(t *testing.T) {
	h100 := nodes("H100", 8, "h1", "h2", "h3", "h4")
	a100 := nodes("A100", 8, "a1", "a2")
	cases := []struct {
		name    string
		free    []Node
		all     []Node
		policy  Policy
		reqs    []Request
		want    []Assignment
		pending map[string]string
	}{
		{
			name: "queue priority wins over submission order",
			free: h100[:1], all: h100[:1],
			policy: Policy{Queues: map[string]Queue{"hi": {Name: "hi", Priority: 10}, "lo": {Name: "lo"}}},
			reqs: []Request{
				{JobID: "old", Nodes: 1, Queue: "lo", Seq: 1},
				{JobID: "new", Nodes: 1, Queue: "hi", Seq: 2},
			},
			want:    []Assignment{{"new", []string{"h1"}}},
			pending: map[string]string{"old": "waiting for 1 node; 0 of 1 free"},
		},
		{
			name: "a higher-priority job in the same queue goes first",
			free: h100[:1], all: h100[:1],
			reqs: []Request{
				{JobID: "low", Nodes: 1, Priority: 0, Seq: 1},
				{JobID: "high", Nodes: 1, Priority: 5, Seq: 2},
			},
			want:    []Assignment{{"high", []string{"h1"}}},
			pending: map[string]string{"low": "waiting for 1 node; 0 of 1 free"},
		},
		{
			name: "equal priorities are served in submission order whatever the order given",
			free: h100[:2], all: h100[:2],
			reqs: []Request{
				{JobID: "c", Nodes: 1, Seq: 3},
				{JobID: "a", Nodes: 1, Seq: 1},
				{JobID: "b", Nodes: 1, Seq: 2},
			},
			want:    []Assignment{{"a", []string{"h1"}}, {"b", []string{"h2"}}},
			pending: map[string]string{"c": "waiting for 1 node; 0 of 2 free"},
		},
		{
			name: "among tenants with equal priority the one with the lower weighted share goes first",
			free: h100[3:], all: h100,
			policy: Policy{
				Tenants: map[string]Tenant{"light": {Name: "light", Weight: 1}, "heavy": {Name: "heavy", Weight: 2}},
				Usage: map[string]Usage{
					"light": {Nodes: 1, PerModel: map[string]int{"H100": 1}},
					"heavy": {Nodes: 1, PerModel: map[string]int{"H100": 1}},
				},
			},
			reqs: []Request{
				{JobID: "light-1", Tenant: "light", Nodes: 1, Seq: 1},
				{JobID: "heavy-1", Tenant: "heavy", Nodes: 1, Seq: 2},
			},
			// light: 1/4 / 1 = 0.25; heavy: 1/4 / 2 = 0.125.
			want:    []Assignment{{"heavy-1", []string{"h4"}}},
			pending: map[string]string{"light-1": "waiting for 1 node; 0 of 4 free"},
		},
		{
			name: "a tenant's weight lowers its share so it goes before an equally loaded tenant",
			free: h100[2:], all: h100,
			policy: Policy{
				Tenants: map[string]Tenant{"big": {Name: "big", Weight: 2}},
				Usage: map[string]Usage{
					"small": {Nodes: 1, PerModel: map[string]int{"H100": 1}},
					"big":   {Nodes: 1, PerModel: map[string]int{"H100": 1}},
				},
			},
			reqs: []Request{
				{JobID: "small-1", Tenant: "small", Nodes: 1, Seq: 1},
				{JobID: "small-2", Tenant: "small", Nodes: 1, Seq: 2},
				{JobID: "big-1", Tenant: "big", Nodes: 1, Seq: 3},
				{JobID: "big-2", Tenant: "big", Nodes: 1, Seq: 4},
			},
			// big 0.125 < small 0.25: big-1 (big becomes 0.25); tie, Seq: small-1.
			want: []Assignment{{"big-1", []string{"h3"}}, {"small-1", []string{"h4"}}},
			pending: map[string]string{
				"small-2": "waiting for 1 node; 0 of 4 free",
				"big-2":   "waiting for 1 node; 0 of 4 free",
			},
		},
		{
			name: "the dominant share is the tenant's largest share of any one model",
			free: cat(h100[3:], a100[1:]), all: cat(h100, a100),
			policy: Policy{Usage: map[string]Usage{
				"h": {Nodes: 3, PerModel: map[string]int{"H100": 3}}, // 3/4 of H100
				"a": {Nodes: 1, PerModel: map[string]int{"A100": 1}}, // 1/2 of A100
			}},
			reqs: []Request{
				{JobID: "h-1", Tenant: "h", Nodes: 1, Seq: 1},
				{JobID: "a-1", Tenant: "a", Nodes: 1, Seq: 2},
			},
			want: []Assignment{{"a-1", []string{"a2"}}, {"h-1", []string{"h4"}}},
		},
		{
			name: "aging lets an old low-priority job pass a newer high-priority one once it exceeds the gap",
			free: h100[:1], all: h100[:1],
			policy: Policy{AgingStep: time.Minute},
			reqs: []Request{
				{JobID: "new", Nodes: 1, Priority: 5, Seq: 2},
				{JobID: "old", Nodes: 1, Priority: 0, Seq: 1, Waited: 6 * time.Minute},
			},
			want:    []Assignment{{"old", []string{"h1"}}},
			pending: map[string]string{"new": "waiting for 1 node; 0 of 1 free"},
		},
		{
			name: "aging below the gap keeps the high-priority job first",
			free: h100[:1], all: h100[:1],
			policy: Policy{AgingStep: time.Minute},
			reqs: []Request{
				{JobID: "new", Nodes: 1, Priority: 5, Seq: 2},
				{JobID: "old", Nodes: 1, Priority: 0, Seq: 1, Waited: 4*time.Minute + 59*time.Second},
			},
			want:    []Assignment{{"new", []string{"h1"}}},
			pending: map[string]string{"old": "waiting for 1 node; 0 of 1 free"},
		},
		{
			name: "a paused queue's jobs wait with free nodes and say so",
			free: h100, all: h100,
			policy: Policy{Queues: map[string]Queue{"batch": {Name: "batch", Paused: true}}},
			reqs: []Request{
				{JobID: "1", Nodes: 1, Queue: "batch", Seq: 1},
				{JobID: "2", Nodes: 1, Seq: 2},
			},
			want:    []Assignment{{"2", []string{"h1"}}},
			pending: map[string]string{"1": "queue batch paused"},
		},
		{
			name: "a tenant at its node quota waits and says used and limit",
			free: h100, all: h100,
			policy: Policy{
				Tenants: map[string]Tenant{"acme": {Name: "acme", MaxNodes: 8}},
				Usage:   map[string]Usage{"acme": {Nodes: 8}},
			},
			reqs:    []Request{{JobID: "1", Tenant: "acme", Nodes: 1, Seq: 1}},
			pending: map[string]string{"1": "tenant acme at quota (8/8 nodes)"},
		},
		{
			name: "the node quota counts what this cycle already gave the tenant",
			free: h100, all: h100,
			policy: Policy{Tenants: map[string]Tenant{"acme": {Name: "acme", MaxNodes: 3}}},
			reqs: []Request{
				{JobID: "1", Tenant: "acme", Nodes: 2, Seq: 1},
				{JobID: "2", Tenant: "acme", Nodes: 2, Seq: 2},
				{JobID: "3", Tenant: "acme", Nodes: 1, Seq: 3},
				{JobID: "4", Tenant: "other", Nodes: 1, Seq: 4},
			},
			want:    []Assignment{{"1", []string{"h1", "h2"}}, {"4", []string{"h3"}}, {"3", []string{"h4"}}},
			pending: map[string]string{"2": "tenant acme at quota (2/3 nodes)"},
		},
		{
			name: "a job larger than its tenant's quota says it never fits",
			free: h100, all: h100,
			policy:  Policy{Tenants: map[string]Tenant{"acme": {Name: "acme", MaxNodes: 2}}},
			reqs:    []Request{{JobID: "1", Tenant: "acme", Nodes: 3, Seq: 1}},
			pending: map[string]string{"1": "needs 3 nodes; tenant acme quota is 2 nodes"},
		},
		{
			name: "a tenant at its per-model quota waits for that model and runs on others",
			free: cat(h100, a100), all: cat(h100, a100),
			policy: Policy{
				Tenants: map[string]Tenant{"acme": {Name: "acme", MaxNodesPerModel: map[string]int{"H100": 4}}},
				Usage:   map[string]Usage{"acme": {Nodes: 4, PerModel: map[string]int{"H100": 4}}},
			},
			reqs: []Request{
				{JobID: "1", Tenant: "acme", Nodes: 1, GPUModel: "H100", Seq: 1},
				{JobID: "2", Tenant: "acme", Nodes: 1, GPUModel: "A100", Seq: 2},
			},
			want:    []Assignment{{"2", []string{"a1"}}},
			pending: map[string]string{"1": "tenant acme at quota for H100 (4/4 nodes)"},
		},
		{
			name: "a job of any model takes capped models only up to the tenant's cap",
			free: cat(h100, a100), all: cat(h100, a100),
			policy: Policy{
				Tenants: map[string]Tenant{"acme": {Name: "acme", MaxNodesPerModel: map[string]int{"H100": 2, "A100": 1}}},
				Usage:   map[string]Usage{"acme": {Nodes: 1, PerModel: map[string]int{"H100": 1}}},
			},
			reqs: []Request{
				{JobID: "1", Tenant: "acme", Nodes: 2, Seq: 1},
				{JobID: "2", Tenant: "acme", Nodes: 1, Seq: 2},
			},
			want:    []Assignment{{"1", []string{"a1", "h1"}}},
			pending: map[string]string{"2": "tenant acme at quota for A100 (1/1 nodes) and H100 (2/2 nodes)"},
		},
		{
			name: "a small job behind a blocked gang cannot take the gang's nodes but can take others",
			free: cat(h100[:2], a100), all: cat(h100, a100),
			reqs: []Request{
				{JobID: "gang", Nodes: 4, GPUModel: "H100", Seq: 1},
				{JobID: "small-h", Nodes: 1, GPUModel: "H100", Seq: 2},
				{JobID: "small-any", Nodes: 1, Seq: 3},
			},
			want: []Assignment{{"small-any", []string{"a1"}}},
			pending: map[string]string{
				"gang":    "waiting for 4 H100 nodes; 2 of 4 free",
				"small-h": "behind job gang (needs 4 H100 nodes) in queue default",
			},
		},
		{
			name: "only the first blocked gang holds nodes",
			free: cat(h100[:2], a100[:1]), all: cat(h100, a100),
			reqs: []Request{
				{JobID: "gang-h", Nodes: 3, GPUModel: "H100", Seq: 1},
				{JobID: "gang-a", Nodes: 2, GPUModel: "A100", Seq: 2},
				{JobID: "small-a", Nodes: 1, GPUModel: "A100", Seq: 3},
			},
			want: []Assignment{{"small-a", []string{"a1"}}},
			pending: map[string]string{
				"gang-h": "waiting for 3 H100 nodes; 2 of 4 free",
				"gang-a": "waiting for 2 A100 nodes; 1 of 2 free",
			},
		},
		{
			name: "a gang that can never fit holds nothing",
			free: h100, all: h100,
			reqs: []Request{
				{JobID: "huge", Nodes: 6, GPUModel: "H100", Seq: 1},
				{JobID: "small", Nodes: 1, GPUModel: "H100", Seq: 2},
			},
			want:    []Assignment{{"small", []string{"h1"}}},
			pending: map[string]string{"huge": "needs 6 H100 nodes; cluster has 4"},
		},
		{
			name: "a gang held for in a higher queue names that queue",
			free: h100[:2], all: h100,
			policy: Policy{Queues: map[string]Queue{"train": {Name: "train", Priority: 1}}},
			reqs: []Request{
				{JobID: "small", Nodes: 2, Seq: 1},
				{JobID: "gang", Nodes: 3, Queue: "train", Seq: 2},
			},
			pending: map[string]string{
				"gang":  "waiting for 3 nodes; 2 of 4 free",
				"small": "behind job gang (needs 3 nodes) in queue train",
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			plan := Schedule(NewSnapshot(c.free, c.all), c.policy, c.reqs)
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

func TestScheduleHoldsRackForRequiredTopology(t *testing.T) {
	r1 := rack("r1", "x1", "x2", "x3", "x4")
	r2 := rack("r2", "y1", "y2")
	all := cat(r1, r2)
	free := cat(r1[:3], r2) // x1..x3 and y1, y2 free
	reqs := []Request{
		{JobID: "gang", Nodes: 4, Topology: Topology{Key: "rack", Required: true}, Seq: 1},
		{JobID: "small", Nodes: 1, Seq: 2},
		{JobID: "pair", Nodes: 2, Topology: Topology{Key: "rack", Required: true}, Seq: 3},
		{JobID: "more", Nodes: 1, Seq: 4},
	}
	plan := Schedule(NewSnapshot(free, all), Policy{}, reqs)
	want := []Assignment{{"small", []string{"y1"}}, {"more", []string{"y2"}}}
	if !reflect.DeepEqual(plan.Assignments, want) {
		t.Errorf("assignments = %v, want %v", plan.Assignments, want)
	}
	wantPending := map[string]string{
		"gang": "needs 4 nodes in one rack; best rack has 3 free",
		"pair": "behind job gang (needs 4 nodes in one rack) in queue default",
	}
	if !reflect.DeepEqual(plan.PendingReasons(), wantPending) {
		t.Errorf("pending = %v, want %v", plan.PendingReasons(), wantPending)
	}
}

// randomPolicy gives randomCase's requests tenants, queues and priorities,
// and draws quotas, usage (within quota), weights, paused queues and aging.
func randomPolicy(seed int, reqs []Request) Policy {
	rng := rand.New(rand.NewPCG(uint64(seed), 7))
	models := []string{"H100", "A100", "H200"}
	p := Policy{Tenants: map[string]Tenant{}, Queues: map[string]Queue{}, Usage: map[string]Usage{}}
	if rng.IntN(2) == 0 {
		p.AgingStep = time.Minute
	}
	for q := range 3 {
		name := fmt.Sprintf("q%d", q)
		p.Queues[name] = Queue{Name: name, Priority: rng.IntN(3), Paused: rng.IntN(5) == 0}
	}
	for tn := range 3 {
		name := fmt.Sprintf("t%d", tn)
		t := Tenant{Name: name, Weight: float64(rng.IntN(4))}
		u := Usage{PerModel: map[string]int{}}
		for _, m := range models {
			n := rng.IntN(3)
			u.PerModel[m] = n
			u.Nodes += n
			if rng.IntN(2) == 0 {
				if t.MaxNodesPerModel == nil {
					t.MaxNodesPerModel = map[string]int{}
				}
				t.MaxNodesPerModel[m] = n + rng.IntN(4)
			}
		}
		if rng.IntN(2) == 0 {
			t.MaxNodes = u.Nodes + rng.IntN(8)
		}
		p.Tenants[name], p.Usage[name] = t, u
	}
	for i := range reqs {
		reqs[i].Tenant = fmt.Sprintf("t%d", rng.IntN(3))
		reqs[i].Queue = fmt.Sprintf("q%d", rng.IntN(4)) // q3: not listed
		reqs[i].Priority = rng.IntN(4)
		reqs[i].Seq = uint64(i)
		reqs[i].Waited = time.Duration(rng.IntN(300)) * time.Second
	}
	rng.Shuffle(len(reqs), func(i, j int) { reqs[i], reqs[j] = reqs[j], reqs[i] })
	return p
}

// TestScheduleProperties checks over random clusters, requests and
// policies that quotas hold (Usage plus assignments), that no node is given
// twice, that assignments are free matching nodes of the right count inside
// a required domain, that paused queues are never placed, and that every
// request is either placed or explained.
func TestScheduleProperties(t *testing.T) {
	for seed := range 200 {
		free, all, reqs := randomCase(seed, false)
		// More requests than randomCase draws, to press on quotas.
		for i := len(reqs); i < 20; i++ {
			r := reqs[i%len(reqs)]
			r.JobID = fmt.Sprint(i)
			reqs = append(reqs, r)
		}
		p := randomPolicy(seed, reqs)
		plan := Schedule(NewSnapshot(free, all), p, reqs)
		if len(plan.Assignments)+len(plan.PendingReasons()) != len(reqs) {
			t.Fatalf("seed %d: %d placed + %d pending != %d requests", seed, len(plan.Assignments), len(plan.PendingReasons()), len(reqs))
		}
		byJob := map[string]Request{}
		for _, r := range reqs {
			byJob[r.JobID] = r
		}
		avail := map[string]Node{}
		for _, n := range free {
			avail[n.ID] = n
		}
		nodes, perModel := map[string]int{}, map[string]map[string]int{}
		for name, u := range p.Usage {
			nodes[name] = u.Nodes
			perModel[name] = map[string]int{}
			for m, n := range u.PerModel {
				perModel[name][m] = n
			}
		}
		for _, a := range plan.Assignments {
			r := byJob[a.JobID]
			if _, ok := plan.PendingReasons()[a.JobID]; ok {
				t.Fatalf("seed %d: job %s both placed and pending", seed, a.JobID)
			}
			if p.Queues[r.Queue].Paused {
				t.Fatalf("seed %d: job %s of paused queue %s placed", seed, a.JobID, r.Queue)
			}
			if len(a.Nodes) != r.Nodes {
				t.Fatalf("seed %d: job %s got %d nodes, wants %d", seed, a.JobID, len(a.Nodes), r.Nodes)
			}
			domains := map[string]bool{}
			for _, id := range a.Nodes {
				n, ok := avail[id]
				if !ok {
					t.Fatalf("seed %d: job %s got node %s that is not free or already assigned", seed, a.JobID, id)
				}
				delete(avail, id)
				if !fits(n, r) {
					t.Fatalf("seed %d: node %+v does not match %+v", seed, n, r)
				}
				if r.required() {
					d, ok := n.Labels[r.Topology.Key]
					if !ok {
						t.Fatalf("seed %d: job %s got node %s without %s", seed, a.JobID, id, r.Topology.Key)
					}
					domains[d] = true
				}
				nodes[r.Tenant]++
				perModel[r.Tenant][n.GPUModel]++
			}
			if len(domains) > 1 {
				t.Fatalf("seed %d: job %s spans %v", seed, a.JobID, domains)
			}
		}
		for name, tn := range p.Tenants {
			if tn.MaxNodes > 0 && nodes[name] > tn.MaxNodes {
				t.Fatalf("seed %d: tenant %s holds %d nodes, quota %d", seed, name, nodes[name], tn.MaxNodes)
			}
			for m, lim := range tn.MaxNodesPerModel {
				if perModel[name][m] > lim {
					t.Fatalf("seed %d: tenant %s holds %d %s nodes, quota %d", seed, name, perModel[name][m], m, lim)
				}
			}
		}
		for id, why := range plan.PendingReasons() {
			if why == "" {
				t.Fatalf("seed %d: job %s pending without a reason", seed, id)
			}
			if q := byJob[id].Queue; p.Queues[q].Paused && why != "queue "+q+" paused" {
				t.Fatalf("seed %d: job %s of paused queue %s: reason %q", seed, id, q, why)
			}
		}
	}
}

// TestScheduleFairShareConverges simulates 200 cycles on a 30-node cluster:
// two tenants with weights 1 and 2 and unlimited demand of 1-node jobs;
// each round about 20% of running jobs finish, then Schedule fills the free
// nodes. After a warm-up the average nodes held by tenant 2 over tenant 1
// must be within 10% of 2.0.
func TestScheduleFairShareConverges(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	all := make([]Node, 30)
	for i := range all {
		all[i] = Node{ID: fmt.Sprintf("n%02d", i), GPUModel: "H100", GPUCount: 8}
	}
	p := Policy{Tenants: map[string]Tenant{"t1": {Name: "t1", Weight: 1}, "t2": {Name: "t2", Weight: 2}}}
	running := map[string]string{} // node -> tenant
	var seq uint64
	sum := map[string]int{}
	for round := range 200 {
		for _, n := range all { // map order is random: walk nodes in order
			if _, ok := running[n.ID]; ok && rng.Float64() < 0.2 {
				delete(running, n.ID)
			}
		}
		var free []Node
		p.Usage = map[string]Usage{}
		for _, n := range all {
			if tn, ok := running[n.ID]; ok {
				u := p.Usage[tn]
				u.Nodes++
				u.PerModel = map[string]int{"H100": u.Nodes}
				p.Usage[tn] = u
			} else {
				free = append(free, n)
			}
		}
		var reqs []Request
		owner := map[string]string{}
		for range len(free) { // each tenant has more demand than free nodes
			for _, tn := range []string{"t1", "t2"} {
				seq++
				id := fmt.Sprint(seq)
				owner[id] = tn
				reqs = append(reqs, Request{JobID: id, Nodes: 1, Tenant: tn, Seq: seq})
			}
		}
		plan := Schedule(NewSnapshot(free, all), p, reqs)
		for _, a := range plan.Assignments {
			running[a.Nodes[0]] = owner[a.JobID]
		}
		if len(running) != len(all) {
			t.Fatalf("round %d: %d of %d nodes running", round, len(running), len(all))
		}
		if round >= 20 {
			for _, tn := range running {
				sum[tn]++
			}
		}
	}
	ratio := float64(sum["t2"]) / float64(sum["t1"])
	t.Logf("t2/t1 = %.3f (%d/%d node-rounds)", ratio, sum["t2"], sum["t1"])
	if ratio < 1.8 || ratio > 2.2 {
		t.Fatalf("t2/t1 = %.3f, want 2.0 ± 10%%", ratio)
	}
}

// BenchmarkSchedule is one policy cycle (snapshot and schedule) on
// benchCluster's 10,000 nodes (5,000 free) with 100,000 pending requests
// across 10 tenants and 3 queues, of mixed gang sizes and priorities.
func BenchmarkSchedule(b *testing.B) {
	free, all, _ := benchCluster()
	models := []string{"H100", "A100", "H200", "B200"}
	reqs := make([]Request, 100000)
	for i := range reqs {
		reqs[i] = Request{
			JobID: fmt.Sprint(i), Nodes: 1 + i%8, GPUModel: models[i%4],
			Tenant: fmt.Sprintf("t%d", i%10), Queue: fmt.Sprintf("q%d", i%3),
			Priority: i % 5, Seq: uint64(i), Waited: time.Duration(i%600) * time.Second,
		}
	}
	p := Policy{
		Tenants:   map[string]Tenant{},
		Queues:    map[string]Queue{"q0": {Name: "q0", Priority: 2}, "q1": {Name: "q1", Priority: 1}, "q2": {Name: "q2"}},
		Usage:     map[string]Usage{},
		AgingStep: time.Minute,
	}
	for i := range 10 {
		name := fmt.Sprintf("t%d", i)
		p.Tenants[name] = Tenant{Name: name, Weight: float64(1 + i%3), MaxNodes: 2000,
			MaxNodesPerModel: map[string]int{"H100": 300}}
		p.Usage[name] = Usage{Nodes: 100 * i, PerModel: map[string]int{models[i%4]: 100 * i}}
	}
	b.ReportAllocs()
	for b.Loop() {
		Schedule(NewSnapshot(free, all), p, reqs)
	}
}
