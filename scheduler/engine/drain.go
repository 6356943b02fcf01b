package engine

import (
	"context"
	"fmt"

	"go.uber.org/zap"

	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
)

// nodeResult carries a node view (or an error) back to an RPC handler.
type nodeResult struct {
	node *model.Node
	err  error
}

type drainEvent struct {
	id, reason string
	drain, now bool
	reply      chan nodeResult
}

// Drain stops new leases on node id. With now, its current lease is
// stopped too and the job requeued without spending a retry.
func (e *Engine) Drain(ctx context.Context, id, reason string, now bool) (*model.Node, error) {
	return e.setDrain(ctx, &drainEvent{id: id, reason: reason, drain: true, now: now})
}

// Undrain returns a drained node to service.
func (e *Engine) Undrain(ctx context.Context, id string) (*model.Node, error) {
	return e.setDrain(ctx, &drainEvent{id: id})
}

func (e *Engine) setDrain(ctx context.Context, ev *drainEvent) (*model.Node, error) {
	if err := model.ValidateID("id", ev.id); err != nil {
		return nil, err
	}
	if len(ev.reason) > model.MaxNameLen*4 {
		return nil, &model.ValidationError{Violations: []model.FieldViolation{{Field: "reason", Description: fmt.Sprintf("must be at most %d characters", model.MaxNameLen*4)}}}
	}
	ev.reply = make(chan nodeResult, 1)
	if err := e.post(ctx, ev); err != nil {
		return nil, err
	}
	select {
	case r := <-ev.reply:
		return r.node, r.err
	case <-e.stopped:
		return nil, model.ErrStopped
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (ev *drainEvent) apply(e *Engine) {
	n, ok := e.nodes[ev.id]
	if !ok {
		err := model.Errorf(model.ErrNotFound, "node %s not found", ev.id)
		e.reply(func() { ev.reply <- nodeResult{err: err} })
		return
	}
	n.node.Drain, n.node.DrainReason = ev.drain, ev.reason
	if ev.drain && ev.reason == "" {
		n.node.DrainReason = "drained by operator"
	}
	e.persist(store.Change{Node: n.node})
	if ev.drain && ev.now && n.lease != "" {
		j := e.jobs[e.leases[n.lease].lease.JobID]
		why := fmt.Sprintf("node %s drained now (%s)", ev.id, n.node.DrainReason)
		e.requeue(j, why, "requeued: "+why)
	}
	e.needCycle = true
	e.log.Info("node drain changed", zap.String("node", ev.id), zap.Bool("drain", ev.drain), zap.Bool("now", ev.now), zap.String("reason", ev.reason))
	view := e.nodeView(n)
	e.reply(func() { ev.reply <- nodeResult{node: view} })
}

type labelEvent struct {
	id     string
	set    map[string]string
	remove []string
	reply  chan nodeResult
}

// Label sets and removes operator labels on a node. They override the
// agent's labels and feed placement (selectors, topology) from the next
// cycle on.
func (e *Engine) Label(ctx context.Context, id string, set map[string]string, remove []string) (*model.Node, error) {
	if err := model.ValidateID("id", id); err != nil {
		return nil, err
	}
	if err := model.ValidateLabelChange(set, remove); err != nil {
		return nil, err
	}
	ev := &labelEvent{id: id, set: set, remove: remove, reply: make(chan nodeResult, 1)}
	if err := e.post(ctx, ev); err != nil {
		return nil, err
	}
	select {
	case r := <-ev.reply:
		return r.node, r.err
	case <-e.stopped:
		return nil, model.ErrStopped
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (ev *labelEvent) apply(e *Engine) {
	n, ok := e.nodes[ev.id]
	if !ok {
		err := model.Errorf(model.ErrNotFound, "node %s not found", ev.id)
		e.reply(func() { ev.reply <- nodeResult{err: err} })
		return
	}
	labels := map[string]string{}
	for k, v := range n.node.OperatorLabels {
		labels[k] = v
	}
	for k, v := range ev.set {
		labels[k] = v
	}
	for _, k := range ev.remove {
		delete(labels, k)
	}
	if len(labels) == 0 {
		labels = nil
	}
	n.node.OperatorLabels = labels
	e.persist(store.Change{Node: n.node})
	e.needCycle = true
	view := e.nodeView(n)
	e.reply(func() { ev.reply <- nodeResult{node: view} })
}
