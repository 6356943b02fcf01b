package engine

import (
	"context"
	"fmt"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
)

// LogSink receives a job's output, node by node in rank order.
type LogSink func(node string, rank int, data []byte) error

// JobLogs streams the output of a job's last lease from the agents that
// ran it. Logs stay on the nodes (in each agent's data dir); the scheduler
// only relays them over the agents' existing streams. With follow, it
// keeps fetching what is new every FollowInterval until the job ends.
func (e *Engine) JobLogs(ctx context.Context, id string, follow bool, sink LogSink) error {
	if err := model.ValidateID("id", id); err != nil {
		return err
	}
	offsets := map[string]uint64{} // lease/node -> bytes relayed
	for {
		e.mu.RLock()
		j, found := e.findJob(id)
		var lease *model.Lease
		var err error
		ended := found && j.state().Terminal()
		if l, ok := e.findLease(j.leaseID()); found && ok {
			lease, err = e.leaseView(l)
		}
		e.mu.RUnlock()
		if !found {
			return model.Errorf(model.ErrNotFound, "job %s not found", id)
		}
		if err != nil {
			return err
		}
		if lease != nil {
			if err := e.relayLogs(ctx, lease, offsets, sink); err != nil {
				return err
			}
		}
		if !follow || ended {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-e.stopped:
			return model.ErrStopped
		case <-time.After(FollowInterval):
		}
	}
}

// FollowInterval is how often a followed job's nodes are asked for new
// output.
const FollowInterval = 500 * time.Millisecond

// relayLogs fetches each node's output past what offsets says was relayed.
func (e *Engine) relayLogs(ctx context.Context, lease *model.Lease, offsets map[string]uint64, sink LogSink) error {
	for _, ln := range lease.Nodes {
		e.mu.RLock()
		var c *agentConn
		if n := e.nodes[ln.Node]; n != nil {
			c = n.conn
		}
		e.mu.RUnlock()
		if c == nil {
			return model.Errorf(model.ErrNodeUnavailable, "logs unavailable: node %s is not connected", ln.Node)
		}
		key := lease.ID + "/" + ln.Node
		err := c.fetchLogs(ctx, e.Token(), lease.ID, offsets[key], func(b []byte) error {
			offsets[key] += uint64(len(b))
			return sink(ln.Node, ln.Rank, b)
		})
		if err != nil {
			return fmt.Errorf("node %s: %w", ln.Node, err)
		}
	}
	return nil
}

// fetchLogs asks the agent for a lease's output and feeds the chunks to fn.
func (c *agentConn) fetchLogs(ctx context.Context, token int64, lease string, offset uint64, fn func([]byte) error) error {
	id := c.nextReq.Add(1)
	ch := make(chan *pb.LogChunk, 256)
	c.mu.Lock()
	if c.logReqs == nil {
		c.mu.Unlock()
		return fmt.Errorf("stream closed: %w", model.ErrNodeUnavailable)
	}
	c.logReqs[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.logReqs, id)
		c.mu.Unlock()
	}()
	req := &pb.ConnectResponse{FencingToken: token, Msg: &pb.ConnectResponse_FetchLogs{FetchLogs: &pb.FetchLogs{RequestId: id, LeaseId: lease, Offset: offset}}}
	if !c.enqueue(req) {
		c.cancel()
		return fmt.Errorf("agent too slow, disconnected: %w", model.ErrNodeUnavailable)
	}
	for {
		select {
		case chunk, ok := <-ch:
			if !ok {
				return fmt.Errorf("stream closed: %w", model.ErrNodeUnavailable)
			}
			if chunk.GetError() != "" {
				return fmt.Errorf("%s: %w", chunk.GetError(), model.ErrNodeUnavailable)
			}
			if len(chunk.GetData()) > 0 {
				if err := fn(chunk.GetData()); err != nil {
					return err
				}
			}
			if chunk.GetEof() {
				return nil
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// deliverLog routes a chunk to its waiting request. A slow reader cannot
// block the agent's stream: the request is failed instead.
func (c *agentConn) deliverLog(chunk *pb.LogChunk) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch, ok := c.logReqs[chunk.GetRequestId()]
	if !ok {
		return
	}
	select {
	case ch <- chunk:
	default:
		close(ch)
		delete(c.logReqs, chunk.GetRequestId())
	}
}

// failLogRequests ends every waiting request when the stream goes away.
func (c *agentConn) failLogRequests() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, ch := range c.logReqs {
		close(ch)
		delete(c.logReqs, id)
	}
	c.logReqs = nil
	for id, ch := range c.injectReqs {
		close(ch)
		delete(c.injectReqs, id)
	}
	c.injectReqs = nil
}
