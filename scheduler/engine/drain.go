package engine

import (
	"context"
	"fmt"

	"go.uber.org/zap"

	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
)

// funcEvent runs fn on the loop; its error is answered after the turn
// commits, so a caller never sees a change that is not durable.
type funcEvent struct {
	fn    func(e *Engine) error
	reply chan error
}

func (ev *funcEvent) apply(e *Engine) {
	err := ev.fn(e)
	if err == nil {
		e.needCycle = true
	}
	e.reply(func() { ev.reply <- err })
}

// onLoop runs fn on the loop and waits until its changes are committed.
func (e *Engine) onLoop(ctx context.Context, fn func(e *Engine) error) error {
	ev := &funcEvent{fn: fn, reply: make(chan error, 1)}
	if err := e.post(ctx, ev); err != nil {
		return err
	}
	select {
	case err := <-ev.reply:
		return err
	case <-e.stopped:
		return model.ErrStopped
	case <-ctx.Done():
		return ctx.Err()
	}
}

// onNode runs fn on node id on the loop and returns the node as clients
// then see it.
func (e *Engine) onNode(ctx context.Context, id string, fn func(n *nodeEntry)) (*model.Node, error) {
	if err := model.ValidateID("id", id); err != nil {
		return nil, err
	}
	var view *model.Node
	err := e.onLoop(ctx, func(e *Engine) error {
		n, ok := e.nodes[id]
		if !ok {
			return model.Errorf(model.ErrNotFound, "node %s not found", id)
		}
		fn(n)
		e.persist(store.Change{Node: n.node})
		view = e.nodeView(n)
		return nil
	})
	return view, err
}

// maxDrainReason bounds an operator's drain reason.
const maxDrainReason = 4 * model.MaxNameLen

// Drain stops new leases on node id. With now, its current lease is
// stopped too and the job requeued without spending a retry.
func (e *Engine) Drain(ctx context.Context, id, reason string, now bool) (*model.Node, error) {
	if len(reason) > maxDrainReason {
		return nil, &model.ValidationError{Violations: []model.FieldViolation{{Field: "reason", Description: fmt.Sprintf("must be at most %d characters", maxDrainReason)}}}
	}
	if reason == "" {
		reason = "drained by operator"
	}
	return e.onNode(ctx, id, func(n *nodeEntry) {
		n.node.Drain, n.node.DrainReason = true, reason
		if now && n.lease != "" {
			j := e.jobs[e.leases[n.lease].lease.JobID]
			why := fmt.Sprintf("node %s drained now (%s)", id, reason)
			e.requeue(j, why, "requeued: "+why)
		}
		e.log.Info("node drained", zap.String("node", id), zap.Bool("now", now), zap.String("reason", reason))
	})
}

// Undrain returns a drained node to service.
func (e *Engine) Undrain(ctx context.Context, id string) (*model.Node, error) {
	return e.onNode(ctx, id, func(n *nodeEntry) {
		n.node.Drain, n.node.DrainReason = false, ""
		e.log.Info("node undrained", zap.String("node", id))
	})
}

// Label sets and removes operator labels on a node. They override the
// agent's labels and feed placement (selectors, topology) from the next
// cycle on.
func (e *Engine) Label(ctx context.Context, id string, set map[string]string, remove []string) (*model.Node, error) {
	if err := model.ValidateLabelChange(set, remove); err != nil {
		return nil, err
	}
	return e.onNode(ctx, id, func(n *nodeEntry) {
		labels := map[string]string{}
		for k, v := range n.node.OperatorLabels {
			labels[k] = v
		}
		for k, v := range set {
			labels[k] = v
		}
		for _, k := range remove {
			delete(labels, k)
		}
		if len(labels) == 0 {
			labels = nil
		}
		n.node.OperatorLabels = labels
		n.placement, e.nodesChanged = nil, true
	})
}
