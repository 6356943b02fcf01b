package engine_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
	"github.com/gpusched/gpusched/scheduler/model"
)

// memStream is an agent stream in memory: the test plays the agent.
type memStream struct {
	ctx    context.Context
	cancel context.CancelFunc
	in     chan *pb.ConnectRequest // agent → scheduler; closed: the agent hung up
	out    chan *pb.ConnectResponse
}

func newMemStream() *memStream {
	ctx, cancel := context.WithCancel(context.Background())
	return &memStream{ctx: ctx, cancel: cancel, in: make(chan *pb.ConnectRequest, 4096), out: make(chan *pb.ConnectResponse, 4096)}
}

func (s *memStream) Context() context.Context { return s.ctx }

func (s *memStream) Send(m *pb.ConnectResponse) error {
	select {
	case s.out <- m:
		return nil
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
}

func (s *memStream) Recv() (*pb.ConnectRequest, error) {
	select {
	case m, ok := <-s.in:
		if !ok {
			return nil, io.EOF
		}
		return m, nil
	case <-s.ctx.Done():
		return nil, s.ctx.Err()
	}
}

func heartbeat() *pb.ConnectRequest {
	return &pb.ConnectRequest{Msg: &pb.ConnectRequest_Heartbeat{Heartbeat: &pb.Heartbeat{}}}
}

func healthReport(healthy bool, problem string) *pb.ConnectRequest {
	h := &pb.HealthReport{Healthy: healthy}
	if problem != "" {
		h.Problems = []string{problem}
	}
	return &pb.ConnectRequest{Msg: &pb.ConnectRequest_Health{Health: h}}
}

// A loop that cannot keep up (its event channel full) must not make the
// watchdog cut an agent that keeps heartbeating: the stream's receiver
// records what arrives and does not wait for the loop. The agent's reports
// still reach the loop, in order, once it catches up; and an agent that
// falls silent is still cut.
func TestABackedUpLoopDoesNotCutAHeartbeatingAgent(t *testing.T) {
	const interval = 250 * time.Millisecond // silent for 750 ms: cut
	etcd := schedtest.StartEtcd(t)
	tm := startTerm(t, etcd.Client, engine.Config{HeartbeatInterval: interval})
	st, served := connectAgent(t, tm, "n1", "H100")

	release := tm.eng.HoldLoop(t)
	// Reports the loop cannot take now: more than one stream may queue,
	// so the receiver also waits for room a while. The last one counts.
	const reports = 300
	for i := range reports - 1 {
		st.in <- healthReport(i%2 == 1, fmt.Sprintf("problem %d", i))
	}
	st.in <- healthReport(false, "the last word")

	// Heartbeat through four silence windows with the loop held, then
	// through two more after it was let go.
	beat := time.NewTicker(interval / 10)
	defer beat.Stop()
	until := time.Now().Add(4 * heartbeatsMissed * interval)
	for released := false; ; {
		if !released && time.Now().After(until) {
			release()
			released, until = true, time.Now().Add(2*heartbeatsMissed*interval)
		} else if released && time.Now().After(until) {
			break
		}
		select {
		case err := <-served:
			t.Fatalf("the stream of a heartbeating agent ended (loop released: %v): %v", released, err)
		case <-beat.C:
			st.in <- heartbeat()
		}
	}

	schedtest.Eventually(t, "the reports to reach the loop in order", func() (bool, string) {
		n, err := tm.eng.GetNode("n1")
		if err != nil {
			return false, err.Error()
		}
		return n.State == model.NodeUnhealthy && n.Reason == "unhealthy: the last word", fmt.Sprintf("node %s %q", n.State, n.Reason)
	})

	// Silence still ends the stream.
	select {
	case err := <-served:
		if err == nil || !strings.Contains(err.Error(), "sent nothing") || !errors.Is(err, model.ErrStopped) {
			t.Fatalf("silent agent's stream ended with %v; want a silence error", err)
		}
	case <-time.After(schedtest.WaitTimeout):
		t.Fatal("the stream of a silent agent was not closed")
	}
}

const heartbeatsMissed = 3 // engine's

func waitWelcome(t *testing.T, st *memStream, served <-chan error) {
	t.Helper()
	awaitMessage(t, st, served, "the Welcome", func(m *pb.ConnectResponse) bool { return m.GetWelcome() != nil })
}

// awaitMessage reads what the scheduler sends on st until pred holds,
// failing if the stream ends or nothing matches in time.
func awaitMessage(t *testing.T, st *memStream, served <-chan error, what string, pred func(*pb.ConnectResponse) bool) {
	t.Helper()
	deadline := time.After(schedtest.WaitTimeout)
	for {
		select {
		case m := <-st.out:
			if pred(m) {
				return
			}
		case err := <-served:
			t.Fatalf("the stream ended waiting for %s: %v", what, err)
		case <-deadline:
			t.Fatalf("no %s", what)
		}
	}
}

// connectAgent serves an agent stream for node, with gpuModel GPUs, until
// the test ends, and returns it once welcomed, with what ServeAgent
// returns.
func connectAgent(t *testing.T, tm *term, node, gpuModel string) (*memStream, <-chan error) {
	t.Helper()
	st := newMemStream()
	t.Cleanup(st.cancel)
	served := make(chan error, 1)
	go func() { served <- tm.eng.ServeAgent(st) }()
	st.in <- hello(node, gpuModel)
	waitWelcome(t, st, served)
	return st, served
}

// hello is an agent's first message: node, with 8 GPUs of gpuModel.
func hello(node, gpuModel string) *pb.ConnectRequest {
	return &pb.ConnectRequest{Msg: &pb.ConnectRequest_Hello{Hello: &pb.AgentHello{
		NodeId: node, Inventory: &pb.Inventory{GpuModel: gpuModel, GpuCount: 8},
	}}}
}

// As nodes join, agents connected earlier are told the longer interval in
// a heartbeat, and the scheduler judges their silence by it from then on.
func TestAgentsConnectedEarlyLearnTheStretchedInterval(t *testing.T) {
	const (
		base    = 20 * time.Millisecond
		stretch = 150 * time.Millisecond
	)
	etcd := schedtest.StartEtcd(t)
	// 20 heartbeats/s in all: one node beats at 20ms, three at 150ms (capped).
	tm := startTerm(t, etcd.Client, engine.Config{HeartbeatInterval: base, MaxHeartbeatsPerSecond: 20, MaxHeartbeatInterval: stretch})
	connect := func(id string) (*memStream, chan error) {
		st := newMemStream()
		t.Cleanup(st.cancel)
		served := make(chan error, 1)
		go func() { served <- tm.eng.ServeAgent(st) }()
		st.in <- hello(id, "H100")
		return st, served
	}
	first, served := connect("n1")
	var welcome *pb.Welcome
	for welcome == nil {
		select {
		case m := <-first.out:
			welcome = m.GetWelcome()
		case err := <-served:
			t.Fatalf("stream ended before the Welcome: %v", err)
		case <-time.After(schedtest.WaitTimeout):
			t.Fatal("no Welcome")
		}
	}
	if got := welcome.GetHeartbeatInterval().AsDuration(); got != base {
		t.Fatalf("the first node was welcomed with %s; want %s", got, base)
	}
	for _, id := range []string{"n2", "n3"} {
		connectAgent(t, tm, id, "H100")
	}
	// n1 must hear of the stretch in a heartbeat; it beats meanwhile.
	deadline := time.After(schedtest.WaitTimeout)
	for told := false; !told; {
		select {
		case m := <-first.out:
			if d := m.GetHeartbeat().GetInterval(); d != nil {
				if got := d.AsDuration(); got != stretch {
					t.Fatalf("n1 was told %s; want %s", got, stretch)
				}
				told = true
			}
		case err := <-served:
			t.Fatalf("n1's stream ended: %v", err)
		case <-time.After(base):
			first.in <- heartbeat()
		case <-deadline:
			t.Fatal("n1 was never told the stretched interval")
		}
	}
	// Beating at the new pace (slower than 3 × the old interval) keeps it.
	for range 5 {
		select {
		case err := <-served:
			t.Fatalf("n1 beating every %s was cut: %v", stretch, err)
		case <-time.After(stretch):
			first.in <- heartbeat()
		}
	}
}

// blockedStream is an agent that keeps heartbeating but stopped reading:
// every Send blocks until the stream ends.
type blockedStream struct {
	*memStream
	sends chan *pb.ConnectResponse // unbuffered, read until blocked is closed
}

func (s *blockedStream) Send(m *pb.ConnectResponse) error {
	select {
	case s.sends <- m:
		return nil
	case <-s.ctx.Done():
		return s.ctx.Err()
	}
}

// An agent that stopped reading blocks the sender writing to it; the
// watchdog ends its stream (which interrupts the Send), and the other
// agents' commands keep flowing meanwhile, even with a pool of one sender.
func TestAnAgentThatStopsReadingIsCutAndHoldsUpNoOther(t *testing.T) {
	const interval = 100 * time.Millisecond
	etcd := schedtest.StartEtcd(t)
	tm := startTerm(t, etcd.Client, engine.Config{HeartbeatInterval: interval, Senders: 1})

	stuck := &blockedStream{memStream: newMemStream(), sends: make(chan *pb.ConnectResponse)}
	defer stuck.cancel()
	stuckServed := make(chan error, 1)
	go func() {
		err := tm.eng.ServeAgent(stuck)
		stuck.cancel() // as gRPC ends a stream whose handler returned
		stuckServed <- err
	}()
	stuck.in <- hello("stuck", "H100")
	if m := <-stuck.sends; m.GetWelcome() == nil {
		t.Fatalf("first message to the agent = %v; want the Welcome", m)
	}
	// From here on it reads nothing, but heartbeats.
	keepBeating(stuck.memStream, interval/4)

	healthy, served := connectAgent(t, tm, "healthy", "H100")
	keepBeating(healthy, interval/4)

	select {
	case err := <-stuckServed:
		if err == nil || !strings.Contains(err.Error(), "read nothing") || !errors.Is(err, model.ErrStopped) {
			t.Fatalf("the stuck agent's stream ended with %v; want a not-reading error", err)
		}
	case <-time.After(schedtest.WaitTimeout):
		t.Fatal("the stream of an agent that stopped reading was not closed")
	}
	// The one sender is free again: the healthy agent still gets its heartbeats.
	awaitMessage(t, healthy, served, "heartbeat to the healthy agent after the stuck one was cut",
		func(m *pb.ConnectResponse) bool { return m.GetHeartbeat() != nil })
}

// keepBeating sends the scheduler a heartbeat on st every period until st
// is cancelled.
func keepBeating(st *memStream, period time.Duration) {
	go func() {
		beat := time.NewTicker(period)
		defer beat.Stop()
		for {
			select {
			case <-beat.C:
				select {
				case st.in <- heartbeat():
				case <-st.ctx.Done():
					return
				}
			case <-st.ctx.Done():
				return
			}
		}
	}()
}
