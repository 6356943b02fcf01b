// Package gcbudget paces the Go garbage collector by a heap budget.
//
// Go's default pacing (GOGC=100) collects whenever the heap doubles its
// live size. A leader of 10,000 nodes keeps a small live heap but
// allocates fast, so it collected every second or two, and each
// collection's mark phase (200 ms, mostly scanning 20,000 agent-stream
// goroutine stacks) delayed every request in flight. Given a budget, the
// collector instead runs when the heap nears the budget: after each
// collection GOGC is set so that the next one is due at the budget.
//
// The runtime starts a collection by its own estimate of how long marking
// will take, learnt from the collections before it, and at most 4 MiB
// before the goal. Under a budget the first collection at the budget
// comes after tiny ones, so it starts with no room left: the goroutines
// that allocate do most of its marking (assists), and every request they
// serve waits for it. Later ones start late too whenever the process gets
// less CPU than the runtime counts on, as beside a busy neighbour. So the
// pacer sets the goal beyond the budget, and starts each collection itself
// (runtime.GC) when the heap reaches the budget, StartAt of the way from
// the live heap to that goal: collections come as often as before, and
// with the goal still far, the background worker marks and assists stay
// light.
//
// GOMEMLIMIT with GOGC=off does the same until the live heap nears the
// limit, and then collects continuously. Here GOGC never goes below
// MinPercent: past half the budget the collector paces as by default and
// the heap outgrows the budget instead. The same technique is known as a
// GOGC tuner (Uber's, among others).
package gcbudget

import (
	"context"
	"errors"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"time"
)

// Config sets a Budget.
type Config struct {
	// Heap is the budget: the total heap (live and garbage) the collector
	// lets grow before collecting, in bytes. Required.
	Heap uint64
	// MinPercent and MaxPercent bound the GOGC set. Defaults 100 (never
	// collect more often than Go's default) and 50000. An idle process
	// does not grow to its budget anyway: the runtime collects at least
	// every two minutes.
	MinPercent, MaxPercent int
	// Poll is how often it checks for a finished collection and for the
	// heap reaching StartAt. Default 100ms; a collection is seconds apart
	// under a budget.
	Poll time.Duration
	// StartAt places the goal: the budget is StartAt of the way from the
	// live heap to it, and the pacer starts a collection itself when the
	// heap reaches the budget. 0.8 (the default) leaves a quarter of the
	// budget's room again as runway; 1 puts the goal at the budget and
	// leaves the start to the runtime. See the package doc.
	StartAt float64
}

// ErrNoBudget: Config.Heap is zero.
var ErrNoBudget = errors.New("gcbudget: a heap budget is required")

// Percent returns the GOGC that puts the next collection at budget bytes
// of heap, given what the last one left: live heap bytes, and the stack
// and globals bytes the collector also counts toward its goal. It is
// clamped to [lo, hi].
func Percent(budget, live, stacks, globals uint64, lo, hi int) int {
	base := live + stacks + globals
	if base == 0 || budget <= live {
		return lo
	}
	p := int((budget - live) * 100 / base)
	// The runtime never lets the heap goal fall under 4 MiB × GOGC/100,
	// whatever the live heap: past this GOGC, that floor is over budget.
	hi = min(hi, int(budget*100/heapMinimum))
	return max(min(p, hi), lo)
}

// DefaultStartAt is Config.StartAt's default.
const DefaultStartAt = 0.8

// goalFor returns the heap goal that puts the budget startAt of the way
// from the live heap to it.
func goalFor(budget, live uint64, startAt float64) uint64 {
	if startAt >= 1 || budget <= live {
		return budget
	}
	return live + uint64(float64(budget-live)/startAt)
}

// dueEarly reports whether a heap of heap bytes is startAt of the way from
// live to goal.
func dueEarly(heap, live, goal uint64, startAt float64) bool {
	if startAt >= 1 || goal <= live {
		return false
	}
	return heap >= live+uint64(float64(goal-live)*startAt)
}

// heapMinimum is the Go runtime's smallest heap goal at GOGC=100.
const heapMinimum = 4 << 20

// Start paces the collector by cfg until ctx ends, then restores the
// GOGC it found. It returns at once; stop waits for the pacer to end.
func Start(ctx context.Context, cfg Config) (stop func(), err error) {
	if cfg.Heap == 0 {
		return nil, ErrNoBudget
	}
	if cfg.MinPercent <= 0 {
		cfg.MinPercent = 100
	}
	if cfg.MaxPercent < cfg.MinPercent {
		cfg.MaxPercent = max(50000, cfg.MinPercent)
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 100 * time.Millisecond
	}
	if cfg.StartAt <= 0 || cfg.StartAt > 1 {
		cfg.StartAt = DefaultStartAt
	}
	ctx, cancel := context.WithCancel(ctx)
	samples := []metrics.Sample{
		{Name: "/gc/cycles/total:gc-cycles"},
		{Name: "/gc/heap/live:bytes"},
		{Name: "/gc/scan/stack:bytes"},
		{Name: "/gc/scan/globals:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/gc/heap/goal:bytes"},
	}
	// Until a collection has measured the live heap, the GOGC found
	// holds: a high one now would put the first collection past the
	// budget. (One comes early anyway, while the heap is small.)
	orig := debug.SetGCPercent(-1)
	debug.SetGCPercent(orig)
	var wg sync.WaitGroup
	wg.Go(func() {
		defer debug.SetGCPercent(orig)
		tick := time.NewTicker(cfg.Poll)
		defer tick.Stop()
		var cycles uint64
		percent := orig // the GOGC set
		for {
			metrics.Read(samples)
			live := samples[1].Value.Uint64()
			if n := samples[0].Value.Uint64(); n != cycles {
				cycles = n
				percent = Percent(goalFor(cfg.Heap, live, cfg.StartAt), live, samples[2].Value.Uint64(),
					samples[3].Value.Uint64(), cfg.MinPercent, cfg.MaxPercent)
				debug.SetGCPercent(percent)
			} else if heap, goal := samples[4].Value.Uint64(), samples[5].Value.Uint64(); percent > cfg.MinPercent &&
				dueEarly(heap, live, goal, cfg.StartAt) {
				// At the budget, while the budget sets the goal: past half
				// of it the runtime paces as by default. runtime.GC returns
				// once the collection has ended. Had the runtime just
				// started one itself, it would wait for that one and then
				// collect once more; its own start comes near the goal,
				// well after the budget, though.
				runtime.GC()
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	})
	return func() { cancel(); wg.Wait() }, nil
}
