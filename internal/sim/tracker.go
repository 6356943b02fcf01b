package sim

import (
	"bufio"
	"fmt"
	"hash/maphash"
	"io"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Environment variables the load generator puts in every job and the
// hollow agents read back from StartLease (which carries the job's env but
// not its create time).
const (
	// EnvDuration is how long the job "runs" on each node, as a Go
	// duration ("750ms"). Without it a command `sleep N` is parsed; else 0.
	EnvDuration = "SIM_DURATION"
	// EnvExitCode is the exit code each node reports; default 0.
	EnvExitCode = "SIM_EXIT_CODE"
	// EnvSubmitNanos is when the load generator meant to submit the job
	// (Unix nanoseconds; open loop, so a generator that fell behind is not
	// hidden), the start of the submit → StartLease latency.
	EnvSubmitNanos = "SIM_SUBMIT_NS"
	// EnvPhase names the phase of the run that submitted the job.
	EnvPhase = "SIM_PHASE"
)

// jobRuntime is how long a StartLease's job runs and how it exits.
func jobRuntime(m *pb.StartLease) (time.Duration, int) {
	env := m.GetEnv()
	code, _ := strconv.Atoi(env[EnvExitCode])
	if s, ok := env[EnvDuration]; ok {
		if d, err := time.ParseDuration(s); err == nil && d >= 0 {
			return d, code
		}
	}
	if c := m.GetCommand(); len(c) == 2 && (c[0] == "sleep" || strings.HasSuffix(c[0], "/sleep")) {
		if f, err := strconv.ParseFloat(c[1], 64); err == nil && f >= 0 {
			return time.Duration(f * float64(time.Second)), code
		}
	}
	return 0, code
}

// binWidth is the resolution of the placement timeline.
const binWidth = 100 * time.Millisecond

// Tracker observes what the hollow agents receive, in the same process as
// the load generator: when every node of a lease has its StartLease it
// records the submit → StartLease latency (to the last node of a gang)
// and counts the placement at the time its first node heard of it (the
// scheduler sends commands only after their commit).
type Tracker struct {
	origin time.Time
	seed   maphash.Seed
	shards [64]trackShard

	mu     sync.Mutex
	phases map[string]*phaseObs
	bins   []int32 // leases placed per binWidth since origin
}

type trackShard struct {
	mu sync.Mutex
	m  map[string]*leaseObs
}

type leaseObs struct {
	need, got int
	submit    time.Time
	phase     string
}

type phaseObs struct {
	placed, nodes int64
	first, last   time.Time
	latencies     []time.Duration
	// jobs is each latency's lease: when it was submitted and to how
	// many nodes, for WriteLatencies.
	jobs []jobObs
}

type jobObs struct {
	submit time.Time
	nodes  int32
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker {
	t := &Tracker{origin: time.Now(), seed: maphash.MakeSeed(), phases: map[string]*phaseObs{}}
	for i := range t.shards {
		t.shards[i].m = map[string]*leaseObs{}
	}
	return t
}

// StartLease implements Observer.
func (t *Tracker) StartLease(_ string, m *pb.StartLease, at time.Time) {
	sh := &t.shards[maphash.String(t.seed, m.GetLeaseId())%uint64(len(t.shards))]
	sh.mu.Lock()
	o := sh.m[m.GetLeaseId()]
	first := o == nil
	if first {
		o = &leaseObs{need: max(1, len(m.GetNodes())), phase: m.GetEnv()[EnvPhase]}
		if ns, err := strconv.ParseInt(m.GetEnv()[EnvSubmitNanos], 10, 64); err == nil {
			o.submit = time.Unix(0, ns)
		}
		sh.m[m.GetLeaseId()] = o
	}
	o.got++
	done := o.got >= o.need
	if done {
		delete(sh.m, m.GetLeaseId())
	}
	sh.mu.Unlock()
	if !first && !done {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.phaseLocked(o.phase)
	if first {
		p.placed++
		p.nodes += int64(o.need)
		if p.first.IsZero() {
			p.first = at
		}
		p.last = at
		bin := int(at.Sub(t.origin) / binWidth)
		for len(t.bins) <= bin {
			t.bins = append(t.bins, 0)
		}
		t.bins[max(0, bin)]++
	}
	if done && !o.submit.IsZero() {
		p.latencies = append(p.latencies, at.Sub(o.submit))
		p.jobs = append(p.jobs, jobObs{submit: o.submit, nodes: int32(o.need)})
	}
}

func (t *Tracker) phaseLocked(name string) *phaseObs {
	p := t.phases[name]
	if p == nil {
		p = &phaseObs{}
		t.phases[name] = p
	}
	return p
}

// Placed is how many leases of phase have been placed so far.
func (t *Tracker) Placed(phase string) int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.phaseLocked(phase).placed
}

// phaseStats is what the tracker saw of one phase.
type phaseStats struct {
	placed, nodes int64
	first, last   time.Time
	latency       Percentiles
}

func (t *Tracker) stats(phase string) phaseStats {
	t.mu.Lock()
	p := t.phaseLocked(phase)
	s := phaseStats{placed: p.placed, nodes: p.nodes, first: p.first, last: p.last}
	ds := append([]time.Duration(nil), p.latencies...)
	t.mu.Unlock()
	s.latency = summarize(ds)
	return s
}

// WriteLatencies writes every submit → StartLease latency of phase as
// CSV, in submission order: seconds since the phase's first submission,
// latency in milliseconds, and nodes (the latency is to the gang's last).
// Plotted against time, it shows when the slow ones came: a collector's
// mark phase, say, delays every job submitted during it.
func (t *Tracker) WriteLatencies(w io.Writer, phase string) error {
	t.mu.Lock()
	p := t.phaseLocked(phase)
	idx := make([]int, len(p.jobs))
	for i := range idx {
		idx[i] = i
	}
	jobs, lat := slices.Clone(p.jobs), slices.Clone(p.latencies)
	t.mu.Unlock()
	sort.Slice(idx, func(a, b int) bool { return jobs[idx[a]].submit.Before(jobs[idx[b]].submit) })
	bw := bufio.NewWriter(w)
	fmt.Fprintln(bw, "submitted_s,latency_ms,nodes")
	for _, i := range idx { // idx[0] exists: the loop runs only if some do
		fmt.Fprintf(bw, "%.4f,%.3f,%d\n", jobs[i].submit.Sub(jobs[idx[0]].submit).Seconds(),
			float64(lat[i].Microseconds())/1000, jobs[i].nodes)
	}
	return bw.Flush()
}

// peakRate is the highest number of placements in any window of width w
// (a multiple of binWidth) between from and to, per second; 0 when from
// and to are less than w apart.
func (t *Tracker) peakRate(from, to time.Time, w time.Duration) float64 {
	if to.Sub(from) < w {
		return 0 // too short to have a window of w
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	lo, hi := int(from.Sub(t.origin)/binWidth), int(to.Sub(t.origin)/binWidth)
	k := max(1, int(w/binWidth))
	best, sum := 0, 0
	for i := max(0, lo); i <= hi && i < len(t.bins); i++ {
		sum += int(t.bins[i])
		if j := i - k; j >= max(0, lo) {
			sum -= int(t.bins[j])
		}
		best = max(best, sum)
	}
	return float64(best) / (time.Duration(k) * binWidth).Seconds()
}
