package telemetry

import (
	"sort"
	"sync"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Defaults for a Hub.
const (
	// DefaultHistory is how many batches (sampling rounds) each node keeps:
	// five minutes at the agents' default 1 Hz.
	DefaultHistory = 300
	// DefaultSubscriberBuffer bounds the GPU samples queued for one
	// subscriber: a few seconds of a thousand 8-GPU nodes.
	DefaultSubscriberBuffer = 32768
	// DefaultUsageIdleTTL is how long the usage of a lease that nobody
	// took (its end was handled by another leader) is kept after its last
	// sample.
	DefaultUsageIdleTTL = 6 * time.Hour
)

// Options configure a Hub. Zero values take the defaults.
type Options struct {
	// History is how many batches each node keeps.
	History int
	// SubscriberBuffer bounds the samples queued for one subscriber; when
	// it is full the oldest are dropped and counted.
	SubscriberBuffer int
	// UsageIdleTTL bounds how long per-lease usage nobody took is kept.
	UsageIdleTTL time.Duration
	// Now is the clock for expiring usage; tests may fake it.
	Now func() time.Time
}

// Hub holds history, subscribers and per-lease usage. Create with New.
type Hub struct {
	history int
	buffer  int
	usage   *usageBook

	mu    sync.Mutex
	nodes map[string][]Entry // per node, oldest first, at most history long
	subs  map[*subscriber]struct{}
}

// New returns a hub.
func New(o Options) *Hub {
	if o.History <= 0 {
		o.History = DefaultHistory
	}
	if o.SubscriberBuffer <= 0 {
		o.SubscriberBuffer = DefaultSubscriberBuffer
	}
	if o.UsageIdleTTL <= 0 {
		o.UsageIdleTTL = DefaultUsageIdleTTL
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Hub{
		history: o.History, buffer: o.SubscriberBuffer, usage: newUsageBook(o.Now, o.UsageIdleTTL),
		nodes: map[string][]Entry{}, subs: map[*subscriber]struct{}{},
	}
}

// Publish records a node's batch, taken while tenant's lease held the node
// (empty when none did), adds it to the lease's usage and queues it for
// matching subscribers. It never blocks on a subscriber. Batches are
// shared with subscribers and must not be modified afterwards.
func (h *Hub) Publish(node, tenant string, b *pb.TelemetryBatch) {
	e := Entry{Node: node, Tenant: tenant, Batch: b}
	h.usage.add(node, b)
	h.mu.Lock()
	defer h.mu.Unlock()
	ring := append(h.nodes[node], e)
	if len(ring) > h.history {
		ring = ring[len(ring)-h.history:]
	}
	h.nodes[node] = ring
	for s := range h.subs {
		if s.m.match(&e) {
			s.push(e)
		}
	}
}

// view is the history as it was at one moment: per node, the entries then
// held. Entries of a ring are never overwritten (a ring only grows at its
// end and is cut at its start), so a view can be read without the lock.
type view []nodeRing

type nodeRing struct {
	node    string
	entries []Entry
}

// viewLocked copies the rings of the nodes m can match, sorted by node.
// Called with h.mu held.
func (h *Hub) viewLocked(m *matcher) view {
	var v view
	if m.nodes != nil {
		for n := range m.nodes {
			if r := h.nodes[n]; len(r) > 0 {
				v = append(v, nodeRing{n, r})
			}
		}
	} else {
		v = make(view, 0, len(h.nodes))
		for n, r := range h.nodes {
			v = append(v, nodeRing{n, r})
		}
	}
	sort.Slice(v, func(i, j int) bool { return v[i].node < v[j].node })
	return v
}

// subscribe registers a subscriber for m and returns it with the history
// as of that moment, so that the history and the live samples neither
// overlap nor leave a gap. Call the returned cancel when done.
func (h *Hub) subscribe(m matcher) (*subscriber, view, func()) {
	s := newSubscriber(m, h.buffer)
	h.mu.Lock()
	v := h.viewLocked(&s.m)
	h.subs[s] = struct{}{}
	h.mu.Unlock()
	return s, v, func() {
		h.mu.Lock()
		delete(h.subs, s)
		h.mu.Unlock()
	}
}

// latest is the snapshot of a view: the newest sample of every GPU in
// entries m matches, by node then GPU. The walk back through a node's
// history stops at a matching batch that adds no GPU not seen yet.
func (v view) latest(m *matcher) []sampleAt {
	var out []sampleAt
	for _, r := range v {
		seen := map[int32]bool{}
		start := len(out)
		for i := len(r.entries) - 1; i >= 0; i-- {
			e := &r.entries[i]
			if !m.match(e) {
				continue
			}
			added := false
			for _, s := range e.Batch.GetSamples() {
				if !seen[s.GetGpu()] {
					seen[s.GetGpu()] = true
					out = append(out, sampleAt{e, s})
					added = true
				}
			}
			if !added {
				break
			}
		}
		node := out[start:]
		sort.Slice(node, func(i, j int) bool { return node[i].s.GetGpu() < node[j].s.GetGpu() })
	}
	return out
}

// sampleAt is one GPU sample with the batch it came in.
type sampleAt struct {
	e *Entry
	s *pb.GpuSample
}

// toProto renders a sample for clients with the selected fields.
func (x sampleAt) toProto(f Fields) *pb.TelemetrySample {
	b := x.e.Batch
	return &pb.TelemetrySample{
		Node: x.e.Node, Time: b.GetTime(), LeaseId: b.GetLeaseId(), JobId: b.GetJobId(),
		Tenant: x.e.Tenant, Sample: f.apply(x.s),
	}
}
