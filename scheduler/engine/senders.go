package engine

import (
	"context"
	"sync"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Commands reach the agents through a small pool of sender goroutines
// rather than one goroutine per stream. A turn can hold a thousand or more
// commands; waking a thousand goroutines at once queued everything else in
// the process behind them: the submits' replies, and the etcd client's own
// goroutines carrying the next commit, whose responses then sat unread in
// the socket. With a pool, at most DefaultSenders goroutines are ever
// runnable for sending, whatever the size of the turn.
//
// Each stream keeps its own queue (so its messages stay in order, and one
// slow agent holds up no other) and is handed to the pool when the queue
// becomes non-empty; one sender at a time drains it.

// DefaultSenders is the size of the pool. Enough that an agent or two
// whose Send blocks (one that stopped reading, until its stream is ended)
// leaves the others served; few enough that sending never crowds out the
// rest of the process.
const DefaultSenders = 16

// senders is the pool's run queue: streams with messages to send, each
// listed at most once, oldest first.
type senders struct {
	mu    sync.Mutex
	ready []*agentConn
	wake  chan struct{} // one token per sender that may be idle
}

func newSenders(n int) *senders { return &senders{wake: make(chan struct{}, n)} }

// push lists c and wakes a sender, if one sleeps.
func (s *senders) push(c *agentConn) {
	s.mu.Lock()
	s.ready = append(s.ready, c)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default: // every sender is awake and will find c
	}
}

// pop returns the next stream with messages, waiting for one; nil once
// ctx ends.
func (s *senders) pop(ctx context.Context) *agentConn {
	for {
		s.mu.Lock()
		if len(s.ready) > 0 {
			c := s.ready[0]
			s.ready[0] = nil
			s.ready = s.ready[1:]
			s.mu.Unlock()
			return c
		}
		s.mu.Unlock()
		select {
		case <-s.wake:
		case <-ctx.Done():
			return nil
		}
	}
}

// run starts n senders; the returned stop ends them and waits. A sender
// blocked in Send returns once the stream ends, which closing the agents
// (the term's end) brings about.
func (s *senders) run(n int) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			for c := s.pop(ctx); c != nil; c = s.pop(ctx) {
				c.drain()
			}
		})
	}
	return func() { cancel(); wg.Wait() }
}

// sendQueue is one stream's outgoing messages.
type sendQueue struct {
	mu     sync.Mutex
	queue  []*pb.ConnectResponse
	listed bool // in the pool's run queue, or being drained
	closed bool // the handler has returned: nothing more is sent
	// sendingSince is when the Send in progress began (unix nanos; 0:
	// none). A Send that blocks means the agent stopped reading: the
	// handler ends such a stream (see stuckFor).
	sendingSince int64
}

// enqueue queues m for the agent and lists the stream with the pool. It
// reports false when sendBuffer messages wait already: the agent is too
// slow, and the caller disconnects it. Messages for a closed stream are
// dropped; the agent re-reports its state when it reconnects.
func (c *agentConn) enqueue(m *pb.ConnectResponse) bool {
	q := &c.sendQueue
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return true
	}
	if len(q.queue) >= sendBuffer {
		q.mu.Unlock()
		return false
	}
	q.queue = append(q.queue, m)
	list := !q.listed
	q.listed = true
	q.mu.Unlock()
	if list {
		c.senders.push(c)
	}
	return true
}

// drain sends the stream's queue, in order, until it is empty or the
// stream is closed. A failed Send ends the stream.
func (c *agentConn) drain() {
	q := &c.sendQueue
	for {
		q.mu.Lock()
		if q.closed || len(q.queue) == 0 {
			q.listed = false
			q.mu.Unlock()
			return
		}
		m := q.queue[0]
		q.queue[0] = nil
		q.queue = q.queue[1:]
		if len(q.queue) == 0 {
			q.queue = nil // let the backing array go; most streams idle
		}
		q.sendingSince = time.Now().UnixNano()
		q.mu.Unlock()
		err := c.stream.Send(m)
		q.mu.Lock()
		q.sendingSince = 0
		q.mu.Unlock()
		if err != nil {
			c.cancel()
			q.mu.Lock()
			q.closed, q.queue, q.listed = true, nil, false
			q.mu.Unlock()
			return
		}
	}
}

// close stops sending on the stream: the handler is returning. A Send in
// progress is not waited for; gRPC interrupts it when the handler returns.
func (c *agentConn) closeSend() {
	q := &c.sendQueue
	q.mu.Lock()
	q.closed, q.queue = true, nil
	q.mu.Unlock()
}

// stuckFor reports how long the Send in progress has been blocked (0:
// none is).
func (c *agentConn) stuckFor(now time.Time) time.Duration {
	q := &c.sendQueue
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.sendingSince == 0 {
		return 0
	}
	return now.Sub(time.Unix(0, q.sendingSince))
}
