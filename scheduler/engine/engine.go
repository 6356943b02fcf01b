package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/placement"
	"github.com/gpusched/gpusched/scheduler/store"
)

// Config configures one term of leadership.
type Config struct {
	Store *store.Store
	// Fence guards every write; its Revision is also the fencing token
	// carried by every command to agents.
	Fence  store.Fence
	Logger *zap.Logger
	// Now is the clock; tests may fake it. Defaults to time.Now.
	Now func() time.Time
	// HeartbeatInterval is what agents are told to use. Default 2s.
	HeartbeatInterval time.Duration
	// MaxHeartbeatsPerSecond bounds the heartbeats of all agents together
	// (each way): past MaxHeartbeatsPerSecond × HeartbeatInterval nodes,
	// agents are told a longer interval, as Nomad stretches its heartbeat
	// TTLs, so a big cluster's idle traffic stays flat. Default 1000 (2,000
	// nodes at 2s; 10,000 nodes get 10s).
	MaxHeartbeatsPerSecond int
	// MaxHeartbeatInterval caps that stretch. Default 10s.
	MaxHeartbeatInterval time.Duration
	// NodeLostAfter: a node whose agent has been disconnected this long is
	// LOST and its lease is ended. Default 30s.
	NodeLostAfter time.Duration
	// KillGrace is the SIGTERM-to-SIGKILL grace given to agents when a
	// lease is stopped (cancel, time limit, failure of another rank).
	// Default 10s.
	KillGrace time.Duration
	// CommitTimeout bounds one batch commit. Default 10s.
	CommitTimeout time.Duration
	// MaxBatch bounds how many events one loop turn applies. Default 4096.
	MaxBatch int
	// Senders is how many goroutines write commands to agent streams
	// (senders.go). Default DefaultSenders.
	Senders int
	// IdempotencyRetention is how long an idempotency key is remembered.
	// Default 48h (the API promises at least 24h).
	IdempotencyRetention time.Duration
	// AgingStep: every AgingStep a job waits adds 1 to its priority, so
	// nothing starves. Default 5m.
	AgingStep time.Duration
	// Telemetry receives every telemetry batch an agent reports (the
	// replica's telemetry hub), with the tenant of the lease the batch
	// names (empty when none). It is called on the agent's receive path,
	// not on the loop, and must not block. Nil drops telemetry.
	Telemetry func(node, tenant string, b *pb.TelemetryBatch)
	// LeaseUsage returns what the telemetry of a lease adds up to; it is
	// called on the loop when the lease ends, and the result is stored in
	// the lease's summary (the hub's TakeLeaseUsage). Nil: summaries hold
	// GPU-hours and event counts only.
	LeaseUsage func(leaseID string) model.TelemetryUsage
	// Metrics observes the loop's timings (scheduler metrics). Nil: none.
	Metrics Observer
}

// Observer receives the engine's timings, for metrics. Its methods are
// called from the loop and must not block.
type Observer interface {
	// ScheduleCycle is the wall time of one placement cycle.
	ScheduleCycle(d time.Duration)
	// SubmitToLease is how long a job waited from its creation to its
	// first lease.
	SubmitToLease(d time.Duration)
	// Commit is the wall time of one batch commit to etcd.
	Commit(d time.Duration)
}

// nopObserver is the Observer of a Config without one.
type nopObserver struct{}

func (nopObserver) ScheduleCycle(time.Duration) {}
func (nopObserver) SubmitToLease(time.Duration) {}
func (nopObserver) Commit(time.Duration)        {}

func (c *Config) setDefaults() {
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.HeartbeatInterval <= 0 {
		c.HeartbeatInterval = 2 * time.Second
	}
	if c.MaxHeartbeatsPerSecond <= 0 {
		c.MaxHeartbeatsPerSecond = 1000
	}
	if c.MaxHeartbeatInterval <= 0 {
		c.MaxHeartbeatInterval = 10 * time.Second
	}
	if c.NodeLostAfter <= 0 {
		c.NodeLostAfter = 30 * time.Second
	}
	if c.KillGrace <= 0 {
		c.KillGrace = 10 * time.Second
	}
	if c.CommitTimeout <= 0 {
		c.CommitTimeout = 10 * time.Second
	}
	if c.MaxBatch <= 0 {
		c.MaxBatch = 4096
	}
	if c.Senders <= 0 {
		c.Senders = DefaultSenders
	}
	if c.IdempotencyRetention <= 0 {
		c.IdempotencyRetention = 48 * time.Hour
	}
	if c.AgingStep <= 0 {
		c.AgingStep = 5 * time.Minute
	}
	if c.Metrics == nil {
		c.Metrics = nopObserver{}
	}
}

// Engine runs one leadership term. Create with New, then call Run once.
type Engine struct {
	cfg Config
	log *zap.Logger

	events chan event
	// stopped is closed when Run returns; callers waiting on replies see it.
	stopped chan struct{}
	// loaded is closed once the term's state is rebuilt from etcd.
	loaded chan struct{}

	mu sync.RWMutex // guards everything below; the loop holds it while applying+committing
	// jobs holds the live jobs by ID: all but the archived ones (ended,
	// see archive.go). order holds every job's Seq, ascending, for listing
	// in ID order. ended lists the jobs that ended this turn, archived
	// once the turn commits.
	jobs    map[string]*model.Job
	order   []uint64
	archive archive
	ended   []*model.Job
	// endedLeases lists leases that ended or got a node's cleanup this
	// turn: archived after the commit once every node is clean.
	endedLeases []*leaseEntry
	nodes       map[string]*nodeEntry
	senders     *senders
	// nodeCount is len(nodes), readable without the lock (heartbeats).
	nodeCount atomic.Int64
	// offline holds the nodes without an agent stream that are not yet
	// LOST, so the lost-node check visits only them, not every node.
	offline map[*nodeEntry]struct{}
	// usage is what each tenant holds in active leases, kept up to date
	// by hold and unhold so a cycle need not count every node (usage.go).
	usage  map[string]placement.Usage
	leases map[string]*leaseEntry
	// tenants and queues are the policy settings; queues always holds
	// model.DefaultQueue.
	tenants map[string]model.Tenant
	queues  map[string]model.Queue
	// idem maps tenant+key to the job it created; idemOrder holds the same
	// records oldest first, for expiry.
	idem      map[string]*model.Idempotency
	idemOrder []*model.Idempotency
	queue     pendingQueue
	jobSeq    uint64
	ready     bool // state loaded
	// rev is the etcd revision memory reflects: the load revision, then
	// that of each commit. Reads report it as their watch cursor.
	rev int64

	// Per-turn accumulators, only touched by the loop.
	changes []store.Change
	// written holds the records of this turn's ended jobs and leases as
	// the commit wrote them, for the archive.
	written struct {
		jobs   map[*model.Job][]byte
		leases map[*model.Lease][]byte
	}
	seqDirty  bool
	outbox    []outMsg
	replies   []func()
	needCycle bool
	// newWork: jobs were submitted since the last cycle; the cycle they
	// ask for is paced (see cyclePacer), unlike needCycle's.
	newWork   bool
	pacer     cyclePacer
	deadlines deadlineHeap
	// cycleBufs and nodeOrder are reused by every placement cycle;
	// nodesChanged says a node's placement view changed since.
	cycleBufs    cycleBufs
	nodeOrder    []*nodeEntry
	nodesChanged bool
}

// outMsg is a command for one agent, sent after the turn commits.
type outMsg struct {
	node string
	msg  *pb.ConnectResponse
}

// New returns an engine for one term.
func New(cfg Config) *Engine {
	cfg.setDefaults()
	e := &Engine{
		cfg:     cfg,
		log:     cfg.Logger,
		events:  make(chan event, 8192),
		stopped: make(chan struct{}),
		loaded:  make(chan struct{}),
		pacer:   newCyclePacer(),
		senders: newSenders(cfg.Senders),
		jobs:    map[string]*model.Job{},
		archive: newArchive(),
		nodes:   map[string]*nodeEntry{},
		offline: map[*nodeEntry]struct{}{},
		usage:   map[string]placement.Usage{},
		leases:  map[string]*leaseEntry{},
		tenants: map[string]model.Tenant{},
		idem:    map[string]*model.Idempotency{},
		queues:  map[string]model.Queue{model.DefaultQueue: {Name: model.DefaultQueue, Weight: 1}},
	}
	e.written.jobs, e.written.leases = map[*model.Job][]byte{}, map[*model.Lease][]byte{}
	return e
}

// Loaded is closed once the engine has rebuilt its state and serves reads.
func (e *Engine) Loaded() <-chan struct{} { return e.loaded }

// heartbeatInterval is what a newly connected agent is told: the
// configured interval, stretched so that all agents together send at most
// MaxHeartbeatsPerSecond, up to MaxHeartbeatInterval.
func (e *Engine) heartbeatInterval() time.Duration {
	stretched := time.Duration(float64(e.nodeCount.Load()) / float64(e.cfg.MaxHeartbeatsPerSecond) * float64(time.Second))
	return max(e.cfg.HeartbeatInterval, min(stretched, e.cfg.MaxHeartbeatInterval))
}

// Token is the fencing token this term stamps on agent commands.
func (e *Engine) Token() int64 { return e.cfg.Fence.Revision }

// event is anything the loop applies. apply runs with e.mu held.
type event interface{ apply(e *Engine) }

// post hands an event to the loop, failing if the term is over.
func (e *Engine) post(ctx context.Context, ev event) error {
	select {
	case e.events <- ev:
		return nil
	case <-e.stopped:
		return model.ErrStopped
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run loads state from etcd and runs the loop until ctx ends or a commit
// fails. It returns nil only when ctx ended.
func (e *Engine) Run(ctx context.Context) (err error) {
	defer close(e.stopped)
	// Agents close first: that ends any Send a sender is blocked in.
	defer e.senders.run(e.cfg.Senders)()
	defer func() { e.closeAgents() }()
	start := e.cfg.Now()
	if err := e.load(ctx); err != nil {
		return err
	}
	close(e.loaded)
	e.log.Info("leader state loaded", zap.Int("jobs", len(e.order)), zap.Int("nodes", len(e.nodes)),
		zap.Int("leases", len(e.leases)+len(e.archive.leases)), zap.Duration("took", e.cfg.Now().Sub(start)),
		zap.Int64("token", e.Token()))

	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		var first event
		select {
		case <-ctx.Done():
			return nil
		case first = <-e.events:
		case <-tick.C:
		case <-e.pacer.C(): // a deferred placement cycle is due
		}
		if err := e.turn(ctx, first); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	}
}

// turn applies first plus whatever else is queued, places, commits, and
// then releases replies and agent commands.
func (e *Engine) turn(ctx context.Context, first event) error {
	e.mu.Lock()
	if first != nil {
		first.apply(e)
	}
drain:
	for n := 1; n < e.cfg.MaxBatch; n++ {
		select {
		case ev := <-e.events:
			ev.apply(e)
		default:
			break drain
		}
	}
	e.checkTimers()
	if now := time.Now(); e.needCycle || (e.newWork && e.pacer.due(now)) {
		e.needCycle, e.newWork = false, false
		e.schedule()
		end := time.Now()
		e.pacer.ran(now, end)
		e.cfg.Metrics.ScheduleCycle(end.Sub(now))
	} else if e.newWork {
		e.pacer.arm(now)
	}
	err := e.commit(ctx)
	if err == nil {
		e.archiveEnded()
		e.archiveEndedLeases()
	}
	e.mu.Unlock()
	if err != nil {
		return err
	}
	for _, r := range e.replies {
		r()
	}
	for _, m := range e.outbox {
		e.send(m)
	}
	e.replies, e.outbox = e.replies[:0], e.outbox[:0]
	return nil
}

// commit writes this turn's changes. Called with e.mu held.
func (e *Engine) commit(ctx context.Context) error {
	if len(e.changes) == 0 && !e.seqDirty {
		return nil
	}
	var seq uint64
	if e.seqDirty {
		seq = e.jobSeq
	}
	cctx, cancel := context.WithTimeout(ctx, e.cfg.CommitTimeout)
	defer cancel()
	start := time.Now()
	rev, err := e.cfg.Store.Commit(cctx, e.cfg.Fence, e.changes, seq)
	e.cfg.Metrics.Commit(time.Since(start))
	if err == nil {
		// Ended records are archived as written, not marshalled again.
		for i := range e.changes {
			c := &e.changes[i]
			if c.Job != nil && c.JobRecord != nil && c.Job.State.Terminal() {
				e.written.jobs[c.Job] = c.JobRecord
			}
			if c.Lease != nil && c.LeaseRecord != nil && !c.Lease.Active {
				e.written.leases[c.Lease] = c.LeaseRecord
			}
		}
	}
	clear(e.changes) // the backing array is reused: hold on to nothing
	e.changes, e.seqDirty = e.changes[:0], false
	if rev > 0 {
		e.rev = rev
	}
	if err != nil {
		// Memory is now ahead of etcd by an unknown amount: end the term so
		// the next one rebuilds from what actually committed.
		e.replies, e.outbox = e.replies[:0], e.outbox[:0]
		if errors.Is(err, store.ErrFenced) {
			return fmt.Errorf("engine: deposed: %w", err)
		}
		return fmt.Errorf("engine: commit failed, ending term: %w", err)
	}
	return nil
}

// persist queues a change for this turn's commit.
func (e *Engine) persist(c store.Change) { e.changes = append(e.changes, c) }

// reply queues fn to run after this turn commits.
func (e *Engine) reply(fn func()) { e.replies = append(e.replies, fn) }

// command queues a message for node's agent, sent after commit.
func (e *Engine) command(node string, msg *pb.ConnectResponse) {
	msg.FencingToken = e.Token()
	e.outbox = append(e.outbox, outMsg{node: node, msg: msg})
}

// Stats counts what the leader holds, for metrics.
type Stats struct {
	// Jobs counts jobs by current state.
	Jobs map[model.JobState]int
	// Nodes counts nodes by state, as clients see it.
	Nodes map[model.NodeState]int
	// ActiveLeases counts leases that have not ended.
	ActiveLeases int
	// AgentsConnected counts nodes whose agent holds a stream to this leader.
	AgentsConnected int
}

// Stats returns the current counts. It scans every job, node and lease
// under the read lock, so it is meant for a metrics scrape, not a hot path.
func (e *Engine) Stats() Stats {
	st := Stats{Jobs: map[model.JobState]int{}, Nodes: map[model.NodeState]int{}}
	e.mu.RLock()
	defer e.mu.RUnlock()
	for _, j := range e.jobs {
		st.Jobs[j.State]++
	}
	for state, n := range e.archive.states {
		if n > 0 {
			st.Jobs[state] += n
		}
	}
	for _, n := range e.nodes {
		st.Nodes[n.view().State]++
		if n.conn != nil {
			st.AgentsConnected++
		}
	}
	for _, l := range e.leases {
		if l.lease.Active {
			st.ActiveLeases++
		}
	}
	return st
}
