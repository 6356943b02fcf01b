package sim

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gpusched/gpusched/client"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// SizeClass is one part of the job size mix: Weight of the jobs ask for
// Min..Max nodes (uniform).
type SizeClass struct {
	Weight   float64
	Min, Max int
}

// DefaultMix is 70% 1-node jobs, 20% gangs of 2-4 and 10% of 8-32.
var DefaultMix = []SizeClass{{70, 1, 1}, {20, 2, 4}, {10, 8, 32}}

// ParseMix parses "70:1,20:2-4,10:8-32" (weight:nodes or weight:min-max).
func ParseMix(s string) ([]SizeClass, error) {
	var mix []SizeClass
	for _, part := range strings.Split(s, ",") {
		w, r, ok := strings.Cut(strings.TrimSpace(part), ":")
		if !ok {
			return nil, fmt.Errorf("sim: mix %q: want weight:min[-max]", part)
		}
		weight, err := strconv.ParseFloat(w, 64)
		if err != nil || weight <= 0 {
			return nil, fmt.Errorf("sim: mix %q: bad weight", part)
		}
		lo, hi, _ := strings.Cut(r, "-")
		if hi == "" {
			hi = lo
		}
		a, err1 := strconv.Atoi(lo)
		b, err2 := strconv.Atoi(hi)
		if err1 != nil || err2 != nil || a < 1 || b < a {
			return nil, fmt.Errorf("sim: mix %q: bad node range", part)
		}
		mix = append(mix, SizeClass{Weight: weight, Min: a, Max: b})
	}
	return mix, nil
}

// FormatMix renders a mix as ParseMix reads it.
func FormatMix(mix []SizeClass) string {
	parts := make([]string, len(mix))
	for i, c := range mix {
		r := strconv.Itoa(c.Min)
		if c.Max != c.Min {
			r += "-" + strconv.Itoa(c.Max)
		}
		parts[i] = strconv.FormatFloat(c.Weight, 'g', -1, 64) + ":" + r
	}
	return strings.Join(parts, ",")
}

// meanNodes is the mean job size of a mix.
func meanNodes(mix []SizeClass) float64 {
	var w, n float64
	for _, c := range mix {
		w += c.Weight
		n += c.Weight * float64(c.Min+c.Max) / 2
	}
	if w == 0 {
		return 1
	}
	return n / w
}

// LoadConfig configures one run of the load generator.
type LoadConfig struct {
	Client *client.Client
	// Phase is put in every job (EnvPhase) and its job set.
	Phase string
	// Rate is the open-loop submission rate in jobs/s: job i is due at
	// start + i/Rate whatever happened to earlier ones. 0: every job is due
	// at once, so only Concurrency bounds the pace (a closed loop).
	Rate float64
	// Jobs to submit in all.
	Jobs int
	// Batch jobs per call: 1 uses Submit, more use SubmitBatch (a batch
	// takes the jobs already due, up to Batch).
	Batch int
	// Concurrency bounds the calls in flight; the generator waits for a
	// free slot and the wait shows in the latency, as the due time is
	// what EnvSubmitNanos records.
	Concurrency int
	Mix         []SizeClass
	// MinRun..MaxRun is each job's run time (uniform).
	MinRun, MaxRun time.Duration
	Tenants        int
	GPUModel       string
	Queue          string
	Seed           uint64
	// KeepIDs keeps the accepted job IDs in the result.
	KeepIDs bool
}

// LoadResult is what the load generator did.
type LoadResult struct {
	Submitted int64 `json:"submitted"`
	Accepted  int64 `json:"accepted"`
	Rejected  int64 `json:"rejected"`
	// CallErrors are calls that failed as a whole (their jobs count as
	// submitted, not accepted).
	CallErrors int64  `json:"call_errors"`
	FirstError string `json:"first_error,omitempty"`
	// FirstRejection is why the first rejected job was rejected.
	FirstRejection string `json:"first_rejection,omitempty"`
	// Nodes the accepted jobs ask for, in all.
	Nodes int64 `json:"nodes_requested"`
	// Seconds from the first call to the last reply.
	Seconds        float64 `json:"seconds"`
	AcceptedPerSec float64 `json:"accepted_per_sec"`
	// MaxLag is how far behind its schedule the generator fell at worst
	// (open loop only).
	MaxLag Millis `json:"max_lag_ms"`
	// Call is the latency of one submit call.
	Call Percentiles `json:"call"`
	IDs  []string    `json:"-"`
}

// Generate submits cfg.Jobs jobs and returns when every call has been
// answered (or ctx ends).
func Generate(ctx context.Context, cfg LoadConfig) LoadResult {
	if cfg.Batch <= 0 {
		cfg.Batch = 1
	}
	cfg.Batch = min(cfg.Batch, client.MaxBatch)
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 64
	}
	if len(cfg.Mix) == 0 {
		cfg.Mix = DefaultMix
	}
	if cfg.Tenants <= 0 {
		cfg.Tenants = 1
	}
	rng := rand.New(rand.NewPCG(cfg.Seed, 0x10ad))
	var totalWeight float64
	for _, c := range cfg.Mix {
		totalWeight += c.Weight
	}
	spec := func(i int, due time.Time) *pb.JobSpec {
		x := rng.Float64() * totalWeight
		c := cfg.Mix[len(cfg.Mix)-1]
		for _, m := range cfg.Mix {
			if x < m.Weight {
				c = m
				break
			}
			x -= m.Weight
		}
		n := c.Min + rng.IntN(c.Max-c.Min+1)
		run := cfg.MinRun
		if cfg.MaxRun > cfg.MinRun {
			run += time.Duration(rng.Int64N(int64(cfg.MaxRun - cfg.MinRun)))
		}
		return &pb.JobSpec{
			Tenant: "tenant-" + strconv.Itoa(rng.IntN(cfg.Tenants)), Nodes: int32(n), GpuModel: cfg.GPUModel,
			Command: []string{"sleep", strconv.FormatFloat(run.Seconds(), 'f', 3, 64)},
			Env: map[string]string{
				EnvDuration: run.String(), EnvSubmitNanos: strconv.FormatInt(due.UnixNano(), 10), EnvPhase: cfg.Phase,
			},
			Queue: cfg.Queue, JobSet: cfg.Phase,
		}
	}

	var (
		res      LoadResult
		accepted atomic.Int64
		rejected atomic.Int64
		nodes    atomic.Int64
		callErrs atomic.Int64
		mu       sync.Mutex
		calls    []time.Duration
		ids      []string
		wg       sync.WaitGroup
	)
	sem := make(chan struct{}, cfg.Concurrency)
	start := time.Now()
	dueOf := func(i int) time.Time {
		if cfg.Rate <= 0 {
			return start
		}
		return start.Add(time.Duration(float64(i) / cfg.Rate * float64(time.Second)))
	}
	call := func(specs []*pb.JobSpec) {
		defer wg.Done()
		defer func() { <-sem }()
		t0 := time.Now()
		var got []*pb.Job
		var err, rejectErr error
		if len(specs) == 1 && cfg.Batch == 1 {
			var j *pb.Job
			if j, err = cfg.Client.Submit(ctx, specs[0]); err == nil {
				got = []*pb.Job{j}
			} else if !isCallError(err) {
				rejected.Add(1)
				rejectErr = err
				err = nil
			}
		} else {
			items := make([]client.BatchItem, len(specs))
			for i, s := range specs {
				items[i] = client.BatchItem{Spec: s}
			}
			var rs []client.BatchResult
			if rs, err = cfg.Client.SubmitBatch(ctx, items); err == nil {
				for _, r := range rs {
					if r.Err != nil {
						rejected.Add(1)
						rejectErr = r.Err
						continue
					}
					got = append(got, r.Job)
				}
			}
		}
		took := time.Since(t0)
		if err != nil {
			callErrs.Add(1)
		}
		var n int64
		for _, j := range got {
			n += int64(j.GetSpec().GetNodes())
		}
		accepted.Add(int64(len(got)))
		nodes.Add(n)
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, took)
		if err != nil && res.FirstError == "" {
			res.FirstError = err.Error()
		}
		if rejectErr != nil && res.FirstRejection == "" {
			res.FirstRejection = rejectErr.Error()
		}
		if cfg.KeepIDs {
			for _, j := range got {
				ids = append(ids, j.GetId())
			}
		}
	}
	var maxLag time.Duration
loop:
	for i := 0; i < cfg.Jobs; {
		due := dueOf(i)
		if wait := time.Until(due); wait > 0 {
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				break loop
			}
		}
		now := time.Now()
		maxLag = max(maxLag, now.Sub(due))
		k := 1
		for k < cfg.Batch && i+k < cfg.Jobs && !dueOf(i+k).After(now) {
			k++
		}
		specs := make([]*pb.JobSpec, k)
		for j := range k {
			specs[j] = spec(i+j, dueOf(i+j))
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			break loop
		}
		wg.Add(1)
		go call(specs)
		i += k
		res.Submitted += int64(k)
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	res.Accepted, res.Rejected, res.Nodes, res.CallErrors = accepted.Load(), rejected.Load(), nodes.Load(), callErrs.Load()
	if res.Seconds > 0 {
		res.AcceptedPerSec = float64(res.Accepted) / res.Seconds
	}
	if cfg.Rate > 0 {
		res.MaxLag = ms(maxLag)
	}
	res.Call = summarize(calls)
	res.IDs = ids
	return res
}

// isCallError tells a failed call (transport, unavailable, deadline) from
// a job the scheduler rejected (invalid, quota).
func isCallError(err error) bool {
	return !errors.Is(err, client.ErrInvalid) && !errors.Is(err, client.ErrFailedPrecondition) &&
		!errors.Is(err, client.ErrQuotaExceeded)
}
