package sim

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// leaderTrailer is where a follower names the leader when it refuses an
// agent stream (api.LeaderTrailer; not imported, to keep the scheduler
// out of the agents' dependencies).
const leaderTrailer = "gpusched-leader"

// Observer sees every StartLease a hollow agent accepts, as it arrives.
type Observer interface {
	StartLease(node string, m *pb.StartLease, at time.Time)
}

// FleetConfig configures a fleet of hollow agents.
type FleetConfig struct {
	// Targets are the scheduler replicas' addresses; agents follow a
	// follower's leader hint and otherwise try them in turn.
	Targets []string
	// Nodes is the number of hollow agents, named <NamePrefix><i>.
	Nodes      int
	NamePrefix string // default "sim-"
	// GPUModel and GPUs describe every node; default 8 × "H100", 80 GiB each.
	GPUModel       string
	GPUs           int
	GPUMemoryBytes uint64
	// NodesPerRack: node i has the label rack=r<i/NodesPerRack>; default 32.
	NodesPerRack int
	// AgentsPerConn hollow agents share one grpc.ClientConn (each has its own
	// stream); default 100.
	AgentsPerConn int
	// TelemetryHz is how often each agent sends a TelemetryBatch of its
	// GPUs; 0 sends none.
	TelemetryHz float64
	// Observer, if set, sees every StartLease.
	Observer Observer
}

// Fleet is many hollow agents in one process: each speaks the real
// AgentService protocol over its own gRPC stream, holds leases and reports
// their progress like a real agent, but runs nothing. A job "runs" for the
// duration in its environment (EnvDuration) or its `sleep N` command.
type Fleet struct {
	cfg    FleetConfig
	conns  [][]*grpc.ClientConn // [target][shard]
	agents []*hollow
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	welcomes  atomic.Int64 // Welcome messages received, in all
	connected atomic.Int64 // agents in a welcomed session now
	starts    atomic.Int64
	exits     atomic.Int64
	releases  atomic.Int64 // leases held and released
	// unknownReleases: ReleaseLease of a lease the agent did not hold
	// (answered clean, as the real agent does).
	unknownReleases atomic.Int64
	refused         atomic.Int64 // commands with a stale fencing token
	sessions        atomic.Int64 // streams opened (refused ones included)
	telemetrySent   atomic.Int64 // TelemetryBatch messages sent
	violations      atomic.Int64
	violMu          sync.Mutex
	violList        []string // the first few, for the report

	holdMu sync.Mutex
	resume chan struct{} // non-nil while held: closed by Release
}

// hollow is one simulated node.
type hollow struct {
	f      *Fleet
	id     string
	shard  int
	labels map[string]string
	rng    *rand.Rand // only under mu

	mu       sync.Mutex
	target   int
	stream   pb.AgentService_ConnectClient
	gen      uint64 // increments per stream; timers of older sessions stop
	endSess  context.CancelFunc
	held     []*heldLease
	maxToken int64
	interval time.Duration
	lastRecv time.Time
	hb, tel  *time.Timer
	welcomed bool

	sendMu sync.Mutex
}

type heldLease struct {
	id, job string
	exited  bool
	exit    *pb.LeaseExited
	timer   *time.Timer
}

// StartFleet starts cfg.Nodes hollow agents; they connect in the
// background. Stop ends them all.
func StartFleet(cfg FleetConfig) (*Fleet, error) {
	if len(cfg.Targets) == 0 {
		return nil, fmt.Errorf("sim: fleet needs a scheduler address")
	}
	if cfg.NamePrefix == "" {
		cfg.NamePrefix = "sim-"
	}
	if cfg.GPUModel == "" {
		cfg.GPUModel = "H100"
	}
	if cfg.GPUs <= 0 {
		cfg.GPUs = 8
	}
	if cfg.GPUMemoryBytes == 0 {
		cfg.GPUMemoryBytes = 80 << 30
	}
	if cfg.NodesPerRack <= 0 {
		cfg.NodesPerRack = 32
	}
	if cfg.AgentsPerConn <= 0 {
		cfg.AgentsPerConn = 100
	}
	f := &Fleet{cfg: cfg}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	shards := (cfg.Nodes + cfg.AgentsPerConn - 1) / cfg.AgentsPerConn
	for _, t := range cfg.Targets {
		var cs []*grpc.ClientConn
		for range shards {
			// A scheduler restart (the cold-start phase) must not leave
			// thousands of agents in gRPC's default backoff of up to 2 min.
			conn, err := grpc.NewClient(t, grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
					BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second,
				}, MinConnectTimeout: 5 * time.Second}))
			if err != nil {
				f.closeConns()
				f.cancel()
				return nil, fmt.Errorf("sim: dial %s: %w", t, err)
			}
			cs = append(cs, conn)
		}
		f.conns = append(f.conns, cs)
	}
	for i := range cfg.Nodes {
		h := &hollow{
			f: f, id: fmt.Sprintf("%s%d", cfg.NamePrefix, i), shard: i / cfg.AgentsPerConn,
			labels: map[string]string{"rack": fmt.Sprintf("r%d", i/cfg.NodesPerRack)},
			rng:    rand.New(rand.NewPCG(uint64(i), 0x5eed)),
		}
		f.agents = append(f.agents, h)
	}
	for _, h := range f.agents {
		f.wg.Add(1)
		go h.run()
	}
	return f, nil
}

func (f *Fleet) closeConns() {
	for _, cs := range f.conns {
		for _, c := range cs {
			_ = c.Close()
		}
	}
}

// Stop ends every agent and waits for their goroutines and timers.
func (f *Fleet) Stop() {
	f.cancel()
	f.wg.Wait()
	for _, h := range f.agents {
		h.mu.Lock()
		h.stopTimersLocked()
		for _, l := range h.held {
			if l.timer != nil {
				l.timer.Stop()
			}
		}
		h.mu.Unlock()
	}
	f.closeConns()
}

// Hold keeps agents from reconnecting once their streams end, until
// Release: a cold start can then be timed without 10,000 agents knocking.
func (f *Fleet) Hold() {
	f.holdMu.Lock()
	defer f.holdMu.Unlock()
	if f.resume == nil {
		f.resume = make(chan struct{})
	}
}

// Release lets held agents reconnect.
func (f *Fleet) Release() {
	f.holdMu.Lock()
	defer f.holdMu.Unlock()
	if f.resume != nil {
		close(f.resume)
		f.resume = nil
	}
}

func (f *Fleet) held() chan struct{} {
	f.holdMu.Lock()
	defer f.holdMu.Unlock()
	return f.resume
}

// Connected is how many agents are in a session the scheduler welcomed.
func (f *Fleet) Connected() int { return int(f.connected.Load()) }

// Welcomes is how many Welcome messages the agents received in all.
func (f *Fleet) Welcomes() int64 { return f.welcomes.Load() }

// TelemetrySent is how many TelemetryBatch messages the agents sent.
func (f *Fleet) TelemetrySent() int64 { return f.telemetrySent.Load() }

// FleetCounts are the fleet's counters.
type FleetCounts struct {
	Nodes      int      `json:"nodes"`
	Sessions   int64    `json:"sessions"`
	Welcomes   int64    `json:"welcomes"`
	Starts     int64    `json:"start_leases"`
	Exits      int64    `json:"exits_reported"`
	Releases   int64    `json:"releases"`
	Unknown    int64    `json:"releases_of_unknown_leases"`
	Refused    int64    `json:"stale_token_commands"`
	Violations int64    `json:"violations"`
	Examples   []string `json:"violation_examples,omitempty"`
}

// Counts returns the fleet's counters so far.
func (f *Fleet) Counts() FleetCounts {
	f.violMu.Lock()
	ex := append([]string(nil), f.violList...)
	f.violMu.Unlock()
	return FleetCounts{
		Nodes: len(f.agents), Sessions: f.sessions.Load(), Welcomes: f.welcomes.Load(),
		Starts: f.starts.Load(), Exits: f.exits.Load(), Releases: f.releases.Load(), Unknown: f.unknownReleases.Load(),
		Refused: f.refused.Load(), Violations: f.violations.Load(), Examples: ex,
	}
}

// Held is how many leases the agents hold now (started, not released).
func (f *Fleet) Held() int {
	n := 0
	for _, h := range f.agents {
		h.mu.Lock()
		n += len(h.held)
		h.mu.Unlock()
	}
	return n
}

func (f *Fleet) violate(format string, args ...any) {
	f.violations.Add(1)
	f.violMu.Lock()
	defer f.violMu.Unlock()
	if len(f.violList) < 20 {
		f.violList = append(f.violList, fmt.Sprintf(format, args...))
	}
}

// Reconnect pacing, as the real agent's (nodeagent): a replica that names
// another one as leader is dialed at once; an endpoint that cannot be
// reached is retried after 100 ms, doubling up to 500 ms per round of
// endpoints, with ±20% jitter (real hosts are not synchronized); a replica
// that refuses with NO_LEADER (it leads but is still loading, or no leader
// is elected) is retried after a wait drawn from the upper half of 100 ms,
// doubling up to 5 s, and, when it named itself, the agent comes back to
// it.
const (
	minBackoff      = 100 * time.Millisecond
	maxBackoff      = 500 * time.Millisecond
	maxNoLeaderWait = 5 * time.Second
)

// sessionEnd is how one stream ended (nodeagent's, less the error).
type sessionEnd struct {
	welcomed bool
	hint     string // the leader's address, named by the refusing replica
	noLeader bool   // refused with ErrorInfo NO_LEADER
}

// isNoLeader reports whether err is a replica's NO_LEADER refusal
// (api.ReasonNoLeader in api.ErrorDomain).
func isNoLeader(err error) bool {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unavailable {
		return false
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetReason() == "NO_LEADER" && info.GetDomain() == "gpusched.io" {
			return true
		}
	}
	return false
}

// run keeps the agent connected until the fleet stops.
func (h *hollow) run() {
	defer h.f.wg.Done()
	// Spread the first connections a little so 10,000 hellos do not all
	// arrive in the same millisecond.
	h.mu.Lock()
	delay := time.Duration(h.rng.Int64N(int64(50 * time.Millisecond)))
	h.mu.Unlock()
	backoff, wait := minBackoff, minBackoff
	for {
		select {
		case <-h.f.ctx.Done():
			return
		case <-time.After(delay):
		}
		if r := h.f.held(); r != nil {
			select {
			case <-h.f.ctx.Done():
				return
			case <-r:
			}
		}
		end := h.session()
		h.mu.Lock()
		hinted := -1 // the target the refusing replica named (agents dial only targets)
		for i, t := range h.f.cfg.Targets {
			if t == end.hint {
				hinted = i
			}
		}
		switch {
		case end.welcomed:
			backoff, wait, delay = minBackoff, minBackoff, minBackoff
		case hinted >= 0 && hinted != h.target:
			h.target, delay = hinted, 0 // another replica leads: go there at once
		case end.noLeader:
			if hinted != h.target { // no leader known here: try the next endpoint
				h.target = (h.target + 1) % len(h.f.cfg.Targets)
			} // else this replica leads and is still loading: come back to it
			delay = wait/2 + time.Duration(h.rng.Int64N(int64(wait/2)+1))
			wait = min(2*wait, maxNoLeaderWait)
		default:
			h.target = (h.target + 1) % len(h.f.cfg.Targets)
			if h.target == 0 {
				backoff = min(2*backoff, maxBackoff)
			}
			delay = backoff
		}
		if !end.noLeader || end.welcomed {
			delay = delay * time.Duration(80+h.rng.IntN(41)) / 100
		}
		h.mu.Unlock()
	}
}

// session runs one stream until it ends. It reports whether the scheduler
// welcomed the agent, the refusing replica's hint naming the leader, and
// whether it refused for want of a leader.
func (h *hollow) session() (end sessionEnd) {
	ctx, cancel := context.WithCancel(h.f.ctx)
	defer cancel()
	h.mu.Lock()
	conn := h.f.conns[h.target][h.shard]
	h.mu.Unlock()
	stream, err := pb.NewAgentServiceClient(conn).Connect(ctx, grpc.WaitForReady(true))
	if err != nil {
		return end
	}
	h.f.sessions.Add(1)
	h.mu.Lock()
	h.gen++
	h.stream, h.endSess, h.welcomed = stream, cancel, false
	h.lastRecv = time.Now()
	hello := h.helloLocked()
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		if h.welcomed {
			h.f.connected.Add(-1)
		}
		end.welcomed = h.welcomed
		h.stream, h.endSess, h.welcomed = nil, nil, false
		h.stopTimersLocked()
		h.mu.Unlock()
	}()
	if err := h.sendOn(stream, hello); err != nil {
		return end
	}
	for {
		cmd, err := stream.Recv()
		if err != nil {
			if v := stream.Trailer().Get(leaderTrailer); len(v) > 0 {
				end.hint = v[0]
			}
			end.noLeader = isNoLeader(err) // welcomed (set on return) wins
			return end
		}
		h.handle(stream, cmd)
	}
}

func (h *hollow) stopTimersLocked() {
	if h.hb != nil {
		h.hb.Stop()
		h.hb = nil
	}
	if h.tel != nil {
		h.tel.Stop()
		h.tel = nil
	}
}

func (h *hollow) helloLocked() *pb.ConnectRequest {
	c := h.f.cfg
	inv := &pb.Inventory{
		GpuModel: c.GPUModel, GpuCount: int32(c.GPUs), GpuMemoryBytes: c.GPUMemoryBytes,
		DriverVersion: "550.54.15", CudaVersion: "12.4", Hostname: h.id,
	}
	for i := range c.GPUs {
		inv.Gpus = append(inv.Gpus, &pb.Gpu{
			Index: int32(i), Uuid: h.uuid(i), Name: "NVIDIA " + c.GPUModel, MemoryBytes: c.GPUMemoryBytes,
		})
	}
	hello := &pb.AgentHello{NodeId: h.id, Inventory: inv, Labels: h.labels, Address: h.id + ":29500", MaxFencingToken: h.maxToken}
	for _, l := range h.held {
		hl := &pb.HeldLease{LeaseId: l.id, Started: true, Exited: l.exited}
		if l.exit != nil {
			hl.Exit = &pb.LeaseExited{LeaseId: l.exit.GetLeaseId(), ExitCode: l.exit.GetExitCode()}
		}
		hello.Leases = append(hello.Leases, hl)
	}
	return &pb.ConnectRequest{Msg: &pb.ConnectRequest_Hello{Hello: hello}}
}

func (h *hollow) uuid(i int) string { return fmt.Sprintf("GPU-%s-%d", h.id, i) }

// handle acts on one command, on the stream's receive goroutine.
func (h *hollow) handle(stream pb.AgentService_ConnectClient, cmd *pb.ConnectResponse) {
	now := time.Now()
	h.mu.Lock()
	h.lastRecv = now
	if hb := cmd.GetHeartbeat(); hb != nil {
		// A new interval (the cluster grew) applies from the next beat.
		if d := hb.GetInterval(); d != nil && d.CheckValid() == nil && d.AsDuration() >= 10*time.Millisecond {
			h.interval = d.AsDuration()
		}
		h.mu.Unlock()
		return
	}
	if tok := cmd.GetFencingToken(); tok < h.maxToken {
		h.mu.Unlock()
		h.f.refused.Add(1)
		return
	} else {
		h.maxToken = tok
	}
	switch m := cmd.GetMsg().(type) {
	case *pb.ConnectResponse_Welcome:
		h.onWelcomeLocked(m.Welcome)
		h.mu.Unlock()
	case *pb.ConnectResponse_StartLease:
		h.onStartLocked(stream, m.StartLease, now) // unlocks
	case *pb.ConnectResponse_ReleaseLease:
		h.onReleaseLocked(stream, m.ReleaseLease) // unlocks
	case *pb.ConnectResponse_FetchLogs:
		h.mu.Unlock()
		_ = h.sendOn(stream, &pb.ConnectRequest{Msg: &pb.ConnectRequest_LogChunk{LogChunk: &pb.LogChunk{
			RequestId: m.FetchLogs.GetRequestId(), Data: []byte("hollow agent: no output\n"), Eof: true,
		}}})
	case *pb.ConnectResponse_MockInject:
		h.mu.Unlock()
		_ = h.sendOn(stream, &pb.ConnectRequest{Msg: &pb.ConnectRequest_MockInjectResult{MockInjectResult: &pb.MockInjectResult{
			RequestId: m.MockInject.GetRequestId(), Error: "hollow agents have no GPU backend",
		}}})
	default:
		h.mu.Unlock()
	}
}

func (h *hollow) onWelcomeLocked(w *pb.Welcome) {
	h.f.welcomes.Add(1)
	if !h.welcomed {
		h.welcomed = true
		h.f.connected.Add(1)
	}
	h.interval = 2 * time.Second
	if d := w.GetHeartbeatInterval(); d.CheckValid() == nil && d.AsDuration() >= 10*time.Millisecond {
		h.interval = d.AsDuration()
	}
	h.stopTimersLocked()
	sess := h.gen
	// First beats at a random offset: agents connected together must not
	// beat together.
	h.hb = time.AfterFunc(time.Duration(h.rng.Int64N(int64(h.interval))), func() { h.beat(sess) })
	if hz := h.f.cfg.TelemetryHz; hz > 0 {
		period := time.Duration(float64(time.Second) / hz)
		h.tel = time.AfterFunc(time.Duration(h.rng.Int64N(int64(period))), func() { h.sample(sess, period) })
	}
}

// beat sends a heartbeat and leaves a scheduler that has been silent for
// three intervals, as the real agent does.
func (h *hollow) beat(sess uint64) {
	h.mu.Lock()
	if h.gen != sess || h.stream == nil || h.hb == nil {
		h.mu.Unlock()
		return
	}
	s := h.stream
	if time.Since(h.lastRecv) > 3*h.interval {
		h.endSess()
		h.mu.Unlock()
		return
	}
	h.hb.Reset(h.interval)
	h.mu.Unlock()
	_ = h.sendOn(s, &pb.ConnectRequest{Msg: &pb.ConnectRequest_Heartbeat{Heartbeat: &pb.Heartbeat{}}})
}

// sample sends one TelemetryBatch with plausible values: busy GPUs while
// a lease runs, idle ones otherwise.
func (h *hollow) sample(sess uint64, period time.Duration) {
	h.mu.Lock()
	if h.gen != sess || h.stream == nil || h.tel == nil {
		h.mu.Unlock()
		return
	}
	s := h.stream
	b := &pb.TelemetryBatch{} // Time is stamped by sendTelemetry
	var busy bool
	for _, l := range h.held {
		if !l.exited {
			b.LeaseId, b.JobId, busy = l.id, l.job, true
		}
	}
	c := h.f.cfg
	for i := range c.GPUs {
		g := &pb.GpuSample{Gpu: int32(i), Uuid: h.uuid(i), SmClockMhz: 1980, MemClockMhz: 2619}
		if busy {
			g.GpuUtil = 85 + uint32(h.rng.IntN(16))
			g.MemCopyUtil = 30 + uint32(h.rng.IntN(40))
			g.FbUsedBytes = c.GPUMemoryBytes * uint64(60+h.rng.IntN(35)) / 100
			g.GpuTemp = 62 + uint32(h.rng.IntN(18))
			g.PowerUsageMilliwatts = 450_000 + uint32(h.rng.IntN(250_000))
		} else {
			g.FbUsedBytes = 512 << 20
			g.GpuTemp = 31 + uint32(h.rng.IntN(8))
			g.PowerUsageMilliwatts = 68_000 + uint32(h.rng.IntN(20_000))
			g.SmClockMhz = 345
		}
		g.FbFreeBytes = c.GPUMemoryBytes - g.FbUsedBytes
		b.Samples = append(b.Samples, g)
	}
	h.tel.Reset(period)
	h.mu.Unlock()
	h.sendTelemetry(s, b)
}

// sendTelemetry stamps b with the time right before it is sent (so
// agent → subscriber latency starts at the send, not at a wait for the
// stream) and sends it.
func (h *hollow) sendTelemetry(s pb.AgentService_ConnectClient, b *pb.TelemetryBatch) {
	h.sendMu.Lock()
	defer h.sendMu.Unlock()
	b.Time = timestamppb.Now()
	if s.Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Telemetry{Telemetry: b}}) == nil {
		h.f.telemetrySent.Add(1)
	}
}

// onStartLocked accepts a lease, reports it started and arms its exit.
// Called with h.mu held; returns with it released.
func (h *hollow) onStartLocked(stream pb.AgentService_ConnectClient, m *pb.StartLease, at time.Time) {
	for _, l := range h.held {
		if l.id == m.GetLeaseId() { // already running it: nothing to start
			h.mu.Unlock()
			_ = h.sendOn(stream, started(m))
			return
		}
	}
	if len(h.held) > 0 {
		ids := make([]string, len(h.held))
		for i, l := range h.held {
			ids[i] = l.id
		}
		h.f.violate("node %s: StartLease %s while still holding %v", h.id, m.GetLeaseId(), ids)
	}
	l := &heldLease{id: m.GetLeaseId(), job: m.GetJobId()}
	h.held = append(h.held, l)
	h.mu.Unlock()
	h.f.starts.Add(1)
	if o := h.f.cfg.Observer; o != nil {
		o.StartLease(h.id, m, at)
	}
	_ = h.sendOn(stream, started(m))
	// Armed only now, so LeaseExited never overtakes LeaseStarted. A
	// ReleaseLease is handled on this same goroutine, so l is still held.
	d, code := jobRuntime(m)
	h.mu.Lock()
	l.timer = time.AfterFunc(d, func() { h.exit(l, code) })
	h.mu.Unlock()
}

func started(m *pb.StartLease) *pb.ConnectRequest {
	return &pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseStarted{LeaseStarted: &pb.LeaseStarted{LeaseId: m.GetLeaseId(), Pid: 4242}}}
}

// exit reports the lease's "command" ended, unless it was released first.
// If the stream is down, the next hello reports the exit.
func (h *hollow) exit(l *heldLease, code int) {
	h.mu.Lock()
	held := false
	for _, x := range h.held {
		held = held || x == l
	}
	if !held || l.exited {
		h.mu.Unlock()
		return
	}
	l.exited = true
	l.exit = &pb.LeaseExited{LeaseId: l.id, ExitCode: int32(code)}
	s := h.stream
	h.mu.Unlock()
	h.f.exits.Add(1)
	if s != nil {
		_ = h.sendOn(s, &pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseExited{LeaseExited: l.exit}})
	}
}

// onReleaseLocked stops and forgets the lease and reports the node clean.
// Called with h.mu held; returns with it released.
func (h *hollow) onReleaseLocked(stream pb.AgentService_ConnectClient, m *pb.ReleaseLease) {
	held := false
	for i, l := range h.held {
		if l.id == m.GetLeaseId() {
			if l.timer != nil {
				l.timer.Stop()
			}
			h.held = append(h.held[:i], h.held[i+1:]...)
			held = true
			break
		}
	}
	h.mu.Unlock()
	if held {
		h.f.releases.Add(1)
	} else {
		h.f.unknownReleases.Add(1)
	}
	_ = h.sendOn(stream, &pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseReleased{LeaseReleased: &pb.LeaseReleased{
		LeaseId: m.GetLeaseId(), Clean: true,
	}}})
}

// sendOn serializes sends on a stream (gRPC allows one sender at a time).
func (h *hollow) sendOn(s pb.AgentService_ConnectClient, msg *pb.ConnectRequest) error {
	h.sendMu.Lock()
	defer h.sendMu.Unlock()
	return s.Send(msg)
}
