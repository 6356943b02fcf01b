package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
	"github.com/gpusched/gpusched/scheduler/wire"
)

// AgentStream is the server side of AgentService.Connect.
type AgentStream interface {
	Context() context.Context
	Send(*pb.ConnectResponse) error
	Recv() (*pb.ConnectRequest, error)
}

// sendBuffer bounds commands queued for one agent. An agent that falls this
// far behind is disconnected rather than allowed to hold memory. A node
// holds one lease at a time and gets a few commands per lease, so this is
// generous; it is small because every slot of every agent's buffer is a
// pointer the GC scans each cycle (1,024 slots cost 80 MB at 10,000 nodes).
const sendBuffer = 128

// agentConn is one agent's live stream.
type agentConn struct {
	node   string
	cancel context.CancelFunc
	ctx    context.Context
	// stream is written only by the pool's senders (senders.go), from
	// sendQueue.
	stream    AgentStream
	senders   *senders
	sendQueue sendQueue

	nextReq atomic.Uint64
	mu      sync.Mutex
	logReqs map[uint64]chan *pb.LogChunk
	// injectReqs wait for MockInjectResult answers.
	injectReqs map[uint64]chan *pb.MockInjectResult
}

// ErrAgentInvalid: the agent broke the protocol (e.g. no hello first).
var ErrAgentInvalid = errors.New("engine: invalid agent message")

// ServeAgent runs one agent stream until it ends or the term ends.
func (e *Engine) ServeAgent(stream AgentStream) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	hello := first.GetHello()
	if hello == nil {
		return fmt.Errorf("%w: first message must be hello", ErrAgentInvalid)
	}
	if err := model.ValidateID("hello.node_id", hello.GetNodeId()); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	c := &agentConn{
		node: hello.GetNodeId(), cancel: cancel, ctx: ctx, stream: stream, senders: e.senders,
		logReqs: map[uint64]chan *pb.LogChunk{}, injectReqs: map[uint64]chan *pb.MockInjectResult{},
	}
	defer c.closeSend() // no Send may start once the handler has returned
	// The stream starts at the interval the cluster's size calls for now;
	// as the cluster grows, the handler stretches it and tells the agent
	// in a heartbeat, and judges the agent's silence by it.
	every := e.heartbeatInterval()
	if err := e.post(ctx, &helloEvent{conn: c, hello: hello, interval: every}); err != nil {
		return err
	}
	defer func() {
		// Tell the loop, unless the term is over anyway.
		_ = e.post(context.Background(), &goneEvent{conn: c})
		c.failLogRequests()
	}()

	// Recv cannot be interrupted, so it runs on its own goroutine and the
	// handler returns as soon as ctx ends (term over, stream replaced by a
	// reconnect, agent too slow): returning is what closes the stream, so
	// the agent notices and reconnects to whoever leads now. The receiver
	// then ends too, since Recv fails once the handler has returned.
	//
	// The receiver records each message's arrival before anything else,
	// and does not wait for the loop: messages for the loop go through
	// the stream's inbox, which queues them while the loop's channel is
	// full. So the watchdog judges the agent by what it sent, not by how
	// fast the loop drains (a backed-up loop once cut live agents as
	// silent: the receiver sat in post and read no heartbeats).
	recvErr := make(chan error, 1)
	var lastRecv atomic.Int64 // unix nanos of the last message
	lastRecv.Store(time.Now().UnixNano())
	var deaf atomic.Bool // the receiver waits for room in a full inbox
	in := &inbox{e: e, ctx: ctx, cancel: cancel, space: make(chan struct{}, 1)}
	go func() {
		var tenantOf, tenant string // the last telemetry lease and its tenant
		for {
			msg, err := stream.Recv()
			if err != nil {
				// What the agent sent before it hung up still reaches the
				// loop, as when the receiver posted each message itself.
				deaf.Store(true)
				in.flush()
				recvErr <- err
				return
			}
			lastRecv.Store(time.Now().UnixNano())
			if chunk := msg.GetLogChunk(); chunk != nil {
				c.deliverLog(chunk)
				continue
			}
			// Telemetry is high-rate and changes no state: it bypasses the
			// loop and goes straight to the telemetry hub, stamped with the
			// tenant of its lease (looked up once per lease change).
			if b := msg.GetTelemetry(); b != nil {
				if e.cfg.Telemetry != nil {
					if b.GetLeaseId() != tenantOf {
						tenantOf, tenant = b.GetLeaseId(), e.leaseTenant(b.GetLeaseId())
					}
					e.cfg.Telemetry(c.node, tenant, b)
				}
				continue
			}
			if r := msg.GetMockInjectResult(); r != nil {
				c.deliverInject(r)
				continue
			}
			if msg.GetHeartbeat() != nil {
				continue
			}
			if ctx.Err() != nil {
				recvErr <- ctx.Err()
				return
			}
			for !in.put(&agentEvent{conn: c, msg: msg}) {
				// agentBacklog messages wait for the loop already: stop
				// reading until one is taken. Unread, the agent cannot be
				// judged, so the watchdog waits too, and the silence
				// counts again from when the receiver reads again.
				deaf.Store(true)
				select {
				case <-in.space:
				case <-ctx.Done():
				}
				lastRecv.Store(time.Now().UnixNano())
				deaf.Store(false)
				if ctx.Err() != nil {
					recvErr <- ctx.Err()
					return
				}
			}
		}
	}()
	// The handler paces the stream: a stream costs two goroutines, this
	// one and the receiver, and the pool's senders send (senders.go). One
	// ticker paces both the heartbeats to the agent and the watchdog: a
	// host that vanished without closing its TCP connection sends
	// nothing, and missing heartbeats end the stream so the node can be
	// LOST. An agent that stopped reading blocks its Send; the stream is
	// ended too, which interrupts the Send.
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case err := <-recvErr:
			return err
		case <-ctx.Done():
			if stream.Context().Err() != nil {
				return stream.Context().Err()
			}
			return fmt.Errorf("agent stream of node %s closed by the scheduler: %w", c.node, model.ErrStopped)
		case now := <-tick.C:
			hb := &pb.Heartbeat{}
			if d := e.heartbeatInterval(); d != every {
				// The cluster grew since the Welcome: tell the agent, and
				// beat (and judge its silence) at the new pace. A stretch
				// is only ever more lenient than what the agent may still
				// be using.
				every, hb.Interval = d, durationpb.New(d)
				tick.Reset(d)
			}
			if quiet := now.Sub(time.Unix(0, lastRecv.Load())); !deaf.Load() && quiet > heartbeatsMissed*every {
				e.log.Warn("agent silent, closing its stream", zap.String("node", c.node), zap.Duration("silent_for", quiet))
				return fmt.Errorf("node %s sent nothing for %s: %w", c.node, quiet.Round(time.Millisecond), model.ErrStopped)
			}
			if stuck := c.stuckFor(now); stuck > heartbeatsMissed*every {
				e.log.Warn("agent not reading, closing its stream", zap.String("node", c.node), zap.Duration("send_blocked_for", stuck))
				return fmt.Errorf("node %s read nothing for %s: %w", c.node, stuck.Round(time.Millisecond), model.ErrStopped)
			}
			if !c.enqueue(&pb.ConnectResponse{FencingToken: e.Token(), Msg: &pb.ConnectResponse_Heartbeat{Heartbeat: hb}}) {
				return fmt.Errorf("node %s has %d commands unsent: %w", c.node, sendBuffer, model.ErrStopped)
			}
		}
	}
}

// heartbeatsMissed is how many heartbeat intervals of silence end a stream.
const heartbeatsMissed = 3

// agentBacklog bounds the messages one agent stream holds for the loop
// while the loop's event channel is full. An agent sends a few per lease
// (started, exited, released, events, health), so this is never reached
// by one that follows the protocol.
const agentBacklog = 256

// inbox hands one agent stream's messages to the loop, in order, without
// making the stream's receiver wait for the loop: a message is posted at
// once while the loop's channel has room; otherwise it is queued, and a
// drainer goroutine (one per stream, only while the loop is behind) posts
// the queue.
type inbox struct {
	e      *Engine
	ctx    context.Context    // the stream's
	cancel context.CancelFunc // ends the stream when a post fails (term over)
	space  chan struct{}      // 1-buffered: the drainer posted one

	mu       sync.Mutex
	queued   []event
	draining bool // a drainer runs; new messages queue behind it
}

// put posts ev or queues it, without blocking. False: the queue is full;
// wait on space and try again.
func (q *inbox) put(ev event) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.draining {
		select {
		case q.e.events <- ev:
			return true
		default:
		}
	}
	if len(q.queued) >= agentBacklog {
		return false
	}
	q.queued = append(q.queued, ev)
	if !q.draining {
		q.draining = true
		go q.drain()
	}
	return true
}

// drain posts the queue until it is empty, or until a post fails: then
// the stream ends, and nothing more is posted.
func (q *inbox) drain() {
	for {
		q.mu.Lock()
		if len(q.queued) == 0 {
			q.draining, q.queued = false, nil
			q.mu.Unlock()
			q.signal()
			return
		}
		ev := q.queued[0] // stays queued until posted, so put queues behind it
		q.mu.Unlock()
		if err := q.e.post(q.ctx, ev); err != nil {
			q.cancel()
			return
		}
		q.mu.Lock()
		q.queued[0] = nil
		q.queued = q.queued[1:]
		q.mu.Unlock()
		q.signal()
	}
}

// signal wakes a receiver waiting for room (put) or for the drain (flush).
func (q *inbox) signal() {
	select {
	case q.space <- struct{}{}:
	default:
	}
}

// flush waits until everything queued was posted, or the stream ended.
func (q *inbox) flush() {
	for {
		q.mu.Lock()
		draining := q.draining
		q.mu.Unlock()
		if !draining {
			return
		}
		select {
		case <-q.space:
		case <-q.ctx.Done():
			return
		}
	}
}

// send delivers a queued command to its node's agent, if connected.
func (e *Engine) send(m outMsg) {
	e.mu.RLock()
	n := e.nodes[m.node]
	var c *agentConn
	if n != nil {
		c = n.conn
	}
	e.mu.RUnlock()
	if c == nil {
		return // the agent re-reports its leases when it reconnects
	}
	if !c.enqueue(m.msg) {
		e.log.Warn("agent too slow, disconnecting", zap.String("node", m.node))
		c.cancel()
	}
}

// closeAgents ends every stream when the term ends, so agents reconnect to
// whichever replica leads next.
func (e *Engine) closeAgents() {
	e.mu.RLock()
	defer e.mu.RUnlock()
	for _, n := range e.nodes {
		if n.conn != nil {
			n.conn.cancel()
		}
	}
}

type helloEvent struct {
	conn  *agentConn
	hello *pb.AgentHello
	// interval is the heartbeat interval the stream uses and the Welcome
	// tells the agent.
	interval time.Duration
}

func (ev *helloEvent) apply(e *Engine) {
	h, now := ev.hello, e.cfg.Now()
	inv := wire.InventoryFromProto(h.GetInventory())
	n, known := e.nodes[h.GetNodeId()]
	if !known {
		n = &nodeEntry{node: &model.Node{ID: h.GetNodeId(), State: model.NodeReady}}
		e.nodes[n.node.ID] = n
		e.nodeCount.Store(int64(len(e.nodes)))
	}
	if old := n.conn; old != nil && old != ev.conn {
		old.cancel() // a reconnect replaces a stream we have not seen die yet
	}
	n.conn, n.lost = ev.conn, false
	delete(e.offline, n)
	changed := !known || n.node.Address != h.GetAddress() || !sameInventory(n.node.Inventory, inv) ||
		!sameLabels(n.node.Labels, h.GetLabels())
	if changed {
		n.node.Inventory, n.node.Address, n.node.Labels = inv, h.GetAddress(), h.GetLabels()
		n.placement, e.nodesChanged = nil, true
		n.node.RegisterTime = now
		e.persist(store.Change{Node: n.node})
	}
	e.command(n.node.ID, &pb.ConnectResponse{Msg: &pb.ConnectResponse_Welcome{Welcome: &pb.Welcome{
		HeartbeatInterval: durationpb.New(ev.interval),
	}}})
	e.log.Info("agent connected", zap.String("node", n.node.ID), zap.String("gpu_model", inv.GPUModel),
		zap.Int("gpus", inv.GPUCount), zap.Int("held_leases", len(h.GetLeases())))

	// Reconcile what the agent holds with what etcd says.
	held := map[string]bool{}
	for _, ls := range h.GetLeases() {
		held[ls.GetLeaseId()] = true
		le := e.leases[ls.GetLeaseId()]
		if le == nil || !le.lease.Active || le.rank(n.node.ID) < 0 {
			// Ended (or unknown) lease still on the node: stop and clean it.
			n.cleaning = ls.GetLeaseId()
			e.release(n.node.ID, ls.GetLeaseId(), "lease is no longer active")
			continue
		}
		if ls.GetStarted() {
			e.leaseStarted(le, n.node.ID)
		}
		if ls.GetExited() {
			e.nodeExited(le, exitFrom(n.node.ID, le, ls.GetExit(), now))
		}
	}
	if n.cleaning != "" && !held[n.cleaning] {
		// The agent no longer holds the lease we wait on: it released it
		// while disconnected (its LeaseReleased went down with the old
		// stream) or never got it. Nothing is left to clean.
		n.cleaning = ""
	}
	if n.lease != "" && !held[n.lease] {
		le := e.leases[n.lease]
		if !le.has(n.node.ID, progressStarted) {
			// StartLease went down with the old stream (or was sent by a
			// previous term): the command never started, so start it now.
			// An agent that ran it would hold the lease until released.
			e.startOn(le, n.node.ID, nil)
		} else {
			// The agent ran our lease and lost it (its state is gone): the
			// node failed the job, the job did not fail.
			e.nodeFailed(e.jobs[le.lease.JobID], fmt.Sprintf("agent of node %s restarted and lost the lease", n.node.ID))
		}
	}
	e.needCycle = true
}

// release tells a node to stop and clean up a lease.
func (e *Engine) release(node, lease, reason string) {
	e.command(node, &pb.ConnectResponse{Msg: &pb.ConnectResponse_ReleaseLease{ReleaseLease: &pb.ReleaseLease{
		LeaseId: lease, Grace: durationpb.New(e.cfg.KillGrace), Reason: reason,
	}}})
}

func exitFrom(node string, le *leaseEntry, x *pb.LeaseExited, now time.Time) model.NodeExit {
	return model.NodeExit{
		Node: node, Rank: le.rank(node), ExitCode: int(x.GetExitCode()),
		Signal: x.GetSignal(), Message: x.GetMessage(), Time: now,
	}
}

// leaseStarted marks a node's command as running; the job is RUNNING once
// every node has started.
func (e *Engine) leaseStarted(le *leaseEntry, node string) {
	if !le.lease.Active || !le.mark(node, progressStarted) {
		return
	}
	le.started++
	j := e.jobs[le.lease.JobID]
	if le.started == len(le.lease.Nodes) && j.State == model.JobScheduled {
		j.StartTime = e.cfg.Now()
		j.SetState(model.JobRunning, "", j.StartTime)
		e.persist(store.Change{Job: j})
	}
}

type agentEvent struct {
	conn *agentConn
	msg  *pb.ConnectRequest
}

func (ev *agentEvent) apply(e *Engine) {
	n := e.nodes[ev.conn.node]
	if n == nil || n.conn != ev.conn {
		return // a message from a stream that was replaced
	}
	switch m := ev.msg.GetMsg().(type) {
	case *pb.ConnectRequest_LeaseStarted:
		if le := e.leaseOn(n, m.LeaseStarted.GetLeaseId()); le != nil {
			e.leaseStarted(le, n.node.ID)
		}
	case *pb.ConnectRequest_LeaseExited:
		if le := e.leaseOn(n, m.LeaseExited.GetLeaseId()); le != nil {
			e.nodeExited(le, exitFrom(n.node.ID, le, m.LeaseExited, e.cfg.Now()))
		}
	case *pb.ConnectRequest_LeaseReleased:
		r := m.LeaseReleased
		if n.cleaning == r.GetLeaseId() {
			n.cleaning = ""
		}
		if le := e.leases[r.GetLeaseId()]; le != nil {
			for i := range le.lease.Nodes {
				if ln := &le.lease.Nodes[i]; ln.Node == n.node.ID && ln.Cleanup == "" {
					ln.Cleanup = "clean"
					if !r.GetClean() {
						ln.Cleanup = r.GetMessage()
					}
					e.persist(store.Change{Lease: le.lease})
					e.endedLeases = append(e.endedLeases, le)
				}
			}
		}
		if !r.GetClean() {
			n.node.State, n.node.Reason = model.NodeUnhealthy, "cleanup after lease "+r.GetLeaseId()+" failed: "+r.GetMessage()
			e.persist(store.Change{Node: n.node})
			e.log.Warn("node unhealthy after cleanup", zap.String("node", n.node.ID), zap.String("lease_id", r.GetLeaseId()), zap.String("reason", r.GetMessage()))
		}
		e.needCycle = true
	case *pb.ConnectRequest_NodeEvent:
		ev := wire.EventFromProto(m.NodeEvent)
		e.nodeEvent(n, ev)
		e.countLeaseEvent(n, ev)
	case *pb.ConnectRequest_Health:
		e.health(n, m.Health.GetHealthy(), m.Health.GetProblems())
	}
}

// leaseOn returns the active lease id if it includes node n.
func (e *Engine) leaseOn(n *nodeEntry, id string) *leaseEntry {
	le := e.leases[id]
	if le == nil || !le.lease.Active || le.rank(n.node.ID) < 0 {
		return nil
	}
	return le
}

type goneEvent struct{ conn *agentConn }

func (ev *goneEvent) apply(e *Engine) {
	n := e.nodes[ev.conn.node]
	if n == nil || n.conn != ev.conn {
		return
	}
	n.conn, n.disconnectedAt = nil, e.cfg.Now()
	e.offline[n] = struct{}{}
	e.log.Info("agent disconnected", zap.String("node", n.node.ID))
}

func sameInventory(a, b model.Inventory) bool {
	if a.GPUModel != b.GPUModel || a.GPUCount != b.GPUCount || a.GPUMemoryBytes != b.GPUMemoryBytes ||
		a.DriverVersion != b.DriverVersion || a.CUDAVersion != b.CUDAVersion || a.Hostname != b.Hostname ||
		len(a.GPUs) != len(b.GPUs) {
		return false
	}
	for i := range a.GPUs {
		if a.GPUs[i] != b.GPUs[i] {
			return false
		}
	}
	return true
}

func sameLabels(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
