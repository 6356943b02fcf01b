package engine

import (
	"context"
	"sort"

	"go.uber.org/zap"

	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
)

// TenantUsage is a tenant with what it holds and waits for now.
type TenantUsage struct {
	Tenant        model.Tenant
	Nodes         int
	NodesPerModel map[string]int
	Pending       int
	Running       int
}

// QueueUsage is a queue with its pending and running jobs.
type QueueUsage struct {
	Queue   model.Queue
	Pending int
	Running int
}

// tenant returns the settings for name; a tenant nobody configured is
// unlimited with weight 1.
func (e *Engine) tenant(name string) model.Tenant {
	if t, ok := e.tenants[name]; ok {
		return t
	}
	return model.Tenant{Name: name, Weight: 1}
}

// SetTenant creates or replaces a tenant's limits and weight.
func (e *Engine) SetTenant(ctx context.Context, t model.Tenant) (model.Tenant, error) {
	t, err := model.NormalizeTenant(t)
	if err != nil {
		return t, err
	}
	return t, e.onLoop(ctx, func(e *Engine) error {
		e.tenants[t.Name] = t
		e.persist(store.Change{Tenant: &t})
		e.log.Info("tenant set", zap.String("tenant", t.Name), zap.Int("max_nodes", t.MaxNodes), zap.Float64("weight", t.Weight))
		return nil
	})
}

// SaveQueue creates (create) or updates a queue's priority and weight. A
// queue may be created paused (to fill it before any of it starts); an
// update keeps the pause state, which PauseQueue and ResumeQueue change.
func (e *Engine) SaveQueue(ctx context.Context, q model.Queue, create bool) (model.Queue, error) {
	q, err := model.NormalizeQueue(q)
	if err != nil {
		return q, err
	}
	var out model.Queue
	err = e.onLoop(ctx, func(e *Engine) error {
		old, exists := e.queues[q.Name]
		switch {
		case create && exists:
			return model.Errorf(model.ErrAlreadyExists, "queue %s already exists", q.Name)
		case !create && !exists:
			return model.Errorf(model.ErrNotFound, "queue %s not found", q.Name)
		}
		if !create {
			q.Paused = old.Paused
		}
		e.queues[q.Name] = q
		e.persist(store.Change{Queue: &q})
		out = q
		return nil
	})
	return out, err
}

// PauseQueue stops (pause) or restarts starting the queue's jobs.
func (e *Engine) PauseQueue(ctx context.Context, name string, pause bool) (model.Queue, error) {
	if err := model.ValidateID("name", name); err != nil {
		return model.Queue{}, err
	}
	var out model.Queue
	err := e.onLoop(ctx, func(e *Engine) error {
		q, ok := e.queues[name]
		if !ok {
			return model.Errorf(model.ErrNotFound, "queue %s not found", name)
		}
		q.Paused = pause
		e.queues[name] = q
		e.persist(store.Change{Queue: &q})
		out = q
		return nil
	})
	return out, err
}

// ListTenants returns every configured tenant, and every tenant with jobs,
// with its usage, by name.
func (e *Engine) ListTenants() []TenantUsage {
	e.mu.RLock()
	defer e.mu.RUnlock()
	usage := map[string]*TenantUsage{}
	get := func(name string) *TenantUsage {
		u, ok := usage[name]
		if !ok {
			u = &TenantUsage{Tenant: e.tenant(name), NodesPerModel: map[string]int{}}
			usage[name] = u
		}
		return u
	}
	for name := range e.tenants {
		get(name)
	}
	for name, held := range e.usage {
		u := get(name)
		u.Nodes = held.Nodes
		for m, n := range held.PerModel {
			u.NodesPerModel[m] = n
		}
	}
	for _, j := range e.jobs {
		switch j.State {
		case model.JobPending:
			get(j.Spec.Tenant).Pending++
		case model.JobScheduled, model.JobRunning:
			get(j.Spec.Tenant).Running++
		}
	}
	out := make([]TenantUsage, 0, len(usage))
	for _, u := range usage {
		out = append(out, *u)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Tenant.Name < out[j].Tenant.Name })
	return out
}

// ListQueues returns every queue with its job counts, by name.
func (e *Engine) ListQueues() []QueueUsage {
	e.mu.RLock()
	defer e.mu.RUnlock()
	usage := map[string]*QueueUsage{}
	for name, q := range e.queues {
		usage[name] = &QueueUsage{Queue: q}
	}
	for _, j := range e.jobs {
		u := usage[j.Spec.Queue]
		if u == nil {
			continue
		}
		switch j.State {
		case model.JobPending:
			u.Pending++
		case model.JobScheduled, model.JobRunning:
			u.Running++
		}
	}
	out := make([]QueueUsage, 0, len(usage))
	for _, u := range usage {
		out = append(out, *u)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Queue.Name < out[j].Queue.Name })
	return out
}
