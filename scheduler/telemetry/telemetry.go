// Package telemetry keeps the GPU telemetry agents report: a bounded recent
// history per node, in memory only (telemetry never goes to etcd), and live
// fan-out to subscribers. A slow subscriber never slows agents or other
// subscribers: its buffer is bounded, the oldest samples are dropped, and
// it is told how many it missed.
package telemetry

import (
	"context"
	"slices"
	"sync"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Defaults for a Hub.
const (
	// DefaultHistory is how many batches (sampling rounds) each node keeps:
	// five minutes at the default 1 Hz.
	DefaultHistory = 300
	// DefaultSubscriberBuffer bounds samples queued for one subscriber.
	DefaultSubscriberBuffer = 4096
)

// Filter selects samples.
type Filter struct {
	Nodes []string // empty: all
	JobID string   // empty: any
	// LiveOnly skips the history.
	LiveOnly bool
}

func (f Filter) match(node string, b *pb.TelemetryBatch) bool {
	if len(f.Nodes) > 0 && !slices.Contains(f.Nodes, node) {
		return false
	}
	return f.JobID == "" || b.GetJobId() == f.JobID
}

type entry struct {
	node  string
	batch *pb.TelemetryBatch
}

// Hub holds history and subscribers. The zero value is not usable; use New.
type Hub struct {
	history int
	buffer  int

	mu    sync.Mutex
	nodes map[string][]*pb.TelemetryBatch // ring per node, oldest first
	subs  map[*subscriber]struct{}
}

// New returns a hub keeping history batches per node.
func New(history, buffer int) *Hub {
	if history <= 0 {
		history = DefaultHistory
	}
	if buffer <= 0 {
		buffer = DefaultSubscriberBuffer
	}
	return &Hub{history: history, buffer: buffer, nodes: map[string][]*pb.TelemetryBatch{}, subs: map[*subscriber]struct{}{}}
}

// Publish records a node's batch and hands it to matching subscribers. It
// never blocks on a subscriber.
func (h *Hub) Publish(node string, b *pb.TelemetryBatch) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ring := append(h.nodes[node], b)
	if len(ring) > h.history {
		ring = ring[len(ring)-h.history:]
	}
	h.nodes[node] = ring
	for s := range h.subs {
		if s.filter.match(node, b) {
			s.push(entry{node, b})
		}
	}
}

// Watch sends the matching history (unless f.LiveOnly), then live samples,
// until ctx ends or send fails.
func (h *Hub) Watch(ctx context.Context, f Filter, send func(*pb.WatchTelemetryResponse) error) error {
	s := &subscriber{filter: f, max: h.buffer, wake: make(chan struct{}, 1)}
	h.mu.Lock()
	var backlog []entry
	if !f.LiveOnly {
		for node, ring := range h.nodes {
			for _, b := range ring {
				if f.match(node, b) {
					backlog = append(backlog, entry{node, b})
				}
			}
		}
		slices.SortStableFunc(backlog, func(a, b entry) int {
			return a.batch.GetTime().AsTime().Compare(b.batch.GetTime().AsTime())
		})
	}
	h.subs[s] = struct{}{}
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		delete(h.subs, s)
		h.mu.Unlock()
	}()
	for _, e := range backlog {
		if err := sendBatch(e, 0, send); err != nil {
			return err
		}
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.wake:
		}
		for {
			e, dropped, ok := s.pop()
			if !ok {
				break
			}
			if err := sendBatch(e, dropped, send); err != nil {
				return err
			}
		}
	}
}

// sendBatch sends one response per GPU sample of a batch.
func sendBatch(e entry, dropped uint64, send func(*pb.WatchTelemetryResponse) error) error {
	for _, smp := range e.batch.GetSamples() {
		if err := send(&pb.WatchTelemetryResponse{
			Node: e.node, Time: e.batch.GetTime(), LeaseId: e.batch.GetLeaseId(), JobId: e.batch.GetJobId(),
			Sample: smp, Dropped: dropped,
		}); err != nil {
			return err
		}
		dropped = 0
	}
	return nil
}

// subscriber is one watcher's bounded queue of batches.
type subscriber struct {
	filter  Filter
	max     int
	mu      sync.Mutex
	queue   []entry
	dropped uint64
	wake    chan struct{}
}

// push queues e, dropping the oldest when full. Called with the hub locked.
func (s *subscriber) push(e entry) {
	s.mu.Lock()
	if len(s.queue) >= s.max {
		s.queue = s.queue[1:]
		s.dropped += uint64(len(e.batch.GetSamples()))
	}
	s.queue = append(s.queue, e)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// pop takes the oldest queued batch and the drops since the last pop.
func (s *subscriber) pop() (entry, uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.queue) == 0 {
		return entry{}, 0, false
	}
	e := s.queue[0]
	s.queue = s.queue[1:]
	d := s.dropped
	s.dropped = 0
	return e, d, true
}
