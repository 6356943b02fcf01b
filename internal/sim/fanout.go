package sim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"path/filepath"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/gpusched/gpusched/client"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// FanoutConfig configures a telemetry fan-out run (`gpusched sim fanout`):
// hollow agents stream telemetry to the leader, whose hub fans it out to
// subscribers reading StreamTelemetry through the Go SDK. Zero values take
// the defaults of Defaults.
type FanoutConfig struct {
	// Nodes hollow agents of GPUs × GPUModel send a TelemetryBatch of all
	// their GPUs TelemetryHz times a second.
	Nodes         int
	GPUModel      string
	AgentsPerConn int
	TelemetryHz   float64

	// Subscribers are the steps: for each count, that many subscribers
	// (each its own client.Client, so its own connection, and goroutine)
	// stream every node's samples, warm up for Warmup, then are measured
	// for Duration, then hang up before the next step.
	Subscribers []int
	// Fields, when set, asks for these GpuSample fields only; empty asks
	// for all (the dashboard case).
	Fields   []string
	Warmup   time.Duration
	Duration time.Duration

	EtcdEndpoints     []string
	EtcdNoFsync       bool
	Prefix            string
	SchedulerProcess  bool
	Executable        string
	SchedulerLogLevel string
	HeartbeatInterval time.Duration

	// CPUProfile and SimCPUProfile profile the scheduler and this process
	// (agents, subscribers, etcd; process mode only) over each window.
	// With several steps, each file name gets -<n>subs before its
	// extension.
	CPUProfile, SimCPUProfile string
	// MemProfile is the scheduler's heap profile after the last window.
	MemProfile string

	WorkDir      string
	PhaseTimeout time.Duration
	Progress     io.Writer
}

// Defaults fills in zero fields: 2,000 nodes of 8 H100s at 1 Hz, 20
// subscribers, 10 s of warm-up, a 60 s window.
func (c *FanoutConfig) Defaults() {
	if c.Nodes == 0 {
		c.Nodes = 2000
	}
	if c.TelemetryHz == 0 {
		c.TelemetryHz = 1
	}
	if len(c.Subscribers) == 0 {
		c.Subscribers = []int{20}
	}
	if c.Warmup == 0 {
		c.Warmup = 10 * time.Second
	}
	if c.Duration == 0 {
		c.Duration = 60 * time.Second
	}
	if c.PhaseTimeout == 0 {
		c.PhaseTimeout = 5 * time.Minute
	}
}

// FanoutTargetP99 is issue 7's goal for agent → subscriber latency.
const FanoutTargetP99 = 250 * time.Millisecond

// FanoutReport is what a fan-out run measured.
type FanoutReport struct {
	Machine Machine             `json:"machine"`
	Config  FanoutConfigSummary `json:"config"`
	Setup   SetupReport         `json:"setup"`
	Steps   []FanoutStep        `json:"steps"`
	Targets []Target            `json:"targets"`
}

// FanoutConfigSummary is the run's shape.
type FanoutConfigSummary struct {
	Nodes         int     `json:"nodes"`
	GPUsPerNode   int     `json:"gpus_per_node"`
	GPUModel      string  `json:"gpu_model"`
	AgentsPerConn int     `json:"agents_per_conn"`
	TelemetryHz   float64 `json:"telemetry_hz"`
	// OfferedSamplesPerSec is Nodes × GPUs × TelemetryHz.
	OfferedSamplesPerSec float64  `json:"offered_samples_per_sec"`
	Scheduler            string   `json:"scheduler"`
	EtcdEmbedded         bool     `json:"etcd_embedded"`
	Subscribers          []int    `json:"subscribers"`
	Fields               []string `json:"fields,omitempty"`
	Warmup               string   `json:"warmup"`
	Window               string   `json:"window"`
}

// FanoutStep is one subscriber count's window.
type FanoutStep struct {
	Subscribers int `json:"subscribers"`
	// LoadAvg is /proc/loadavg as the window opened.
	LoadAvg string `json:"loadavg_at_window_start"`
	// Snapshot: subscribe → SnapshotComplete, the slowest subscriber, and
	// the samples its snapshot held.
	SnapshotMax     Millis  `json:"snapshot_max_ms"`
	SnapshotSamples int     `json:"snapshot_samples"`
	WindowSeconds   float64 `json:"window_seconds"`
	// SentSamplesPerSec is what the agents sent over the window (batches
	// × GPUs); the offered rate is Nodes × GPUs × Hz.
	SentSamplesPerSec float64 `json:"sent_samples_per_sec"`
	// Received live samples/s per subscriber: the slowest, the mean, the
	// fastest.
	RecvMin  float64 `json:"recv_samples_per_sec_min"`
	RecvMean float64 `json:"recv_samples_per_sec_mean"`
	RecvMax  float64 `json:"recv_samples_per_sec_max"`
	// Latency is the sample's time (stamped by the hollow agent right
	// before it sent the batch) → the subscriber's receive, every live
	// sample of every subscriber in the window (histogram: within 1.6%;
	// max exact). WorstP99 is the highest per-subscriber p99.
	Latency  Percentiles `json:"agent_to_subscriber"`
	WorstP99 Millis      `json:"worst_subscriber_p99_ms"`
	// Dropped: samples the stream said it dropped in the window (sum of
	// Dropped over all subscribers); DroppedTotalMax: the highest
	// dropped_total a stream reported by the window's end.
	Dropped         uint64 `json:"dropped_in_window"`
	DroppedTotalMax uint64 `json:"dropped_total_max"`
	// SchedulerCores is the scheduler process's CPU over the window
	// (/proc/<pid>/stat) ÷ its length (0 in process); SimCores this
	// process's: agents, subscribers and etcd.
	SchedulerCPU      float64 `json:"scheduler_cpu_seconds"`
	SchedulerCores    float64 `json:"scheduler_cores"`
	SimCPU            float64 `json:"sim_cpu_seconds"`
	SimCores          float64 `json:"sim_cores"`
	SchedulerRSSBytes uint64  `json:"scheduler_rss_bytes"`
	// SchedulerHeapBytes (Go heap objects, live and not yet collected) at
	// the window's end and the GC cycles in the window (process mode).
	SchedulerHeapBytes uint64             `json:"scheduler_heap_object_bytes"`
	SchedulerGCCycles  uint64             `json:"scheduler_gc_cycles"`
	PerSubscriber      []SubscriberResult `json:"per_subscriber"`
	Errors             []string           `json:"errors,omitempty"`
}

// SubscriberResult is one subscriber's window.
type SubscriberResult struct {
	Samples      uint64      `json:"samples"`
	Messages     uint64      `json:"messages"`
	PerSec       float64     `json:"samples_per_sec"`
	Latency      Percentiles `json:"agent_to_subscriber"`
	Dropped      uint64      `json:"dropped_in_window"`
	DroppedTotal uint64      `json:"dropped_total"`
}

// RunFanout runs the fan-out benchmark and returns its report. It stops
// everything it started before returning.
func RunFanout(ctx context.Context, fc FanoutConfig) (rep *FanoutReport, err error) {
	fc.Defaults()
	if fc.TelemetryHz <= 0 {
		return nil, errors.New("sim: fanout needs a telemetry rate above 0")
	}
	cfg := Config{
		Nodes: fc.Nodes, GPUModel: fc.GPUModel, AgentsPerConn: fc.AgentsPerConn, TelemetryHz: fc.TelemetryHz,
		EtcdEndpoints: fc.EtcdEndpoints, EtcdNoFsync: fc.EtcdNoFsync, Prefix: fc.Prefix,
		SchedulerProcess: fc.SchedulerProcess, Executable: fc.Executable, SchedulerLogLevel: fc.SchedulerLogLevel,
		HeartbeatInterval: fc.HeartbeatInterval, WorkDir: fc.WorkDir, PhaseTimeout: fc.PhaseTimeout, Progress: fc.Progress,
	}
	cfg.Defaults()
	rep = &FanoutReport{Machine: machine(), Config: FanoutConfigSummary{
		Nodes: cfg.Nodes, GPUsPerNode: 8, GPUModel: cfg.GPUModel, AgentsPerConn: cfg.AgentsPerConn,
		TelemetryHz: cfg.TelemetryHz, OfferedSamplesPerSec: float64(cfg.Nodes*8) * cfg.TelemetryHz,
		Scheduler: summarizeConfig(cfg).Scheduler, EtcdEmbedded: len(cfg.EtcdEndpoints) == 0,
		Subscribers: fc.Subscribers, Fields: fc.Fields, Warmup: fc.Warmup.String(), Window: fc.Duration.String(),
	}}
	s := &run{cfg: cfg, rep: &Report{}, tracker: NewTracker()}
	defer s.cleanup(&err)
	if err := s.setup(ctx); err != nil {
		return rep, err
	}
	rep.Setup = s.rep.Setup
	for _, n := range fc.Subscribers {
		st, err := s.fanoutStep(ctx, fc, n)
		if st != nil {
			rep.Steps = append(rep.Steps, *st)
		}
		if err != nil {
			return rep, err
		}
	}
	if fc.MemProfile != "" {
		if err := writeFile(fc.MemProfile, s.sched.HeapProfile); err != nil {
			return rep, fmt.Errorf("sim: heap profile: %w", err)
		}
	}
	s.fleet.Stop()
	s.fleet = nil
	if err := s.stopScheduler(); err != nil {
		return rep, err
	}
	rep.finish()
	return rep, nil
}

// fanSub is one subscriber: its own client and goroutine, and what it
// measured while the window was open.
type fanSub struct {
	cl       *client.Client
	done     chan struct{}
	snapshot chan struct{} // closed at SnapshotComplete
	err      error         // after done

	mu              sync.Mutex
	measuring       bool
	snapshotSamples int
	snapshotTook    time.Duration
	hist            latHist
	samples, msgs   uint64
	dropped         uint64 // in the window
	droppedTotal    uint64 // the last dropped_total seen
}

func (f *fanSub) receive(start time.Time) func(*pb.StreamTelemetryResponse) error {
	snapshotDone := false
	return func(r *pb.StreamTelemetryResponse) error {
		now := time.Now()
		f.mu.Lock()
		defer f.mu.Unlock()
		if r.GetSnapshot() {
			f.snapshotSamples += len(r.GetSamples())
			if r.GetSnapshotComplete() && !snapshotDone {
				snapshotDone = true
				f.snapshotTook = now.Sub(start)
				close(f.snapshot)
			}
			return nil
		}
		f.droppedTotal = r.GetDroppedTotal()
		if !f.measuring {
			return nil
		}
		f.msgs++
		f.dropped += r.GetDropped()
		for _, x := range r.GetSamples() {
			f.samples++
			f.hist.add(now.Sub(x.GetTime().AsTime()))
		}
		return nil
	}
}

func (f *fanSub) setMeasuring(on bool) {
	f.mu.Lock()
	f.measuring = on
	f.mu.Unlock()
}

// profileName is path, with -<n>subs before its extension when the run
// has several steps.
func profileName(path string, n int, steps int) string {
	if path == "" || steps <= 1 {
		return path
	}
	ext := filepath.Ext(path)
	return fmt.Sprintf("%s-%dsubs%s", strings.TrimSuffix(path, ext), n, ext)
}

func (s *run) fanoutStep(ctx context.Context, fc FanoutConfig, n int) (*FanoutStep, error) {
	st := &FanoutStep{Subscribers: n}
	s.progress("%d subscriber(s): StreamTelemetry of every node (fields: %s), each on its own connection", n, fieldsText(fc.Fields))
	sctx, cancel := context.WithCancel(ctx)
	subs := make([]*fanSub, n)
	defer func() {
		cancel()
		for _, f := range subs {
			if f == nil {
				continue
			}
			<-f.done
			_ = f.cl.Close()
		}
	}()
	req := &pb.StreamTelemetryRequest{Fields: fc.Fields}
	for i := range subs {
		cl, err := client.New(ctx, client.Config{Endpoints: []string{s.sched.Addr()}})
		if err != nil {
			return st, err
		}
		f := &fanSub{cl: cl, done: make(chan struct{}), snapshot: make(chan struct{})}
		subs[i] = f
		go func() {
			defer close(f.done)
			f.err = cl.StreamTelemetry(sctx, req, f.receive(time.Now()))
		}()
	}
	failed := func() error {
		for i, f := range subs {
			select {
			case <-f.done:
				if sctx.Err() == nil {
					return fmt.Errorf("sim: subscriber %d: stream ended: %v", i, f.err)
				}
			default:
			}
		}
		return nil
	}
	if err := s.waitFor(ctx, "every subscriber's snapshot", func() (bool, string) {
		k := 0
		for _, f := range subs {
			select {
			case <-f.snapshot:
				k++
			default:
			}
		}
		if failed() != nil {
			return true, ""
		}
		return k == n, fmt.Sprintf("%d/%d snapshots complete", k, n)
	}); err != nil {
		return st, err
	}
	if err := failed(); err != nil {
		return st, err
	}
	for _, f := range subs {
		f.mu.Lock()
		st.SnapshotMax = max(st.SnapshotMax, ms(f.snapshotTook))
		st.SnapshotSamples = max(st.SnapshotSamples, f.snapshotSamples)
		f.mu.Unlock()
	}
	s.progress("  snapshots complete (slowest %s, %d samples); warming up %s", st.SnapshotMax, st.SnapshotSamples, fc.Warmup)
	if err := sleepCtx(ctx, fc.Warmup); err != nil {
		return st, err
	}
	if err := failed(); err != nil {
		return st, err
	}

	steps := len(fc.Subscribers)
	if fc.CPUProfile != "" {
		if err := s.sched.StartCPUProfile(); err != nil {
			return st, err
		}
	}
	var simProf *cpuProfiler
	if fc.SimCPUProfile != "" && !s.sched.InProcess() {
		simProf = &cpuProfiler{}
		if err := simProf.start(); err != nil {
			return st, err
		}
	}
	for _, f := range subs {
		f.mu.Lock()
		f.measuring = true
		f.mu.Unlock()
	}
	rs0, _ := s.sched.Stats(false)
	st.LoadAvg = loadAvg()
	sent0 := s.fleet.TelemetrySent()
	sc0, self0 := s.cpu()
	t0 := time.Now()
	s.progress("  measuring for %s", fc.Duration)
	err := sleepCtx(ctx, fc.Duration)
	for _, f := range subs {
		f.setMeasuring(false)
	}
	wall := time.Since(t0)
	sc1, self1 := s.cpu()
	sent1 := s.fleet.TelemetrySent()
	if fc.CPUProfile != "" {
		if perr := writeFile(profileName(fc.CPUProfile, n, steps), s.sched.StopCPUProfile); perr != nil && err == nil {
			err = fmt.Errorf("sim: cpu profile: %w", perr)
		}
	}
	if simProf != nil {
		if perr := writeFile(profileName(fc.SimCPUProfile, n, steps), simProf.stop); perr != nil && err == nil {
			err = perr
		}
	}
	if err != nil {
		return st, err
	}
	if rss, _ := readRSS(s.sched.PID()); rss > 0 {
		st.SchedulerRSSBytes = rss
	}
	if rs1, err := s.sched.Stats(false); err == nil && !rs1.InProcess {
		st.SchedulerHeapBytes, st.SchedulerGCCycles = rs1.HeapBytes, rs1.GCCycles-rs0.GCCycles
	}
	sec := wall.Seconds()
	st.WindowSeconds = sec
	st.SentSamplesPerSec = float64(sent1-sent0) * 8 / sec
	st.SchedulerCPU, st.SimCPU = sc1-sc0, self1-self0
	st.SchedulerCores, st.SimCores = st.SchedulerCPU/sec, st.SimCPU/sec
	var all latHist
	st.RecvMin = math.Inf(1)
	for i, f := range subs {
		f.mu.Lock()
		r := SubscriberResult{
			Samples: f.samples, Messages: f.msgs, PerSec: float64(f.samples) / sec,
			Latency: f.hist.percentiles(), Dropped: f.dropped, DroppedTotal: f.droppedTotal,
		}
		all.merge(&f.hist)
		f.mu.Unlock()
		st.PerSubscriber = append(st.PerSubscriber, r)
		st.RecvMin, st.RecvMax = min(st.RecvMin, r.PerSec), max(st.RecvMax, r.PerSec)
		st.RecvMean += r.PerSec / float64(n)
		st.WorstP99 = max(st.WorstP99, r.Latency.P99)
		st.Dropped += r.Dropped
		st.DroppedTotalMax = max(st.DroppedTotalMax, r.DroppedTotal)
		select {
		case <-f.done:
			st.Errors = append(st.Errors, fmt.Sprintf("subscriber %d: stream ended: %v", i, f.err))
		default:
		}
	}
	st.Latency = all.percentiles()
	s.progress("  sent %.0f samples/s; per subscriber %.0f/s (min %.0f); agent → subscriber %s; dropped %d; scheduler %.2f cores, sim %.2f cores",
		st.SentSamplesPerSec, st.RecvMean, st.RecvMin, st.Latency, st.Dropped, st.SchedulerCores, st.SimCores)
	if len(st.Errors) > 0 {
		return st, errors.New("sim: " + strings.Join(st.Errors, "; "))
	}
	return st, nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func fieldsText(fields []string) string {
	if len(fields) == 0 {
		return "all"
	}
	return strings.Join(fields, ",")
}

// finish checks the target at each step.
func (r *FanoutReport) finish() {
	r.Machine.LoadAvgEnd = loadAvg()
	c := r.Config
	for _, st := range r.Steps {
		r.Targets = append(r.Targets, Target{
			Name: fmt.Sprintf("fan-out, %d subscriber(s)", st.Subscribers),
			Goal: fmt.Sprintf("p99 agent → subscriber <= %s", ms(FanoutTargetP99)),
			Measured: fmt.Sprintf("p99 %s (worst subscriber %s), %.0f of %.0f samples/s per subscriber, %d dropped; %d nodes × %d GPUs at %g Hz",
				st.Latency.P99, st.WorstP99, st.RecvMin, st.SentSamplesPerSec, st.Dropped, c.Nodes, c.GPUsPerNode, c.TelemetryHz),
			Met: st.Latency.N > 0 && float64(st.Latency.P99) <= float64(ms(FanoutTargetP99)),
		})
	}
}

// WriteText renders the report as tables.
func (r *FanoutReport) WriteText(w io.Writer) {
	m, c := r.Machine, r.Config
	fmt.Fprintf(w, "machine: %d CPUs (%s), %s RAM, %s, %s, load %s → %s\n", m.CPUs, m.CPUModel, mib(m.MemBytes), m.OS, m.Go, m.LoadAvg, m.LoadAvgEnd)
	etcd := "external"
	if c.EtcdEmbedded {
		etcd = "embedded"
	}
	fmt.Fprintf(w, "cluster: %d hollow nodes × %d %s at %g Hz = %.0f GPU samples/s offered (%d agents per gRPC connection); scheduler %s; etcd %s\n",
		c.Nodes, c.GPUsPerNode, c.GPUModel, c.TelemetryHz, c.OfferedSamplesPerSec, c.AgentsPerConn, c.Scheduler, etcd)
	fmt.Fprintf(w, "subscribers: Go SDK StreamTelemetry, every node, fields %s, one connection each; warm-up %s, window %s; all agents welcomed in %s\n\n",
		fieldsText(c.Fields), c.Warmup, c.Window, r.Setup.AllAgentsWelcomed)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "subs\tsent/s\trecv/s per sub (min)\tp50\tp99\tp99.9\tmax\tworst sub p99\tdropped (total max)\tsched cores\tsim cores\tsched RSS (heap)\tsnapshot\tload\t")
	for _, st := range r.Steps {
		fmt.Fprintf(tw, "%d\t%.0f\t%.0f (%.0f)\t%s\t%s\t%s\t%s\t%s\t%d (%d)\t%.2f\t%.2f\t%s (%s)\t%s\t%s\t\n",
			st.Subscribers, st.SentSamplesPerSec, st.RecvMean, st.RecvMin, st.Latency.P50, st.Latency.P99, st.Latency.P999,
			st.Latency.Max, st.WorstP99, st.Dropped, st.DroppedTotalMax, st.SchedulerCores, st.SimCores,
			mib(st.SchedulerRSSBytes), mib(st.SchedulerHeapBytes),
			st.SnapshotMax, st.LoadAvg)
	}
	_ = tw.Flush()
	writeTargets(w, r.Targets)
	for _, st := range r.Steps {
		for _, e := range st.Errors {
			fmt.Fprintln(w, "error:", e)
		}
	}
}

// latHist is a log-linear histogram of durations in microseconds: exact
// below 128 µs, then 64 buckets per power of two (a bucket's midpoint is
// within 0.8% of any value in it). Max and mean are exact.
type latHist struct {
	counts []uint64
	n      uint64
	sum    time.Duration
	max    time.Duration
}

const histSub = 64

func histIndex(us int64) int {
	if us < 2*histSub {
		return int(max(us, 0))
	}
	e := bits.Len64(uint64(us)) - 7 // us>>e is in [64, 128)
	return 2*histSub + (e-1)*histSub + int(us>>e) - histSub
}

// histValue is the midpoint of bucket i.
func histValue(i int) time.Duration {
	if i < 2*histSub {
		return time.Duration(i) * time.Microsecond
	}
	e := (i-2*histSub)/histSub + 1
	m := int64((i-2*histSub)%histSub + histSub)
	return time.Duration(m<<e+int64(1)<<(e-1)) * time.Microsecond
}

func (h *latHist) add(d time.Duration) {
	d = max(d, 0)
	i := histIndex(int64(d / time.Microsecond))
	if i >= len(h.counts) {
		h.counts = append(h.counts, make([]uint64, i+1-len(h.counts))...)
	}
	h.counts[i]++
	h.n++
	h.sum += d
	h.max = max(h.max, d)
}

func (h *latHist) merge(o *latHist) {
	if len(o.counts) > len(h.counts) {
		h.counts = append(h.counts, make([]uint64, len(o.counts)-len(h.counts))...)
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.sum += o.sum
	h.max = max(h.max, o.max)
}

// percentiles are nearest-rank percentiles, each a bucket's midpoint
// (capped at the exact max).
func (h *latHist) percentiles() Percentiles {
	if h.n == 0 {
		return Percentiles{}
	}
	rank := func(p float64) Millis {
		want := uint64(math.Ceil(p * float64(h.n)))
		var cum uint64
		for i, c := range h.counts {
			cum += c
			if cum >= want && c > 0 {
				return ms(min(histValue(i), h.max))
			}
		}
		return ms(h.max)
	}
	return Percentiles{
		N: int(h.n), P50: rank(0.50), P90: rank(0.90), P99: rank(0.99), P999: rank(0.999),
		Max: ms(h.max), Mean: ms(h.sum / time.Duration(h.n)),
	}
}
