package sim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/gpusched/gpusched/client"
	"github.com/gpusched/gpusched/internal/embedetcd"
	"github.com/gpusched/gpusched/internal/gcbudget"
	"github.com/gpusched/gpusched/internal/invariants"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Phase names, as put in each job's EnvPhase and job set.
const (
	PhaseOpen    = "open"
	PhaseBacklog = "backlog"
	PhaseBurst   = "burst"
)

// burstQueue holds the burst's jobs; its priority puts them ahead of the
// backlog queued in "default".
const burstQueue = "sim-burst"

// Config configures a simulated-cluster run. Zero values take the
// defaults of Defaults.
type Config struct {
	// Nodes hollow agents, each with GPUs × GPUModel.
	Nodes         int
	GPUModel      string
	AgentsPerConn int
	TelemetryHz   float64

	// EtcdEndpoints of a real etcd cluster; empty runs an embedded member
	// in WorkDir (with fsync unless EtcdNoFsync).
	EtcdEndpoints []string
	EtcdNoFsync   bool
	Prefix        string

	// SchedulerProcess runs the scheduler as a child process (Executable
	// sim replica), so its RSS, CPU and profiles are its own; otherwise it
	// runs in this process with the agents, etcd and load generator.
	SchedulerProcess  bool
	Executable        string
	SchedulerLogLevel string
	// SchedulerHeapBudget is the child scheduler's --heap-budget; ""
	// keeps its default.
	SchedulerHeapBudget string
	HeartbeatInterval   time.Duration
	NodeLostAfter       time.Duration
	SessionTTL          time.Duration

	Mix     []SizeClass
	Tenants int

	// The open phase submits OpenRate jobs/s for OpenDuration (open loop)
	// while there is free capacity, and measures submit → StartLease.
	OpenRate               float64
	OpenDuration           time.Duration
	OpenBatch              int
	OpenConcurrency        int
	OpenMinRun, OpenMaxRun time.Duration

	// The backlog phase pauses the queue, queues BacklogJobs, then resumes
	// it on an idle cluster and measures placements/s until all are placed.
	BacklogJobs                  int
	BacklogBatch                 int
	BacklogConcurrency           int
	BacklogMinRun, BacklogMaxRun time.Duration
	// The burst, the backlog phase's first step: BurstJobs one-node jobs
	// running BurstRun each, queued with the backlog in a queue of higher
	// priority and released first onto the idle cluster, so that placement
	// runs with free nodes and the whole backlog pending behind: committed
	// placements/s while capacity lasts (what kube-scheduler's
	// scheduler_perf and Nomad's C1M measure). 0 skips it.
	BurstJobs int
	BurstRun  time.Duration

	// ColdStart stops the leader at the end and times a fresh replica
	// until it serves with the whole state loaded.
	ColdStart bool
	// CeilingClients: etcd batched-write ceiling from each number of
	// clients, for CeilingDuration each; empty skips it.
	CeilingClients  []int
	CeilingDuration time.Duration

	// Verify waits until every job has ended and counts their states.
	Verify bool
	// CheckInvariants replays etcd's history (internal/invariants).
	CheckInvariants bool

	// CPUProfile (backlog drain), OpenCPUProfile (open phase) and
	// MemProfile (backlog queued) are profiles of the scheduler;
	// SimCPUProfile of this process during the drain, and
	// OpenSimCPUProfile during the open phase (process mode only).
	CPUProfile, OpenCPUProfile, MemProfile, SimCPUProfile, OpenSimCPUProfile string
	// ColdStartCPUProfile profiles the fresh replica of each cold start
	// from its start until its state is loaded (process mode only): the
	// quiet one in this file, the one with agents retrying in
	// <file>.retrying.
	ColdStartCPUProfile string
	// LatencyFile, if set, receives every open-phase latency as CSV
	// (Tracker.WriteLatencies).
	LatencyFile string

	// WorkDir holds etcd's data and the replica logs; default a temp dir,
	// removed at the end.
	WorkDir      string
	PhaseTimeout time.Duration
	// Progress receives one line per step; nil is silent.
	Progress io.Writer
}

// Defaults fills in zero fields: 10,000 nodes of 8 H100s, the default mix,
// 8 tenants. The phases stay off unless OpenRate, OpenDuration and
// BacklogJobs are set (`gpusched sim` sets the issue-8 shape).
func (c *Config) Defaults() {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defD := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.Nodes, 10000)
	def(&c.AgentsPerConn, 100)
	def(&c.Tenants, 8)
	def(&c.OpenBatch, 1)
	def(&c.OpenConcurrency, 512)
	def(&c.BacklogBatch, 1000)
	def(&c.BacklogConcurrency, 4)
	if c.GPUModel == "" {
		c.GPUModel = "H100"
	}
	if c.Prefix == "" {
		c.Prefix = "/gpusched"
	}
	if len(c.Mix) == 0 {
		c.Mix = DefaultMix
	}
	defD(&c.HeartbeatInterval, 2*time.Second)
	defD(&c.NodeLostAfter, 30*time.Second)
	defD(&c.SessionTTL, 5*time.Second)
	defD(&c.CeilingDuration, 3*time.Second)
	defD(&c.BurstRun, 3*time.Second)
	defD(&c.PhaseTimeout, 10*time.Minute)
}

// SimHeapBudget is the heap budget of the sim process itself (agents, etcd,
// load generator) when the scheduler runs as a child: at 10,000 nodes and
// 2,000 jobs/s it collects about every 45 s.
const SimHeapBudget = 6 << 30

// Run runs the simulation and returns its report. It stops everything it
// started before returning.
func Run(ctx context.Context, cfg Config) (rep *Report, err error) {
	cfg.Defaults()
	if cfg.SchedulerProcess {
		// GOGC and GOMEMLIMIT in the environment are meant for the
		// scheduler (the child inherits them). This process hosts what a
		// deployment runs on other machines (10,000 agents, etcd, the
		// clients); its collector runs against a heap budget of its own,
		// so that its mark phases seldom land in a measurement and add
		// their stalls to the scheduler's latency.
		defer debug.SetMemoryLimit(debug.SetMemoryLimit(math.MaxInt64))
		stopGC, err := gcbudget.Start(ctx, gcbudget.Config{Heap: SimHeapBudget, MaxPercent: math.MaxInt32})
		if err != nil {
			return nil, err
		}
		defer stopGC()
	}
	s := &run{cfg: cfg, rep: &Report{Machine: machine(), Config: summarizeConfig(cfg)}, tracker: NewTracker()}
	defer s.cleanup(&err)
	if err := s.setup(ctx); err != nil {
		return s.rep, err
	}
	if cfg.OpenRate > 0 && cfg.OpenDuration > 0 {
		if err := s.openPhase(ctx); err != nil {
			return s.rep, err
		}
	}
	if cfg.BacklogJobs > 0 {
		if err := s.backlogPhase(ctx); err != nil {
			return s.rep, err
		}
	}
	if cfg.Verify {
		if err := s.verify(ctx); err != nil {
			return s.rep, err
		}
	}
	if err := s.etcdStatus(ctx); err != nil {
		return s.rep, err
	}
	if st, err := s.sched.Stats(false); err == nil {
		s.rep.Scheduler.End = st
	}
	_, hwm := readRSS(s.sched.PID())
	s.rep.Scheduler.PeakRSSBytes = max(s.peakRSS(), hwm)
	if cfg.ColdStart {
		if err := s.coldStart(ctx); err != nil {
			return s.rep, err
		}
	}
	s.rep.Fleet = s.fleet.Counts()
	s.fleet.Stop()
	s.fleet = nil
	if err := s.stopScheduler(); err != nil {
		return s.rep, err
	}
	if cfg.CheckInvariants {
		s.progress("replaying etcd history (internal/invariants)")
		ir, err := invariants.Check(ctx, s.etcd, cfg.Prefix, s.accepted)
		if err != nil {
			return s.rep, err
		}
		s.rep.Invariants = &InvariantsReport{Revisions: ir.Revisions, Transactions: ir.Transactions, Jobs: ir.Jobs, Leases: ir.Leases, Violations: ir.Violations}
	}
	for _, n := range cfg.CeilingClients {
		s.progress("etcd batched-write ceiling: %d client(s), %d puts/txn of %d bytes, %s", n, 128, s.valueBytes(ctx), cfg.CeilingDuration)
		c, err := MeasureCeiling(ctx, s.etcdEndpoints, "/gpusched-sim-ceiling", n, 128, s.valueBytes(ctx), cfg.CeilingDuration)
		if err != nil {
			return s.rep, err
		}
		s.rep.Ceiling = append(s.rep.Ceiling, c)
	}
	s.rep.finish()
	return s.rep, nil
}

type run struct {
	cfg     Config
	rep     *Report
	tracker *Tracker
	workDir string
	ownDir  bool

	embedded      *embedetcd.Server
	etcd          *clientv3.Client
	etcdEndpoints []string
	sched         replica
	schedCfg      ReplicaConfig
	replicas      int
	fleet         *Fleet
	cl            *client.Client
	accepted      []string
	valBytes      int

	rssMu   sync.Mutex
	rssPeak uint64
	stopRSS func()
}

func (s *run) progress(format string, args ...any) {
	if s.cfg.Progress != nil {
		fmt.Fprintf(s.cfg.Progress, "%s  %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
	}
}

func (s *run) cleanup(err *error) {
	if s.fleet != nil {
		s.fleet.Stop()
	}
	if s.stopRSS != nil {
		s.stopRSS()
	}
	if s.cl != nil {
		_ = s.cl.Close()
	}
	if s.sched != nil {
		if e := s.stopScheduler(); e != nil && *err == nil {
			*err = e
		}
	}
	if s.etcd != nil {
		_ = s.etcd.Close()
	}
	if s.embedded != nil {
		s.embedded.Close()
	}
	if s.ownDir {
		_ = os.RemoveAll(s.workDir)
	}
}

func (s *run) stopScheduler() error {
	if s.sched == nil {
		return nil
	}
	err := s.sched.Stop()
	s.sched = nil
	return err
}

func (s *run) setup(ctx context.Context) error {
	cfg := s.cfg
	s.workDir = cfg.WorkDir
	if s.workDir == "" {
		d, err := os.MkdirTemp("", "gpusched-sim-")
		if err != nil {
			return err
		}
		s.workDir, s.ownDir = d, true
	}
	s.etcdEndpoints = cfg.EtcdEndpoints
	if len(s.etcdEndpoints) == 0 {
		s.progress("starting embedded etcd in %s (fsync %v)", filepath.Join(s.workDir, "etcd"), !cfg.EtcdNoFsync)
		srv, err := embedetcd.Start(embedetcd.Config{Dir: filepath.Join(s.workDir, "etcd"), NoFsync: cfg.EtcdNoFsync})
		if err != nil {
			return err
		}
		s.embedded = srv
		s.etcdEndpoints = []string{srv.Endpoint}
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: s.etcdEndpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return fmt.Errorf("sim: etcd client: %w", err)
	}
	s.etcd = cli
	if n, err := s.etcd.Get(ctx, cfg.Prefix+"/", clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil {
		return fmt.Errorf("sim: etcd: %w", err)
	} else if n.Count > 0 {
		return fmt.Errorf("sim: etcd already holds %d keys under %s; use an empty cluster or another --prefix", n.Count, cfg.Prefix)
	}
	s.schedCfg = ReplicaConfig{
		EtcdEndpoints: s.etcdEndpoints, Prefix: cfg.Prefix, Listen: "127.0.0.1:0",
		SessionTTL: cfg.SessionTTL, HeartbeatInterval: cfg.HeartbeatInterval, NodeLostAfter: cfg.NodeLostAfter,
		LogLevel: cfg.SchedulerLogLevel, HeapBudget: cfg.SchedulerHeapBudget,
	}
	t0 := time.Now()
	if err := s.startScheduler(); err != nil {
		return err
	}
	s.schedCfg.Listen = s.sched.Addr() // a replacement reuses the address
	s.rep.Scheduler.Mode = "in-process"
	if !s.sched.InProcess() {
		s.rep.Scheduler.Mode = "child process"
	}
	s.cl, err = client.New(ctx, client.Config{Endpoints: []string{s.sched.Addr()}, CallTimeout: 2 * time.Minute, AttemptTimeout: 2 * time.Minute})
	if err != nil {
		return err
	}
	if err := s.waitServing(ctx, s.cfg.PhaseTimeout); err != nil {
		return err
	}
	s.rep.Setup.SchedulerStart = ms(time.Since(t0))
	s.startRSSSampler()

	s.progress("starting %d hollow agents (%d per connection, telemetry %g Hz)", cfg.Nodes, cfg.AgentsPerConn, cfg.TelemetryHz)
	t0 = time.Now()
	s.fleet, err = StartFleet(FleetConfig{
		Targets: []string{s.sched.Addr()}, Nodes: cfg.Nodes, GPUModel: cfg.GPUModel,
		AgentsPerConn: cfg.AgentsPerConn, TelemetryHz: cfg.TelemetryHz, Observer: s.tracker,
	})
	if err != nil {
		return err
	}
	if err := s.waitFor(ctx, "every agent to be welcomed", func() (bool, string) {
		n := s.fleet.Connected()
		return n == cfg.Nodes, fmt.Sprintf("%d/%d connected", n, cfg.Nodes)
	}); err != nil {
		return err
	}
	s.rep.Setup.AllAgentsWelcomed = ms(time.Since(t0))
	s.progress("all %d agents welcomed in %s", cfg.Nodes, s.rep.Setup.AllAgentsWelcomed)
	return nil
}

func (s *run) startScheduler() error {
	s.replicas++
	c := s.schedCfg
	c.Name = fmt.Sprintf("sim-scheduler-%d", s.replicas)
	if !s.cfg.SchedulerProcess {
		r, err := startInproc(c)
		if err != nil {
			return err
		}
		s.sched = r
		return nil
	}
	exe := s.cfg.Executable
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return err
		}
	}
	r, err := startChild(exe, c, filepath.Join(s.workDir, "logs", c.Name+".log"))
	if err != nil {
		return err
	}
	s.sched = r
	s.progress("%s: pid %d, gRPC %s, pprof and trace at http://%s/debug/pprof/", c.Name, r.PID(), r.Addr(), r.debug)
	return nil
}

// waitServing waits until the replica answers a leader-only read: it
// leads and has loaded its state.
func (s *run) waitServing(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	last := time.Now()
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := s.cl.Get(cctx, "1")
		cancel()
		if err == nil || errors.Is(err, client.ErrNotFound) {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if time.Since(last) > 10*time.Second {
			s.progress("  waiting for the scheduler to serve: %v", err)
			last = time.Now()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("sim: scheduler not serving after %s: %w", timeout, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitFor polls cond every 10 ms until it holds or the phase times out.
func (s *run) waitFor(ctx context.Context, what string, cond func() (bool, string)) error {
	deadline := time.Now().Add(s.cfg.PhaseTimeout)
	last := time.Now()
	for {
		ok, state := cond()
		if ok {
			return nil
		}
		if time.Since(last) > 10*time.Second {
			s.progress("  waiting for %s: %s", what, state)
			last = time.Now()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("sim: timed out after %s waiting for %s: %s", s.cfg.PhaseTimeout, what, state)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// startRSSSampler records the scheduler process's peak RSS every 250 ms.
func (s *run) startRSSSampler() {
	pid := s.sched.PID()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				if rss, _ := readRSS(pid); rss > 0 {
					s.rssMu.Lock()
					s.rssPeak = max(s.rssPeak, rss)
					s.rssMu.Unlock()
				}
			}
		}
	}()
	s.stopRSS = func() { close(stop); <-done; s.stopRSS = nil }
}

func (s *run) peakRSS() uint64 {
	s.rssMu.Lock()
	defer s.rssMu.Unlock()
	return s.rssPeak
}

// cpu is CPU seconds used so far by the scheduler process and this one.
func (s *run) cpu() (sched, self float64) {
	self = cpuSeconds(os.Getpid())
	if s.sched != nil && !s.sched.InProcess() {
		sched = cpuSeconds(s.sched.PID())
	}
	return sched, self
}

func (s *run) openPhase(ctx context.Context) error {
	cfg := s.cfg
	jobs := int(cfg.OpenRate * cfg.OpenDuration.Seconds())
	busy := cfg.OpenRate * meanNodes(cfg.Mix) * (cfg.OpenMinRun + cfg.OpenMaxRun).Seconds() / 2
	s.progress("open phase: %d jobs at %g/s (open loop, %d per call), mix %s, run %s-%s: ~%.0f of %d nodes busy",
		jobs, cfg.OpenRate, cfg.OpenBatch, FormatMix(cfg.Mix), cfg.OpenMinRun, cfg.OpenMaxRun, busy, cfg.Nodes)
	if _, err := s.sched.Stats(true); err != nil {
		return err
	}
	if cfg.OpenCPUProfile != "" {
		if err := s.sched.StartCPUProfile(); err != nil {
			return err
		}
	}
	var simProf *cpuProfiler
	if cfg.OpenSimCPUProfile != "" && !s.sched.InProcess() {
		simProf = &cpuProfiler{}
		if err := simProf.start(); err != nil {
			return err
		}
	}
	sc0, self0 := s.cpu()
	t0 := time.Now()
	res := Generate(ctx, LoadConfig{
		Client: s.cl, Phase: PhaseOpen, Rate: cfg.OpenRate, Jobs: jobs, Batch: cfg.OpenBatch,
		Concurrency: cfg.OpenConcurrency, Mix: cfg.Mix, MinRun: cfg.OpenMinRun, MaxRun: cfg.OpenMaxRun,
		Tenants: cfg.Tenants, GPUModel: cfg.GPUModel, Seed: 1, KeepIDs: cfg.CheckInvariants,
	})
	s.accepted = append(s.accepted, res.IDs...)
	s.progress("  submitted %d, accepted %d (%.0f/s), call p99 %s, generator lag max %s",
		res.Submitted, res.Accepted, res.AcceptedPerSec, res.Call.P99, res.MaxLag)
	if res.Accepted < res.Submitted {
		s.progress("  not accepted: %d call errors (%s), %d rejected (%s)", res.CallErrors, res.FirstError, res.Rejected, res.FirstRejection)
	}
	err := s.waitFor(ctx, "every open-phase job to be placed", func() (bool, string) {
		n := s.tracker.Placed(PhaseOpen)
		return n >= res.Accepted, fmt.Sprintf("%d/%d placed", n, res.Accepted)
	})
	if cfg.OpenCPUProfile != "" {
		if perr := writeFile(cfg.OpenCPUProfile, s.sched.StopCPUProfile); perr != nil && err == nil {
			err = fmt.Errorf("sim: cpu profile: %w", perr)
		}
	}
	if simProf != nil {
		if perr := writeFile(cfg.OpenSimCPUProfile, simProf.stop); perr != nil && err == nil {
			err = perr
		}
	}
	if err != nil {
		return err
	}
	wall := time.Since(t0)
	sc1, self1 := s.cpu()
	st, err := s.sched.Stats(true)
	if err != nil {
		return err
	}
	ts := s.tracker.stats(PhaseOpen)
	p := &PhaseReport{
		Load: res, Placed: ts.placed, NodesPlaced: ts.nodes, Latency: ts.latency, Scheduler: st,
		Wall: ms(wall), SchedulerCPU: sc1 - sc0, SimCPU: self1 - self0,
	}
	if d := ts.last.Sub(ts.first); d > 0 {
		p.PlacementSeconds = d.Seconds()
		p.PlacementsPerSec = float64(ts.placed) / d.Seconds()
	}
	p.PeakPlacementsPerSec = s.tracker.peakRate(ts.first, ts.last, time.Second)
	s.rep.Open = p
	s.progress("  placed %d (%.0f/s); submit→StartLease %s; placement cycle %s", ts.placed, p.PlacementsPerSec, ts.latency, st.Engine.Cycle)
	if cfg.LatencyFile != "" {
		return writeFile(cfg.LatencyFile, func(w io.Writer) error { return s.tracker.WriteLatencies(w, PhaseOpen) })
	}
	return nil
}

// queue pauses or resumes a queue.
func (s *run) queue(ctx context.Context, name string, pause bool) error {
	return s.cl.QueueService(ctx, func(ctx context.Context, q pb.QueueServiceClient) error {
		var err error
		if pause {
			_, err = q.PauseQueue(ctx, &pb.PauseQueueRequest{Name: name})
		} else {
			_, err = q.ResumeQueue(ctx, &pb.ResumeQueueRequest{Name: name})
		}
		return err
	})
}

// queueBurst creates the burst's queue, paused, and fills it.
func (s *run) queueBurst(ctx context.Context) (LoadResult, error) {
	cfg := s.cfg
	err := s.cl.QueueService(ctx, func(ctx context.Context, q pb.QueueServiceClient) error {
		_, err := q.CreateQueue(ctx, &pb.CreateQueueRequest{Queue: &pb.Queue{Name: burstQueue, Priority: 100, Weight: 1, Paused: true}})
		return err
	})
	if err != nil {
		return LoadResult{}, fmt.Errorf("sim: create queue %s: %w", burstQueue, err)
	}
	res := Generate(ctx, LoadConfig{
		Client: s.cl, Phase: PhaseBurst, Jobs: cfg.BurstJobs, Batch: cfg.BacklogBatch,
		Concurrency: cfg.BacklogConcurrency, Mix: []SizeClass{{Weight: 1, Min: 1, Max: 1}},
		MinRun: cfg.BurstRun, MaxRun: cfg.BurstRun, Queue: burstQueue,
		Tenants: cfg.Tenants, GPUModel: cfg.GPUModel, Seed: 3, KeepIDs: cfg.CheckInvariants,
	})
	s.accepted = append(s.accepted, res.IDs...)
	if res.Accepted == 0 {
		return res, fmt.Errorf("sim: no burst job accepted: %s%s", res.FirstError, res.FirstRejection)
	}
	return res, nil
}

// burst releases the queued burst onto the idle cluster and measures it
// until every burst job is placed, then waits until they have all ended.
func (s *run) burst(ctx context.Context, load LoadResult) error {
	if _, err := s.sched.Stats(true); err != nil {
		return err
	}
	sc0, self0 := s.cpu()
	t0 := time.Now()
	if err := s.queue(ctx, burstQueue, false); err != nil {
		return fmt.Errorf("sim: resume queue %s: %w", burstQueue, err)
	}
	s.progress("  burst: queue %s resumed: placing %d one-node jobs with %d queued behind them", burstQueue, load.Accepted, s.rep.Backlog.Load.Accepted)
	if err := s.waitFor(ctx, "every burst job to be placed", func() (bool, string) {
		n := s.tracker.Placed(PhaseBurst)
		return n >= load.Accepted, fmt.Sprintf("%d/%d placed", n, load.Accepted)
	}); err != nil {
		return err
	}
	sc1, self1 := s.cpu()
	st, err := s.sched.Stats(true)
	if err != nil {
		return err
	}
	ts := s.tracker.stats(PhaseBurst)
	p := &PhaseReport{Load: load, Placed: ts.placed, NodesPlaced: ts.nodes, Scheduler: st,
		Wall: ms(time.Since(t0)), SchedulerCPU: sc1 - sc0, SimCPU: self1 - self0}
	if d := ts.last.Sub(t0); d > 0 {
		p.PlacementSeconds = d.Seconds()
		p.PlacementsPerSec = float64(ts.placed) / d.Seconds()
	}
	s.rep.Burst = p
	s.progress("  burst: placed %d in %s: %.0f placements/s; placement cycle %s; commit %s",
		ts.placed, ms(ts.last.Sub(t0)), p.PlacementsPerSec, st.Engine.Cycle, st.Commit.Commit)
	return s.waitFor(ctx, "the burst's jobs to end", func() (bool, string) {
		n := s.fleet.Held()
		return n == 0, fmt.Sprintf("%d leases held", n)
	})
}

func (s *run) backlogPhase(ctx context.Context) error {
	cfg := s.cfg
	s.progress("backlog phase: pausing queue default, queueing %d jobs (%d per SubmitBatch, %d calls in flight)",
		cfg.BacklogJobs, cfg.BacklogBatch, cfg.BacklogConcurrency)
	if err := s.queue(ctx, "default", true); err != nil {
		return fmt.Errorf("sim: pause queue: %w", err)
	}
	if _, err := s.sched.Stats(true); err != nil {
		return err
	}
	sc0, self0 := s.cpu()
	res := Generate(ctx, LoadConfig{
		Client: s.cl, Phase: PhaseBacklog, Jobs: cfg.BacklogJobs, Batch: cfg.BacklogBatch,
		Concurrency: cfg.BacklogConcurrency, Mix: cfg.Mix, MinRun: cfg.BacklogMinRun, MaxRun: cfg.BacklogMaxRun,
		Tenants: cfg.Tenants, GPUModel: cfg.GPUModel, Seed: 2, KeepIDs: cfg.CheckInvariants,
	})
	s.accepted = append(s.accepted, res.IDs...)
	sc1, self1 := s.cpu()
	queued, err := s.sched.Stats(true)
	if err != nil {
		return err
	}
	p := &PhaseReport{Load: res, Queued: &queued, QueueSchedulerCPU: sc1 - sc0, QueueSimCPU: self1 - self0}
	s.rep.Backlog = p
	s.progress("  accepted %d of %d (%.0f/s); scheduler RSS %s with them queued",
		res.Accepted, res.Submitted, res.AcceptedPerSec, mib(queued.RSSBytes))
	if res.Accepted == 0 {
		return fmt.Errorf("sim: no backlog job accepted: %s%s", res.FirstError, res.FirstRejection)
	}
	var burst LoadResult
	if cfg.BurstJobs > 0 {
		var err error
		if burst, err = s.queueBurst(ctx); err != nil {
			return err
		}
		s.progress("  queued %d one-node burst jobs (%s each) in queue %s, ahead of the backlog", burst.Accepted, cfg.BurstRun, burstQueue)
	}
	if cfg.MemProfile != "" {
		if err := writeFile(cfg.MemProfile, s.sched.HeapProfile); err != nil {
			return fmt.Errorf("sim: heap profile: %w", err)
		}
	}
	// Measure the drain from an idle cluster: open-phase jobs finish first.
	if err := s.waitFor(ctx, "the cluster to be idle", func() (bool, string) {
		n := s.fleet.Held()
		return n == 0, fmt.Sprintf("%d leases held", n)
	}); err != nil {
		return err
	}
	if cfg.CPUProfile != "" {
		if err := s.sched.StartCPUProfile(); err != nil {
			return err
		}
	}
	var simProf *cpuProfiler
	if cfg.SimCPUProfile != "" && !s.sched.InProcess() {
		simProf = &cpuProfiler{}
		if err := simProf.start(); err != nil {
			return err
		}
	}
	if cfg.BurstJobs > 0 {
		if err := s.burst(ctx, burst); err != nil {
			return err
		}
	}
	if _, err := s.sched.Stats(true); err != nil {
		return err
	}
	sc0, self0 = s.cpu()
	t0 := time.Now()
	if err := s.queue(ctx, "default", false); err != nil {
		return fmt.Errorf("sim: resume queue: %w", err)
	}
	s.progress("  queue resumed: draining %d jobs", res.Accepted)
	err = s.waitFor(ctx, "every backlog job to be placed", func() (bool, string) {
		n := s.tracker.Placed(PhaseBacklog)
		return n >= res.Accepted, fmt.Sprintf("%d/%d placed", n, res.Accepted)
	})
	sc1, self1 = s.cpu()
	st, serr := s.sched.Stats(true)
	if cfg.CPUProfile != "" {
		if perr := writeFile(cfg.CPUProfile, s.sched.StopCPUProfile); perr != nil && err == nil {
			err = fmt.Errorf("sim: cpu profile: %w", perr)
		}
	}
	if simProf != nil {
		if perr := writeFile(cfg.SimCPUProfile, simProf.stop); perr != nil && err == nil {
			err = perr
		}
	}
	if err != nil {
		return err
	}
	if serr != nil {
		return serr
	}
	ts := s.tracker.stats(PhaseBacklog)
	p.Placed, p.NodesPlaced, p.Scheduler = ts.placed, ts.nodes, st
	p.Wall = ms(time.Since(t0))
	p.SchedulerCPU, p.SimCPU = sc1-sc0, self1-self0
	if d := ts.last.Sub(t0); d > 0 {
		p.PlacementSeconds = d.Seconds()
		p.PlacementsPerSec = float64(ts.placed) / d.Seconds()
	}
	p.PeakPlacementsPerSec = s.tracker.peakRate(t0, ts.last, time.Second)
	s.progress("  placed %d in %.1f s: %.0f placements/s (peak 1 s: %.0f), %.0f nodes/s; placement cycle %s; loop turn %s",
		ts.placed, p.PlacementSeconds, p.PlacementsPerSec, p.PeakPlacementsPerSec,
		float64(ts.nodes)/max(p.PlacementSeconds, 1e-9), st.Engine.Cycle, st.Commit.Turn)
	return nil
}

func writeFile(path string, fn func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := fn(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// verify waits until no job is pending, scheduled or running, then counts
// every job by state.
func (s *run) verify(ctx context.Context) error {
	s.progress("waiting for every job to end")
	active := &pb.JobSelector{States: []pb.JobState{pb.JobState_JOB_STATE_PENDING, pb.JobState_JOB_STATE_SCHEDULED, pb.JobState_JOB_STATE_RUNNING}}
	var lastErr error
	if err := s.waitFor(ctx, "every job to end", func() (bool, string) {
		resp, err := s.cl.List(ctx, &pb.ListJobsRequest{Selector: active, PageSize: 1})
		if err != nil {
			lastErr = err
			return false, err.Error()
		}
		if len(resp.GetJobs()) > 0 {
			j := resp.GetJobs()[0]
			return false, fmt.Sprintf("job %s still %s (%s)", j.GetId(), j.GetState(), j.GetReason())
		}
		return true, ""
	}); err != nil {
		return errors.Join(err, lastErr)
	}
	v := &VerifyReport{States: map[string]int{}}
	token := ""
	for {
		page, err := s.cl.List(ctx, &pb.ListJobsRequest{PageSize: 5000, PageToken: token})
		if err != nil {
			return err
		}
		for _, j := range page.GetJobs() {
			v.Jobs++
			v.States[strings.TrimPrefix(j.GetState().String(), "JOB_STATE_")]++
			if j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED && len(v.NotSucceeded) < 10 {
				v.NotSucceeded = append(v.NotSucceeded, fmt.Sprintf("%s %s: %s", j.GetId(), j.GetState(), j.GetReason()))
			}
		}
		if token = page.GetNextPageToken(); token == "" {
			break
		}
	}
	s.rep.Verify = v
	s.progress("  %d jobs: %v", v.Jobs, v.States)
	return nil
}

func (s *run) etcdStatus(ctx context.Context) error {
	e := &s.rep.Etcd
	e.Endpoints, e.Embedded, e.Fsync = s.etcdEndpoints, s.embedded != nil, s.embedded == nil || !s.cfg.EtcdNoFsync
	for _, ep := range s.etcdEndpoints {
		st, err := s.etcd.Status(ctx, ep)
		if err != nil {
			return fmt.Errorf("sim: etcd status: %w", err)
		}
		e.DBSizeBytes = max(e.DBSizeBytes, st.DbSize)
		e.DBSizeInUseBytes = max(e.DBSizeInUseBytes, st.DbSizeInUse)
		e.Revision = st.Header.GetRevision()
	}
	n, err := s.etcd.Get(ctx, s.cfg.Prefix+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return err
	}
	e.Keys = n.Count
	s.progress("etcd: %d keys under %s, db %s (%s in use), revision %d", e.Keys, s.cfg.Prefix, mib(uint64(e.DBSizeBytes)), mib(uint64(e.DBSizeInUseBytes)), e.Revision)
	return nil
}

// valueBytes is the mean size of a job record in etcd, the value size of
// the ceiling measurement.
func (s *run) valueBytes(ctx context.Context) int {
	if s.valBytes > 0 {
		return s.valBytes
	}
	s.valBytes = 512
	resp, err := s.etcd.Get(ctx, s.cfg.Prefix+"/jobs/", clientv3.WithPrefix(), clientv3.WithLimit(1000))
	if err == nil && len(resp.Kvs) > 0 {
		total := 0
		for _, kv := range resp.Kvs {
			total += len(kv.Value)
		}
		s.valBytes = total / len(resp.Kvs)
	}
	return s.valBytes
}

// coldStart stops the leader and times a fresh replica (same address)
// until it serves reads with its whole state loaded, then until every
// agent is back: first with the agents held back (the rebuild alone),
// then with all of them retrying meanwhile, as real agents do.
func (s *run) coldStart(ctx context.Context) error {
	q, err := s.restart(ctx, true, s.cfg.ColdStartCPUProfile)
	if err != nil {
		return err
	}
	s.rep.ColdStartQuiet = q
	retrying := ""
	if p := s.cfg.ColdStartCPUProfile; p != "" {
		retrying = p + ".retrying"
	}
	c, err := s.restart(ctx, false, retrying)
	if err != nil {
		return err
	}
	s.rep.ColdStart = c
	return nil
}

func (s *run) restart(ctx context.Context, quiet bool, loadProfile string) (*ColdStartReport, error) {
	what := "agents retrying meanwhile"
	if quiet {
		what = "agents held back"
		s.fleet.Hold()
		defer s.fleet.Release()
	}
	s.progress("cold start (%s): stopping the leader", what)
	welcomes := s.fleet.Welcomes()
	if s.stopRSS != nil {
		s.stopRSS()
	}
	t0 := time.Now()
	if err := s.stopScheduler(); err != nil {
		return nil, err
	}
	stopped := time.Since(t0)
	if quiet {
		if err := s.waitFor(ctx, "every agent stream to end", func() (bool, string) {
			n := s.fleet.Connected()
			return n == 0, fmt.Sprintf("%d connected", n)
		}); err != nil {
			return nil, err
		}
	}
	s.schedCfg.LoadCPUProfile = loadProfile
	t1 := time.Now()
	err := s.startScheduler()
	s.schedCfg.LoadCPUProfile = ""
	if err != nil {
		return nil, err
	}
	if err := s.waitServing(ctx, s.cfg.PhaseTimeout); err != nil {
		return nil, err
	}
	c := &ColdStartReport{AgentsRetrying: !quiet, Stop: ms(stopped), ToServe: ms(time.Since(t1))}
	select {
	case li := <-s.sched.Loaded():
		c.Load = li
	case <-time.After(5 * time.Second):
	}
	if rss, _ := readRSS(s.sched.PID()); rss > 0 {
		c.RSSBytes = rss
	}
	if quiet {
		s.fleet.Release()
	}
	if err := s.waitFor(ctx, "every agent to reconnect", func() (bool, string) {
		n := s.fleet.Connected()
		w := s.fleet.Welcomes() - welcomes
		return n == s.cfg.Nodes && w >= int64(s.cfg.Nodes), fmt.Sprintf("%d/%d connected, %d welcomed", n, s.cfg.Nodes, w)
	}); err != nil {
		return nil, err
	}
	c.AllAgentsBack = ms(time.Since(t1))
	s.progress("  stop %s; fresh replica serving in %s (engine load %s: %d jobs, %d nodes, %d leases); all agents back in %s",
		c.Stop, c.ToServe, c.Load.Took, c.Load.Jobs, c.Load.Nodes, c.Load.Leases, c.AllAgentsBack)
	return c, nil
}

func mib(b uint64) string { return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20)) }

// Machine describes where the run happened.
type Machine struct {
	CPUs       int    `json:"cpus"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	CPUModel   string `json:"cpu_model"`
	MemBytes   uint64 `json:"mem_bytes"`
	OS         string `json:"os"`
	Kernel     string `json:"kernel"`
	Go         string `json:"go"`
	LoadAvg    string `json:"loadavg_at_start"`
	LoadAvgEnd string `json:"loadavg_at_end"`
}

func machine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), GOMAXPROCS: runtime.GOMAXPROCS(0), OS: runtime.GOOS + "/" + runtime.GOARCH, Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb uint64
		if _, err := fmt.Sscanf(string(b), "MemTotal: %d kB", &kb); err == nil {
			m.MemBytes = kb << 10
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	m.LoadAvg = loadAvg()
	return m
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}
