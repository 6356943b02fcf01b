package engine

import (
	"context"
	"maps"
	"testing"

	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/placement"
)

// holdEvent blocks the loop, while it applies it, until release closes.
type holdEvent struct{ applying, release chan struct{} }

func (ev *holdEvent) apply(*Engine) {
	close(ev.applying)
	<-ev.release
}

type noopEvent struct{}

func (noopEvent) apply(*Engine) {}

// HoldLoop stops the loop inside a turn and fills its event channel, so
// that every post waits, until the returned release is called (or the
// test ends).
func (e *Engine) HoldLoop(t testing.TB) (release func()) {
	t.Helper()
	ev := &holdEvent{applying: make(chan struct{}), release: make(chan struct{})}
	released := false
	release = func() {
		if !released {
			released = true
			close(ev.release)
		}
	}
	t.Cleanup(release)
	if err := e.post(context.Background(), ev); err != nil {
		t.Fatalf("post: %v", err)
	}
	<-ev.applying
	for len(e.events) < cap(e.events) {
		if err := e.post(context.Background(), noopEvent{}); err != nil {
			t.Fatalf("post: %v", err)
		}
	}
	return release
}

// Archived reports whether job id is held archived (encoded).
func (e *Engine) Archived(id string) bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	j, ok := e.findJob(id)
	return ok && j.live == nil
}

// LeaseArchived reports whether lease id is held archived, and returns
// the lease as reads see it.
func (e *Engine) LeaseArchived(id string) (bool, *model.Lease, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	r, ok := e.findLease(id)
	if !ok {
		return false, nil, nil
	}
	l, err := e.leaseView(r)
	return r.live == nil, l, err
}

// Usage returns the tenants' usage as the engine keeps it, and as
// counted afresh from every node's lease, for tests to compare.
func (e *Engine) Usage() (kept, counted map[string]placement.Usage) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	kept, counted = map[string]placement.Usage{}, map[string]placement.Usage{}
	for t, u := range e.usage {
		kept[t] = placement.Usage{Nodes: u.Nodes, PerModel: maps.Clone(u.PerModel)}
	}
	for _, n := range e.nodes {
		if n.lease == "" {
			continue
		}
		u := counted[n.tenant]
		if u.PerModel == nil {
			u.PerModel = map[string]int{}
		}
		u.Nodes++
		u.PerModel[n.node.Inventory.GPUModel]++
		counted[n.tenant] = u
	}
	return kept, counted
}
