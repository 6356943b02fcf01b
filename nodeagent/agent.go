package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"go.uber.org/zap"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpusched/gpusched/nodeagent/gpu"
	"github.com/gpusched/gpusched/nodeagent/runner"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Sentinel errors of the agent.
var (
	// ErrStaleToken: a command came from a leader older than one already obeyed.
	ErrStaleToken = errors.New("nodeagent: stale fencing token")
	// ErrConfig: the agent's configuration is unusable.
	ErrConfig = errors.New("nodeagent: invalid config")
)

// Config configures an agent.
type Config struct {
	// NodeID is the node's unique name. Required.
	NodeID string
	// Servers are scheduler endpoints (host:port); the agent fails over
	// between them. Required.
	Servers []string
	// NVML is the GPU library (real or mock). Required.
	NVML nvml.Interface
	// DataDir keeps state.json and each lease's logs and scratch space.
	DataDir string
	// Labels are reported to the scheduler (rack, switch, zone, ...).
	Labels map[string]string
	// Address is how peers of a gang reach this node (GPUSCHED_MASTER_ADDR).
	// Default: the hostname.
	Address string
	// StopGrace bounds how long a stopping command gets between SIGTERM
	// and SIGKILL when the agent itself shuts down. Default 5s.
	StopGrace time.Duration
	// DialOptions are added to the gRPC dial (TLS arrives here later).
	DialOptions []grpc.DialOption
	Logger      *zap.Logger

	// Mock is the simulated node behind NVML when the backend is a mock
	// (gpu.Backend.Mock); nil on real NVML. With it the agent keeps the
	// simulated driver's process lists in step with real processes (a
	// lease's command is registered on every GPU while it runs, dead
	// processes are dropped) and obeys MockInject; without it MockInject
	// is refused.
	Mock *gpu.Mock
	// TelemetryInterval is how often the agent samples its GPUs, sends a
	// TelemetryBatch and checks exclusivity. Default 1s.
	TelemetryInterval time.Duration
	// ForeignProcessPolicy says what happens to a GPU process that does
	// not belong to the lease holding the node (or to any GPU process on an
	// idle node): ForeignKill (default) or ForeignReport.
	ForeignProcessPolicy string
	// ForeignKillGrace is how long a foreign process gets between SIGTERM
	// and SIGKILL. Default 5s.
	ForeignKillGrace time.Duration
	// CleanupHook, if set, is a shell command (sh -c) run after each lease
	// once its processes are gone and the GPUs are idle, with
	// GPUSCHED_LEASE_ID and GPUSCHED_NODE_ID set; a non-zero exit fails
	// the cleanup. It shares CleanupTimeout with the wait before it.
	CleanupHook string
	// CleanupTimeout bounds the cleanup after a lease: waiting for the
	// GPUs to be free of processes and back at their idle memory, and the
	// hook. Default 60s.
	CleanupTimeout time.Duration
	// HealthRecheckInterval is how often an unhealthy node is checked
	// again, to report it healthy once it is. Default 30s.
	HealthRecheckInterval time.Duration
	// MaxGPUTempC is the hottest a GPU may be for the node to pass its
	// health checks. Default 90.
	MaxGPUTempC uint32
}

// Foreign process policies (Config.ForeignProcessPolicy).
const (
	// ForeignKill: SIGTERM, then SIGKILL after ForeignKillGrace.
	ForeignKill = "kill"
	// ForeignReport: only an event.
	ForeignReport = "report"
)

// Defaults of the health and exclusivity settings.
const (
	defaultTelemetryInterval     = time.Second
	defaultForeignKillGrace      = 5 * time.Second
	defaultCleanupTimeout        = 60 * time.Second
	defaultHealthRecheckInterval = 30 * time.Second
	defaultMaxGPUTempC           = 90
)

// Agent is a running node agent.
type Agent struct {
	cfg       Config
	log       *zap.Logger
	inventory gpu.Inventory
	hostname  string

	mu      sync.Mutex
	state   *persistentState
	procs   map[string]*runner.Process // running commands by lease
	session *session                   // current stream, nil when disconnected
	// shuttingDown explains exits caused by the agent's own shutdown.
	shuttingDown bool
	wg           sync.WaitGroup // lease goroutines

	// quit is closed when the agent shuts down: cleanups waiting for the
	// GPUs give up (and keep the lease held for the next agent).
	quit     chan struct{}
	quitOnce sync.Once
	// recheck asks healthLoop for a health re-check now (after a
	// MockInject clear).
	recheck chan struct{}
	sim     *simDriver // nil on real NVML
	health  health
	fb      fbBaseline
	// latest is the newest sampling round, for the agent's /metrics.
	latest atomic.Pointer[pb.TelemetryBatch]
}

// New validates cfg, reads the GPU inventory and the persisted state.
func New(cfg Config) (*Agent, error) {
	switch {
	case cfg.NodeID == "":
		return nil, fmt.Errorf("%w: node id is required", ErrConfig)
	case len(cfg.Servers) == 0:
		return nil, fmt.Errorf("%w: at least one scheduler endpoint is required", ErrConfig)
	case cfg.NVML == nil:
		return nil, fmt.Errorf("%w: a GPU backend is required", ErrConfig)
	case cfg.DataDir == "":
		return nil, fmt.Errorf("%w: data dir is required", ErrConfig)
	case cfg.Mock != nil && cfg.NVML != cfg.Mock.NVML():
		return nil, fmt.Errorf("%w: Mock must be the simulated node behind NVML", ErrConfig)
	}
	switch cfg.ForeignProcessPolicy {
	case "":
		cfg.ForeignProcessPolicy = ForeignKill
	case ForeignKill, ForeignReport:
	default:
		return nil, fmt.Errorf("%w: foreign process policy %q (want %q or %q)", ErrConfig,
			cfg.ForeignProcessPolicy, ForeignKill, ForeignReport)
	}
	for _, d := range []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"telemetry interval", &cfg.TelemetryInterval, defaultTelemetryInterval},
		{"foreign kill grace", &cfg.ForeignKillGrace, defaultForeignKillGrace},
		{"cleanup timeout", &cfg.CleanupTimeout, defaultCleanupTimeout},
		{"health re-check interval", &cfg.HealthRecheckInterval, defaultHealthRecheckInterval},
	} {
		switch {
		case *d.v < 0:
			return nil, fmt.Errorf("%w: negative %s %v", ErrConfig, d.name, *d.v)
		case *d.v == 0:
			*d.v = d.def
		}
	}
	if cfg.MaxGPUTempC == 0 {
		cfg.MaxGPUTempC = defaultMaxGPUTempC
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.StopGrace <= 0 {
		cfg.StopGrace = 5 * time.Second
	}
	host, _ := os.Hostname()
	if cfg.Address == "" {
		cfg.Address = host
	}
	if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
		return nil, fmt.Errorf("nodeagent: data dir: %w", err)
	}
	inv, err := gpu.ReadInventory(cfg.NVML)
	if err != nil {
		return nil, fmt.Errorf("nodeagent: read GPU inventory: %w", err)
	}
	st, err := loadState(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		cfg: cfg, log: cfg.Logger.With(zap.String("node", cfg.NodeID)),
		inventory: inv, hostname: host, state: st, procs: map[string]*runner.Process{},
		quit: make(chan struct{}), recheck: make(chan struct{}, 1),
	}
	if cfg.Mock != nil {
		a.sim = &simDriver{m: cfg.Mock, gpus: inv.GPUCount}
	}
	a.health.init(inv.GPUCount)
	a.fb.init(a, inv.GPUCount)
	a.recoverLeases()
	return a, nil
}

// Inventory returns what the agent read through NVML.
func (a *Agent) Inventory() gpu.Inventory { return a.inventory }

// Run connects to the scheduler and serves it until ctx ends, reconnecting
// (and failing over between servers) with backoff. On return every command
// the agent started has been stopped: no process outlives it.
func (a *Agent) Run(ctx context.Context) error {
	defer a.stopAll()
	// The monitor (telemetry, exclusivity, health re-checks) and the XID
	// watcher run for the agent's whole life, connected or not: a foreign
	// process is killed even while no scheduler listens.
	monCtx, stopMonitor := context.WithCancel(ctx)
	var monitors sync.WaitGroup
	defer func() { stopMonitor(); a.closeQuit(); monitors.Wait() }()
	a.initialHealth()
	monitors.Go(func() { a.monitor(monCtx) })
	monitors.Go(func() { a.healthLoop(monCtx) })
	if w := a.watchXIDs(); w != nil {
		monitors.Go(func() { a.xidLoop(monCtx, w) })
	}
	d := newDialPlan(a.cfg.Servers, rand.Int64N)
	for ctx.Err() == nil {
		server := d.server()
		end := a.serve(ctx, server)
		if ctx.Err() != nil {
			break
		}
		delay := d.ended(server, end)
		a.log.Info("scheduler stream ended; reconnecting", zap.String("server", server), zap.Error(end.err),
			zap.String("leader_hint", end.leaderHint), zap.Bool("no_leader", end.noLeader), zap.Duration("retry_in", delay))
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
	}
	return nil
}

// Reconnect pacing. An endpoint that cannot be reached is left for the
// next one soon, and the agent backs off only after a whole round of
// endpoints failed, up to maxBackoff: the ceiling is low on purpose, so a
// failover costs one election, not minutes.
//
// A replica that answers but has no leader to offer (ErrorInfo NO_LEADER:
// it leads but is still loading its state, or no leader is elected) is
// different: the agent waits from minBackoff, doubling up to
// maxNoLeaderWait, each wait drawn at random from its upper half. Ten
// thousand agents retrying every few hundred milliseconds while a leader
// loads would cost it tens of thousands of refused streams a second.
const (
	minBackoff      = 100 * time.Millisecond
	maxBackoff      = 500 * time.Millisecond
	maxNoLeaderWait = 5 * time.Second
)

// dialPlan picks the endpoint of each connection attempt and the pause
// before it, from how the previous stream ended.
type dialPlan struct {
	servers []string
	next    int    // the endpoint after the last one tried in turn
	hint    string // the endpoint to try next, named by a replica
	failed  int    // attempts since the last welcome that reached no replica
	backoff time.Duration
	wait    time.Duration       // the next no-leader wait's upper bound
	randN   func(n int64) int64 // [0, n)
}

func newDialPlan(servers []string, randN func(int64) int64) *dialPlan {
	return &dialPlan{servers: servers, backoff: minBackoff, wait: minBackoff, randN: randN}
}

// server is the endpoint to dial now: the one a replica named, else the
// next in turn.
func (d *dialPlan) server() string {
	if s := d.hint; s != "" {
		return s
	}
	s := d.servers[d.next%len(d.servers)]
	d.next++
	return s
}

// ended records how the stream to server ended and returns how long to
// wait before the next attempt.
func (d *dialPlan) ended(server string, end sessionEnd) time.Duration {
	d.hint = ""
	switch {
	case end.welcomed:
		d.backoff, d.wait, d.failed = minBackoff, minBackoff, 0
		return minBackoff
	case end.leaderHint != "" && end.leaderHint != server:
		// Another replica leads: go there at once.
		d.hint = end.leaderHint
		return 0
	case end.noLeader:
		if end.leaderHint == server {
			// This replica leads and is still loading: come back to it.
			d.hint = server
		}
		w := d.wait/2 + time.Duration(d.randN(int64(d.wait/2)+1))
		d.wait = min(2*d.wait, maxNoLeaderWait)
		return w
	default:
		if d.failed++; d.failed%len(d.servers) == 0 {
			d.backoff = min(2*d.backoff, maxBackoff)
		}
		return d.backoff
	}
}

// leaderTrailer is the trailer in which a follower that refuses the stream
// names the leader's address (see AgentService in agent_service.proto).
const leaderTrailer = "gpusched-leader"

// sessionEnd is how one stream ended.
type sessionEnd struct {
	welcomed   bool   // the scheduler accepted the agent on it
	leaderHint string // the leader's address, named by the replica that refused the stream
	// noLeader: a replica refused the stream because no leader is ready
	// (ErrorInfo NO_LEADER): it leads but is still loading, or none is
	// elected, or it knows of none.
	noLeader bool
	err      error
}

// The ErrorInfo a replica attaches when it cannot serve for want of a
// leader (scheduler/api's ReasonNoLeader and ErrorDomain; not imported, to
// keep the scheduler out of the agent's dependencies).
const (
	reasonNoLeader = "NO_LEADER"
	errorDomain    = "gpusched.io"
)

// isNoLeader reports whether err is a replica's NO_LEADER refusal.
func isNoLeader(err error) bool {
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.Unavailable {
		return false
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.GetReason() == reasonNoLeader && info.GetDomain() == errorDomain {
			return true
		}
	}
	return false
}

// Heartbeat intervals: the default until the scheduler's Welcome says
// otherwise, and the floor the agent accepts.
const (
	defaultHeartbeat = 2 * time.Second
	minHeartbeat     = 100 * time.Millisecond
	// missedHeartbeats silent intervals end a stream.
	missedHeartbeats = 3
)

// session is one live stream to a scheduler.
type session struct {
	out chan *pb.ConnectRequest
	// logSlots bounds the LogChunks queued in out. Chunks wait for room
	// (see sendLogs) and a big log would otherwise fill out completely,
	// so that reports (LeaseExited, LeaseReleased) found it full and were
	// dropped while the stream stayed up, never to be re-reported.
	logSlots chan struct{}
}

// maxQueuedLogChunks is the share of a session's queue log chunks may take.
const maxQueuedLogChunks = 64

// currentSession returns the live stream, or nil while disconnected.
func (a *Agent) currentSession() *session {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.session
}

// notify sends msg on the current stream, if any. Messages lost while
// disconnected are not lost facts: the next hello re-reports every held
// lease with its progress.
func (a *Agent) notify(msg *pb.ConnectRequest) {
	s := a.currentSession()
	if s == nil {
		return
	}
	select {
	case s.out <- msg:
	default:
		a.log.Warn("stream send buffer full; dropping message (re-reported on reconnect)")
	}
}

// serve runs one stream until it fails or ctx ends.
func (a *Agent) serve(ctx context.Context, server string) (end sessionEnd) {
	end.err = a.stream(ctx, server, &end)
	return end
}

// stream runs one stream; it records in end what the caller needs to pick
// the next endpoint.
func (a *Agent) stream(ctx context.Context, server string, end *sessionEnd) error {
	opts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// Notice a dead scheduler host even while nothing is being sent.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
	}, a.cfg.DialOptions...)
	conn, err := grpc.NewClient(server, opts...)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := pb.NewAgentServiceClient(conn).Connect(ctx)
	if err != nil {
		return err
	}
	s := &session{out: make(chan *pb.ConnectRequest, 1024), logSlots: make(chan struct{}, maxQueuedLogChunks)}
	// The hello and the session switch happen under one lock, so an exit is
	// either in the hello or sent on this stream afterwards, never lost.
	a.mu.Lock()
	hello := a.helloLocked()
	a.session = s
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		if a.session == s {
			a.session = nil
		}
		a.mu.Unlock()
	}()
	if err := stream.Send(hello); err != nil {
		return err
	}
	sendDone := make(chan error, 1)
	interval := make(chan time.Duration, 1) // from Welcome
	go func() {
		heartbeat := time.NewTicker(defaultHeartbeat)
		defer heartbeat.Stop()
		for {
			var m *pb.ConnectRequest
			select {
			case <-ctx.Done():
				sendDone <- ctx.Err()
				return
			case d := <-interval:
				heartbeat.Reset(d)
				continue
			case m = <-s.out:
				if m.GetLogChunk() != nil {
					<-s.logSlots
				}
			case <-heartbeat.C:
				m = &pb.ConnectRequest{Msg: &pb.ConnectRequest_Heartbeat{Heartbeat: &pb.Heartbeat{}}}
			}
			if err := stream.Send(m); err != nil {
				sendDone <- err
				cancel()
				return
			}
		}
	}()
	defer func() { cancel(); <-sendDone }()

	// A leader that froze (SIGSTOP, a hung host) keeps the TCP connection
	// open but sends nothing: after missedHeartbeats silent intervals the
	// agent gives up on it and moves to the next replica.
	var lastRecv atomic.Int64
	lastRecv.Store(time.Now().UnixNano())
	silentFor := atomic.Int64{}
	silentFor.Store(int64(missedHeartbeats * defaultHeartbeat))
	// setInterval adopts the heartbeat interval the scheduler asks for
	// (Welcome, or a heartbeat once the cluster has grown). Only this
	// receive loop sends on interval, so replacing a value not yet taken
	// cannot block.
	setInterval := func(d *durationpb.Duration) {
		if d == nil || d.CheckValid() != nil || d.AsDuration() < minHeartbeat {
			return
		}
		select {
		case <-interval:
		default:
		}
		interval <- d.AsDuration()
		silentFor.Store(int64(missedHeartbeats * d.AsDuration()))
	}
	watchdogDone := make(chan struct{})
	go func() {
		defer close(watchdogDone)
		tick := time.NewTicker(minHeartbeat)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				if time.Since(time.Unix(0, lastRecv.Load())) > time.Duration(silentFor.Load()) {
					a.log.Warn("scheduler silent; reconnecting", zap.String("server", server))
					cancel()
					return
				}
			}
		}
	}()
	defer func() { cancel(); <-watchdogDone }()
	for {
		cmd, err := stream.Recv()
		if err != nil {
			if hint := stream.Trailer().Get(leaderTrailer); len(hint) > 0 {
				end.leaderHint = hint[0]
			}
			end.noLeader = !end.welcomed && isNoLeader(err)
			return err
		}
		lastRecv.Store(time.Now().UnixNano())
		if hb := cmd.GetHeartbeat(); hb != nil {
			// Proves the stream alive and commands nothing, so no token
			// check; it may carry a new interval (the cluster grew).
			setInterval(hb.GetInterval())
			continue
		}
		if err := a.checkToken(cmd.GetFencingToken()); err != nil {
			a.log.Warn("refusing command", zap.Int64("token", cmd.GetFencingToken()), zap.Error(err))
			continue
		}
		switch m := cmd.GetMsg().(type) {
		case *pb.ConnectResponse_Welcome:
			end.welcomed = true
			a.log.Info("registered with scheduler", zap.String("server", server), zap.Int64("token", cmd.GetFencingToken()))
			setInterval(m.Welcome.GetHeartbeatInterval())
			// A new leader learns the node's health from this, not from
			// whatever an earlier leader recorded.
			a.reportHealth()
		case *pb.ConnectResponse_StartLease:
			a.startLease(m.StartLease)
		case *pb.ConnectResponse_ReleaseLease:
			a.releaseLease(m.ReleaseLease)
		case *pb.ConnectResponse_FetchLogs:
			a.wg.Add(1)
			go func() { defer a.wg.Done(); a.sendLogs(ctx, m.FetchLogs) }()
		case *pb.ConnectResponse_MockInject:
			a.notify(&pb.ConnectRequest{Msg: &pb.ConnectRequest_MockInjectResult{
				MockInjectResult: a.mockInject(m.MockInject)}})
		}
	}
}

// checkToken enforces fencing: a command is obeyed only if its token is at
// least the highest one seen, which is persisted before it is obeyed so an
// agent restart cannot forget it.
func (a *Agent) checkToken(token int64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if token < a.state.MaxFencingToken {
		return fmt.Errorf("%w: %d < %d", ErrStaleToken, token, a.state.MaxFencingToken)
	}
	if token > a.state.MaxFencingToken {
		a.state.MaxFencingToken = token
		if err := a.state.save(a.cfg.DataDir); err != nil {
			return err
		}
	}
	return nil
}

// helloLocked builds the registration message. Called with a.mu held.
func (a *Agent) helloLocked() *pb.ConnectRequest {
	inv := &pb.Inventory{
		GpuModel: a.inventory.GPUModel, GpuCount: int32(a.inventory.GPUCount),
		GpuMemoryBytes: a.inventory.GPUMemoryBytes, DriverVersion: a.inventory.DriverVersion,
		CudaVersion: a.inventory.CUDAVersion, Hostname: a.hostname,
	}
	for _, g := range a.inventory.GPUs {
		inv.Gpus = append(inv.Gpus, &pb.Gpu{Index: int32(g.Index), Uuid: g.UUID, Name: g.Name, MemoryBytes: g.MemoryBytes, PciBusId: g.PCIBusID})
	}
	h := &pb.AgentHello{
		NodeId: a.cfg.NodeID, Inventory: inv, Labels: a.cfg.Labels, Address: a.cfg.Address,
		MaxFencingToken: a.state.MaxFencingToken,
	}
	for _, l := range a.state.Leases {
		hl := &pb.HeldLease{LeaseId: l.ID, Started: l.Started, Exited: l.Exited}
		if l.Exited {
			hl.Exit = &pb.LeaseExited{LeaseId: l.ID, ExitCode: int32(l.Code), Signal: l.Signal, Message: l.Message}
		}
		h.Leases = append(h.Leases, hl)
	}
	return &pb.ConnectRequest{Msg: &pb.ConnectRequest_Hello{Hello: h}}
}
