package engine

import (
	"context"
	"fmt"
	"strings"

	"go.uber.org/zap"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
)

// nodeEvent records an agent's event on the node and, when a lease holds
// the node, on that lease's job. Both are persisted (bounded), so the event
// survives a failover.
func (e *Engine) nodeEvent(n *nodeEntry, ev model.NodeEvent) {
	ev.Node = n.node.ID
	if ev.Time.IsZero() {
		ev.Time = e.cfg.Now()
	}
	if ev.LeaseID == "" {
		ev.LeaseID = n.lease
	}
	n.node.Events = model.AppendEvent(n.node.Events, ev, model.MaxNodeEvents)
	change := store.Change{Node: n.node}
	if l, ok := e.findLease(ev.LeaseID); ok {
		if j, ok := e.findJob(l.jobID()); ok {
			// The lease may have ended and its job been archived.
			if full, err := e.unarchive(j); err != nil {
				e.log.Warn("node event not added to its ended job", zap.String("job_id", l.jobID()), zap.Error(err))
			} else {
				full.Events = model.AppendEvent(full.Events, ev, model.MaxJobEvents)
				change.Job = full
			}
		}
	}
	e.persist(change)
	e.log.Info("node event", zap.String("node", n.node.ID), zap.String("lease_id", ev.LeaseID),
		zap.Stringer("kind", pb.NodeEventKind(ev.Kind)), zap.Int("gpu", ev.GPU), zap.String("message", ev.Message))
}

// health applies an agent's health verdict. An unhealthy node takes no new
// lease and its running lease is stopped, the job requeued by its retry
// policy; a node that passes its re-check returns to READY by itself.
func (e *Engine) health(n *nodeEntry, healthy bool, problems []string) {
	switch {
	case !healthy:
		reason := "unhealthy: " + strings.Join(problems, "; ")
		if n.node.State == model.NodeUnhealthy && n.node.Reason == reason {
			return
		}
		n.node.State, n.node.Reason = model.NodeUnhealthy, reason
		e.nodeEvent(n, model.NodeEvent{Kind: model.EventUnhealthy, GPU: -1, Action: "drained", Message: reason})
		if n.lease != "" {
			j := e.jobs[e.leases[n.lease].lease.JobID]
			e.nodeFailed(j, fmt.Sprintf("node %s %s", n.node.ID, reason))
		}
		e.log.Warn("node unhealthy", zap.String("node", n.node.ID), zap.String("reason", reason))
	case n.node.State == model.NodeUnhealthy:
		n.node.State, n.node.Reason = model.NodeReady, ""
		e.nodeEvent(n, model.NodeEvent{Kind: model.EventRecovered, GPU: -1, Action: "returned to service", Message: "passed its health re-check"})
		e.log.Info("node recovered", zap.String("node", n.node.ID))
	}
	e.needCycle = true
}

// MockInject relays a fault to a simulated node's agent and waits for its
// answer. Agents on real NVML refuse.
func (e *Engine) MockInject(ctx context.Context, node string, inj *pb.MockInject) error {
	if err := model.ValidateID("node", node); err != nil {
		return err
	}
	e.mu.RLock()
	n := e.nodes[node]
	var c *agentConn
	if n != nil {
		c = n.conn
	}
	e.mu.RUnlock()
	switch {
	case n == nil:
		return model.Errorf(model.ErrNotFound, "node %s not found", node)
	case c == nil:
		return model.Errorf(model.ErrNodeUnavailable, "node %s is not connected", node)
	}
	id := c.nextReq.Add(1)
	ch := make(chan *pb.MockInjectResult, 1)
	c.mu.Lock()
	if c.injectReqs == nil {
		c.mu.Unlock()
		return model.Errorf(model.ErrNodeUnavailable, "node %s disconnected", node)
	}
	c.injectReqs[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.injectReqs, id)
		c.mu.Unlock()
	}()
	inj.RequestId = id
	msg := &pb.ConnectResponse{FencingToken: e.Token(), Msg: &pb.ConnectResponse_MockInject{MockInject: inj}}
	if !c.enqueue(msg) {
		c.cancel()
		return model.Errorf(model.ErrNodeUnavailable, "node %s too slow, disconnected", node)
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return model.Errorf(model.ErrNodeUnavailable, "node %s disconnected", node)
		}
		if r.GetError() != "" {
			return model.Errorf(model.ErrFailedPrecondition, "node %s: %s", node, r.GetError())
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// deliverInject routes an agent's answer to the waiting MockInject.
func (c *agentConn) deliverInject(r *pb.MockInjectResult) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ch, ok := c.injectReqs[r.GetRequestId()]; ok {
		ch <- r
		delete(c.injectReqs, r.GetRequestId())
	}
}
