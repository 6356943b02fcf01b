package schedtest

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// AgentConfig describes a fake agent's node and how it reacts to commands.
// The On* closures run on the agent's receive goroutine, one command at a
// time; they report progress with the Agent's methods (Started, Exit,
// Release, SendLog). Nil closures get the default behaviour.
type AgentConfig struct {
	NodeID   string
	GPUModel string // default "H100"
	GPUs     int    // default 8
	// Address is what the agent tells peers to use; default "<NodeID>:29500".
	Address string
	Labels  map[string]string
	// Heartbeat is how often the agent sends a heartbeat, as a real agent
	// does (the scheduler closes silent streams). Default 500ms; negative
	// sends none, to play a host that vanished.
	Heartbeat time.Duration
	// OnStart handles StartLease. Default: report the command started and
	// leave it running (call Exit to end it).
	OnStart func(a *Agent, m *pb.StartLease)
	// OnRelease handles ReleaseLease. Default: report the node clean.
	OnRelease func(a *Agent, m *pb.ReleaseLease)
	// OnFetchLogs handles FetchLogs. Default: an empty log (EOF at once).
	OnFetchLogs func(a *Agent, m *pb.FetchLogs)
	// OnMockInject handles MockInject and returns the error to answer
	// ("" for success). Default: success.
	OnMockInject func(a *Agent, m *pb.MockInject) string
}

// ExitAtOnce is an OnStart that reports the command started and then
// exited with code.
func ExitAtOnce(code int) func(a *Agent, m *pb.StartLease) {
	return func(a *Agent, m *pb.StartLease) {
		a.Started(m.GetLeaseId())
		a.Exit(m.GetLeaseId(), code, "")
	}
}

// KeepLeases is an OnRelease that does not release: the node stays
// CLEANING until the test calls Release.
func KeepLeases(*Agent, *pb.ReleaseLease) {}

// Command is one message the agent received, in arrival order.
type Command struct {
	Token int64
	Msg   *pb.ConnectResponse
}

// Agent is a fake node agent: a real gRPC client of AgentService.Connect.
// It reconnects whenever its stream ends, unless disconnected on purpose,
// and re-reports the leases it holds in its hello, as a real agent does.
type Agent struct {
	cfg AgentConfig

	mu         sync.Mutex
	target     string
	paused     bool
	wake       chan struct{} // closed and replaced when paused or target changes
	stream     pb.AgentService_ConnectClient
	endSession context.CancelFunc
	sessionOn  bool
	held       map[string]*pb.HeldLease // leases not yet released
	cmds       []Command
	welcomes   int
	violations []string
	sendMu     sync.Mutex // serializes stream.Send

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

// StartAgent starts a fake agent connecting to the scheduler at target.
// It stops when the test ends.
func StartAgent(t testing.TB, target string, cfg AgentConfig) *Agent {
	t.Helper()
	if cfg.NodeID == "" {
		t.Fatal("schedtest: AgentConfig.NodeID is required")
	}
	if cfg.GPUModel == "" {
		cfg.GPUModel = "H100"
	}
	if cfg.GPUs == 0 {
		cfg.GPUs = 8
	}
	if cfg.Heartbeat == 0 {
		cfg.Heartbeat = 500 * time.Millisecond
	}
	if cfg.Address == "" {
		cfg.Address = cfg.NodeID + ":29500"
	}
	a := &Agent{cfg: cfg, target: target, wake: make(chan struct{}), held: map[string]*pb.HeldLease{}, done: make(chan struct{})}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	go a.run()
	t.Cleanup(a.Stop)
	return a
}

// NodeID is the agent's node.
func (a *Agent) NodeID() string { return a.cfg.NodeID }

// Stop ends the agent for good and waits for its goroutines.
func (a *Agent) Stop() {
	a.cancel()
	<-a.done
}

// Disconnect closes the agent's stream and keeps it from reconnecting
// until Reconnect. It returns once the stream is closed.
func (a *Agent) Disconnect() {
	a.mu.Lock()
	a.paused = true
	a.wakeLocked()
	if a.endSession != nil {
		a.endSession()
	}
	a.mu.Unlock()
	for {
		a.mu.Lock()
		on := a.sessionOn
		a.mu.Unlock()
		if !on {
			return
		}
		select {
		case <-a.done:
			return
		case <-time.After(time.Millisecond):
		}
	}
}

// Reconnect lets a disconnected agent connect again, to target if it is
// not empty (e.g. a restarted scheduler's new address).
func (a *Agent) Reconnect(target string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if target != "" {
		a.target = target
	}
	a.paused = false
	a.wakeLocked()
}

func (a *Agent) wakeLocked() {
	close(a.wake)
	a.wake = make(chan struct{})
}

// run connects, serves the stream, and reconnects until stopped.
func (a *Agent) run() {
	defer close(a.done)
	for a.ctx.Err() == nil {
		a.mu.Lock()
		paused, target, wake := a.paused, a.target, a.wake
		a.mu.Unlock()
		if !paused {
			a.session(target)
			wake = a.currentWake()
			// Do not spin on a scheduler that is down or not leading.
			select {
			case <-time.After(20 * time.Millisecond):
			case <-wake:
			case <-a.ctx.Done():
			}
			continue
		}
		select {
		case <-wake:
		case <-a.ctx.Done():
		}
	}
}

func (a *Agent) currentWake() chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.wake
}

// session runs one stream until it fails or is ended.
func (a *Agent) session(target string) {
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(a.ctx)
	defer cancel()
	stream, err := pb.NewAgentServiceClient(conn).Connect(ctx)
	if err != nil {
		return
	}
	a.mu.Lock()
	if a.paused {
		a.mu.Unlock()
		return
	}
	hello := a.helloLocked()
	a.stream, a.endSession, a.sessionOn = stream, cancel, true
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.stream, a.endSession, a.sessionOn = nil, nil, false
		a.mu.Unlock()
	}()
	if err := a.sendOn(stream, hello); err != nil {
		return
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	if a.cfg.Heartbeat > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(a.cfg.Heartbeat)
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
					_ = a.sendOn(stream, &pb.ConnectRequest{Msg: &pb.ConnectRequest_Heartbeat{Heartbeat: &pb.Heartbeat{}}})
				}
			}
		}()
	}
	for {
		cmd, err := stream.Recv()
		if err != nil {
			return
		}
		a.handle(cmd)
	}
}

func (a *Agent) helloLocked() *pb.ConnectRequest {
	inv := &pb.Inventory{
		GpuModel: a.cfg.GPUModel, GpuCount: int32(a.cfg.GPUs), GpuMemoryBytes: 80 << 30,
		DriverVersion: "550.54.15", CudaVersion: "12.4", Hostname: a.cfg.NodeID,
	}
	for i := 0; i < a.cfg.GPUs; i++ {
		inv.Gpus = append(inv.Gpus, &pb.Gpu{
			Index: int32(i), Uuid: fmt.Sprintf("GPU-%s-%d", a.cfg.NodeID, i),
			Name: "NVIDIA " + a.cfg.GPUModel, MemoryBytes: 80 << 30,
		})
	}
	h := &pb.AgentHello{NodeId: a.cfg.NodeID, Inventory: inv, Labels: a.cfg.Labels, Address: a.cfg.Address}
	for _, id := range a.heldIDsLocked() {
		h.Leases = append(h.Leases, cloneHeld(a.held[id]))
	}
	return &pb.ConnectRequest{Msg: &pb.ConnectRequest_Hello{Hello: h}}
}

func cloneHeld(h *pb.HeldLease) *pb.HeldLease {
	c := &pb.HeldLease{LeaseId: h.GetLeaseId(), Started: h.GetStarted(), Exited: h.GetExited()}
	if x := h.GetExit(); x != nil {
		c.Exit = &pb.LeaseExited{LeaseId: x.GetLeaseId(), ExitCode: x.GetExitCode(), Signal: x.GetSignal(), Message: x.GetMessage()}
	}
	return c
}

func (a *Agent) heldIDsLocked() []string {
	ids := make([]string, 0, len(a.held))
	for id := range a.held {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// handle records a command and runs the behaviour for it.
func (a *Agent) handle(cmd *pb.ConnectResponse) {
	a.mu.Lock()
	a.cmds = append(a.cmds, Command{Token: cmd.GetFencingToken(), Msg: cmd})
	switch m := cmd.GetMsg().(type) {
	case *pb.ConnectResponse_Welcome:
		a.welcomes++
	case *pb.ConnectResponse_StartLease:
		if len(a.held) > 0 {
			a.violations = append(a.violations, fmt.Sprintf("StartLease %s while still holding %v",
				m.StartLease.GetLeaseId(), a.heldIDsLocked()))
		}
		a.held[m.StartLease.GetLeaseId()] = &pb.HeldLease{LeaseId: m.StartLease.GetLeaseId()}
	}
	a.mu.Unlock()

	switch m := cmd.GetMsg().(type) {
	case *pb.ConnectResponse_StartLease:
		if a.cfg.OnStart != nil {
			a.cfg.OnStart(a, m.StartLease)
		} else {
			a.Started(m.StartLease.GetLeaseId())
		}
	case *pb.ConnectResponse_ReleaseLease:
		if a.cfg.OnRelease != nil {
			a.cfg.OnRelease(a, m.ReleaseLease)
		} else {
			a.Release(m.ReleaseLease.GetLeaseId(), true, "")
		}
	case *pb.ConnectResponse_MockInject:
		answer := ""
		if a.cfg.OnMockInject != nil {
			answer = a.cfg.OnMockInject(a, m.MockInject)
		}
		_ = a.send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_MockInjectResult{MockInjectResult: &pb.MockInjectResult{
			RequestId: m.MockInject.GetRequestId(), Error: answer,
		}}})
	case *pb.ConnectResponse_FetchLogs:
		if a.cfg.OnFetchLogs != nil {
			a.cfg.OnFetchLogs(a, m.FetchLogs)
		} else {
			a.SendLog(m.FetchLogs.GetRequestId(), nil, true)
		}
	}
}

// send delivers msg on the current stream, if any. A message that cannot
// be sent is not lost for lease progress: the hello of the next stream
// re-reports every held lease.
func (a *Agent) send(msg *pb.ConnectRequest) error {
	a.mu.Lock()
	s := a.stream
	a.mu.Unlock()
	if s == nil {
		return fmt.Errorf("schedtest: agent %s is not connected", a.cfg.NodeID)
	}
	return a.sendOn(s, msg)
}

func (a *Agent) sendOn(s pb.AgentService_ConnectClient, msg *pb.ConnectRequest) error {
	a.sendMu.Lock()
	defer a.sendMu.Unlock()
	return s.Send(msg)
}

// Started reports that the lease's command is running on this node.
func (a *Agent) Started(lease string) {
	a.mu.Lock()
	if h := a.held[lease]; h != nil {
		h.Started = true
	}
	a.mu.Unlock()
	_ = a.send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseStarted{LeaseStarted: &pb.LeaseStarted{LeaseId: lease, Pid: 4242}}})
}

// Exit reports that the lease's command ended with code.
func (a *Agent) Exit(lease string, code int, message string) {
	x := &pb.LeaseExited{LeaseId: lease, ExitCode: int32(code), Message: message}
	a.mu.Lock()
	if h := a.held[lease]; h != nil {
		h.Exited, h.Exit = true, x
	}
	a.mu.Unlock()
	_ = a.send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseExited{LeaseExited: x}})
}

// Release reports the node cleaned up after the lease and forgets it.
func (a *Agent) Release(lease string, clean bool, message string) {
	a.mu.Lock()
	delete(a.held, lease)
	a.mu.Unlock()
	_ = a.send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseReleased{LeaseReleased: &pb.LeaseReleased{
		LeaseId: lease, Clean: clean, Message: message,
	}}})
}

// Send sends any message on the current stream (events, health,
// telemetry), failing the test's expectations silently if disconnected.
func (a *Agent) Send(msg *pb.ConnectRequest) error { return a.send(msg) }

// SendLog answers a FetchLogs request with one chunk.
func (a *Agent) SendLog(requestID uint64, data []byte, eof bool) {
	_ = a.send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_LogChunk{LogChunk: &pb.LogChunk{
		RequestId: requestID, Data: data, Eof: eof,
	}}})
}

// Hold makes the agent hold a lease (as if it had run it before), so its
// next hello reports it.
func (a *Agent) Hold(h *pb.HeldLease) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.held[h.GetLeaseId()] = cloneHeld(h)
}

// Forget drops a lease without telling the scheduler, as an agent that
// lost its state (or whose LeaseReleased was lost with its stream) would.
func (a *Agent) Forget(lease string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.held, lease)
}

// Held returns the IDs of the leases the agent holds, sorted.
func (a *Agent) Held() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.heldIDsLocked()
}

// Commands returns every command received so far, in order.
func (a *Agent) Commands() []Command {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]Command(nil), a.cmds...)
}

// Starts returns the StartLease commands received, in order.
func (a *Agent) Starts() []*pb.StartLease {
	var out []*pb.StartLease
	for _, c := range a.Commands() {
		if m := c.Msg.GetStartLease(); m != nil {
			out = append(out, m)
		}
	}
	return out
}

// Releases returns the ReleaseLease commands received, in order.
func (a *Agent) Releases() []*pb.ReleaseLease {
	var out []*pb.ReleaseLease
	for _, c := range a.Commands() {
		if m := c.Msg.GetReleaseLease(); m != nil {
			out = append(out, m)
		}
	}
	return out
}

// Violations lists every StartLease that arrived while the agent still
// held an unreleased lease: a node given to two leases at once.
func (a *Agent) Violations() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.violations...)
}

// Welcomes counts the Welcome messages received (one per registration).
func (a *Agent) Welcomes() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.welcomes
}

// WaitWelcomed waits until the agent has been welcomed n times in all.
func (a *Agent) WaitWelcomed(t testing.TB, n int) {
	t.Helper()
	Eventually(t, fmt.Sprintf("agent %s to be welcomed %d times", a.cfg.NodeID, n), func() (bool, string) {
		got := a.Welcomes()
		return got >= n, fmt.Sprintf("%d welcomes", got)
	})
}

// WaitStart waits for the StartLease of job and returns it.
func (a *Agent) WaitStart(t testing.TB, job string) *pb.StartLease {
	t.Helper()
	var found *pb.StartLease
	Eventually(t, fmt.Sprintf("StartLease of job %s on %s", job, a.cfg.NodeID), func() (bool, string) {
		for _, s := range a.Starts() {
			if s.GetJobId() == job {
				found = s
				return true, ""
			}
		}
		return false, a.describe()
	})
	return found
}

// WaitRelease waits for a ReleaseLease of lease and returns it.
func (a *Agent) WaitRelease(t testing.TB, lease string) *pb.ReleaseLease {
	t.Helper()
	var found *pb.ReleaseLease
	Eventually(t, fmt.Sprintf("ReleaseLease of %s on %s", lease, a.cfg.NodeID), func() (bool, string) {
		for _, r := range a.Releases() {
			if r.GetLeaseId() == lease {
				found = r
				return true, ""
			}
		}
		return false, a.describe()
	})
	return found
}

// TokenOf returns the fencing token of the first command matching pick.
func (a *Agent) TokenOf(pick func(*pb.ConnectResponse) bool) (int64, bool) {
	for _, c := range a.Commands() {
		if pick(c.Msg) {
			return c.Token, true
		}
	}
	return 0, false
}

func (a *Agent) describe() string {
	var parts []string
	for _, c := range a.Commands() {
		switch m := c.Msg.GetMsg().(type) {
		case *pb.ConnectResponse_Welcome:
			parts = append(parts, fmt.Sprintf("welcome@%d", c.Token))
		case *pb.ConnectResponse_StartLease:
			parts = append(parts, fmt.Sprintf("start(%s)@%d", m.StartLease.GetLeaseId(), c.Token))
		case *pb.ConnectResponse_ReleaseLease:
			parts = append(parts, fmt.Sprintf("release(%s)@%d", m.ReleaseLease.GetLeaseId(), c.Token))
		case *pb.ConnectResponse_FetchLogs:
			parts = append(parts, fmt.Sprintf("logs(%s)@%d", m.FetchLogs.GetLeaseId(), c.Token))
		}
	}
	return fmt.Sprintf("%s received [%s]", a.cfg.NodeID, strings.Join(parts, " "))
}
