package sim

import (
	"bytes"
	"context"
	"sync"
	"time"

	etcdpb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/gpusched/gpusched/scheduler/store"
)

// commitTap intercepts the scheduler's etcd client to time its commits
// from the outside, without touching the engine. store.CommitOf names the
// commit each transaction belongs to, which groups a loop turn's
// transactions exactly. So, per turn that wrote something:
//
//	commit  = first txn start → last txn end (time inside etcd)
//	turn    = end of the previous commit → end of this one (the loop's
//	          cycle: apply events, place, commit, send)
//	outside = end of the previous commit → start of this one (apply,
//	          placement, marshalling, sending, and waiting for events)
//
// Under sustained load the loop never waits for events, and turn is the
// loop's whole cycle; the placement cycle inside it comes from the
// engine's Observer (loopRecorder). Turns that write nothing are not seen.
type commitTap struct {
	leasesKey []byte
	origin    time.Time

	mu         sync.Mutex
	lastCommit uint64 // store.CommitOf the last transaction
	txns       []txnRec
}

type txnRec struct {
	start, end time.Duration // since origin
	ops        int32
	leasePuts  int32
	newCommit  bool
}

func newCommitTap(prefix string) *commitTap {
	return &commitTap{leasesKey: []byte(prefix + "/leases/"), origin: time.Now()}
}

// interceptor returns the tap as a gRPC client interceptor for the
// scheduler's etcd client: it sees each transaction as sent on the wire.
func (t *commitTap) interceptor() grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		txn, ok := req.(*etcdpb.TxnRequest)
		commit, scheduler := store.CommitOf(ctx)
		if !ok || !scheduler {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		leasePuts := 0
		for _, op := range txn.Success {
			if p := op.GetRequestPut(); p != nil && bytes.HasPrefix(p.Key, t.leasesKey) {
				leasePuts++
			}
		}
		start := time.Since(t.origin)
		err := invoker(ctx, method, req, reply, cc, opts...)
		end := time.Since(t.origin)
		t.mu.Lock()
		defer t.mu.Unlock()
		newCommit := t.lastCommit != commit
		t.lastCommit = commit
		t.txns = append(t.txns, txnRec{start: start, end: end, ops: int32(len(txn.Success)), leasePuts: int32(leasePuts), newCommit: newCommit})
		return err
	}
}

// CommitStats is what the tap saw over a window.
type CommitStats struct {
	Window     Millis  `json:"window_ms"`
	Txns       int     `json:"txns"`
	Commits    int     `json:"commits"`
	Ops        int64   `json:"ops"`
	LeasePuts  int64   `json:"lease_puts"`
	KeysPerSec float64 `json:"keys_per_sec"`
	// BusyFraction is the share of the window the loop spent waiting on
	// etcd commits.
	BusyFraction float64 `json:"etcd_busy_fraction"`
	OpsPerTxn    float64 `json:"mean_ops_per_txn"`
	// Txn is one transaction's latency; Commit a whole turn's commit;
	// Turn the interval between the ends of consecutive commits (the
	// scheduling cycle under load); Outside the loop's time between
	// commits.
	Txn     Percentiles `json:"txn"`
	Commit  Percentiles `json:"commit"`
	Turn    Percentiles `json:"turn"`
	Outside Percentiles `json:"outside"`
}

// stats summarizes the transactions since the last reset; with reset, it
// starts a new window.
func (t *commitTap) stats(windowStart time.Time, reset bool) CommitStats {
	t.mu.Lock()
	txns := t.txns
	if reset {
		t.txns = nil
	} else {
		txns = append([]txnRec(nil), txns...)
	}
	t.mu.Unlock()
	window := time.Since(windowStart)
	s := CommitStats{Window: ms(window), Txns: len(txns)}
	var txnD, commitD, turnD, outsideD []time.Duration
	var busy time.Duration
	var cur *struct{ start, end time.Duration }
	var prevEnd time.Duration
	havePrev := false
	flush := func() {
		if cur == nil {
			return
		}
		commitD = append(commitD, cur.end-cur.start)
		busy += cur.end - cur.start
		if havePrev {
			turnD = append(turnD, cur.end-prevEnd)
			outsideD = append(outsideD, cur.start-prevEnd)
		}
		prevEnd, havePrev = cur.end, true
		s.Commits++
	}
	for _, x := range txns {
		s.Ops += int64(x.ops)
		s.LeasePuts += int64(x.leasePuts)
		txnD = append(txnD, x.end-x.start)
		if x.newCommit || cur == nil {
			flush()
			cur = &struct{ start, end time.Duration }{x.start, x.end}
		} else {
			cur.end = x.end
		}
	}
	flush()
	s.KeysPerSec = rate(s.Ops, window)
	if window > 0 {
		s.BusyFraction = busy.Seconds() / window.Seconds()
	}
	if s.Txns > 0 {
		s.OpsPerTxn = float64(s.Ops) / float64(s.Txns)
	}
	s.Txn, s.Commit, s.Turn, s.Outside = summarize(txnD), summarize(commitD), summarize(turnD), summarize(outsideD)
	return s
}

// loopRecorder is the engine's Observer in the sim's replica: it keeps
// every placement cycle's and commit's wall time, and each job's wait from
// creation to its first lease, as the engine measures them.
type loopRecorder struct {
	mu                              sync.Mutex
	cycles, commits, leads, submits []time.Duration
}

// submitMethod is the RPC whose server-side time the recorder keeps.
const submitMethod = "/gpusched.v1.JobService/SubmitJob"

// RPCDone records the server-side time of each successful SubmitJob: the
// part of the SDK's call the scheduler's process accounts for.
func (r *loopRecorder) RPCDone(method string, code codes.Code, took time.Duration) {
	if method == submitMethod && code == codes.OK {
		r.add(&r.submits, took)
	}
}
func (r *loopRecorder) TelemetryReceived(int)   {}
func (r *loopRecorder) TelemetryDropped(uint64) {}

func (r *loopRecorder) ScheduleCycle(d time.Duration) { r.add(&r.cycles, d) }
func (r *loopRecorder) Commit(d time.Duration)        { r.add(&r.commits, d) }
func (r *loopRecorder) SubmitToLease(d time.Duration) { r.add(&r.leads, d) }

func (r *loopRecorder) add(s *[]time.Duration, d time.Duration) {
	r.mu.Lock()
	*s = append(*s, d)
	r.mu.Unlock()
}

// EngineStats is what the engine itself timed over a window.
type EngineStats struct {
	// Cycle is one placement cycle (engine.schedule: snapshot, policy
	// order, placement, reasons, grants), the engine's
	// gpusched_schedule_cycle_duration_seconds.
	Cycle Percentiles `json:"placement_cycle"`
	// CycleBusy is the share of the window spent in placement cycles.
	CycleBusy float64 `json:"placement_cycle_busy_fraction"`
	// Commit is one turn's commit to etcd, as the engine times it.
	Commit Percentiles `json:"commit"`
	// SubmitToLease is creation → first lease, by the leader's clock.
	SubmitToLease Percentiles `json:"submit_to_lease"`
	// SubmitRPC is a SubmitJob call as the scheduler's gRPC server timed
	// it (interceptors in to response out).
	SubmitRPC Percentiles `json:"submit_rpc"`
}

func (r *loopRecorder) stats(window time.Duration, reset bool) EngineStats {
	r.mu.Lock()
	cycles, commits, leads, submits := r.cycles, r.commits, r.leads, r.submits
	if reset {
		r.cycles, r.commits, r.leads, r.submits = nil, nil, nil, nil
	} else {
		cycles = append([]time.Duration(nil), cycles...)
		commits = append([]time.Duration(nil), commits...)
		leads = append([]time.Duration(nil), leads...)
		submits = append([]time.Duration(nil), submits...)
	}
	r.mu.Unlock()
	var busy time.Duration
	for _, d := range cycles {
		busy += d
	}
	s := EngineStats{Cycle: summarize(cycles), Commit: summarize(commits), SubmitToLease: summarize(leads), SubmitRPC: summarize(submits)}
	if window > 0 {
		s.CycleBusy = busy.Seconds() / window.Seconds()
	}
	return s
}
