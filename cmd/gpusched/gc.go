package main

import (
	"bufio"
	"context"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/gpusched/gpusched/internal/gcbudget"
)

// maxDefaultHeapBudget keeps a 10,000-node leader with 100,000 jobs
// queued under 2 GiB of RSS (docs/benchmarks.md) while collecting rarely.
const maxDefaultHeapBudget = 1280 << 20

// heapBudgetFlag is --heap-budget: the garbage collector paced by a heap
// budget (internal/gcbudget) instead of GOGC's doubling.
type heapBudgetFlag struct{ size string }

func (h *heapBudgetFlag) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&h.size, "heap-budget", "auto",
		"let the heap grow to this size between garbage collections (e.g. 1536MiB, 4GiB; 0: Go's default pacing; "+
			"auto: a quarter of the memory this process may use, at most 1280MiB). "+
			"Past half of it, collections pace as by default. Ignored when GOGC is set")
}

// start paces the collector until ctx ends; stop waits for that.
func (h *heapBudgetFlag) start(ctx context.Context, log *zap.Logger) (stop func(), err error) {
	var budget uint64
	if h.size == "auto" {
		budget = min(maxDefaultHeapBudget, memoryAvailable()/4)
	} else if budget, err = parseSize(h.size); err != nil {
		return nil, usageError("--heap-budget: %v", err)
	}
	if gogc, set := os.LookupEnv("GOGC"); set || budget == 0 {
		if set {
			log.Info("GOGC is set: the heap budget is off", zap.String("GOGC", gogc))
		}
		return func() {}, nil
	}
	log.Info("garbage collection paced by a heap budget", zap.Uint64("heap_budget_bytes", budget))
	return gcbudget.Start(ctx, gcbudget.Config{Heap: budget})
}

// memoryAvailable is the memory this process may use: its cgroup's limit
// where one is set, else the machine's; 0 when neither can be read.
func memoryAvailable() uint64 {
	total := uint64(0)
	if f, err := os.Open("/proc/meminfo"); err == nil {
		defer f.Close()
		s := bufio.NewScanner(f)
		for s.Scan() {
			if rest, ok := strings.CutPrefix(s.Text(), "MemTotal:"); ok {
				kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
				total = kb << 10
				break
			}
		}
	}
	if b, err := os.ReadFile("/sys/fs/cgroup/memory.max"); err == nil { // cgroup v2; "max": none
		if limit, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && (total == 0 || limit < total) {
			total = limit
		}
	}
	return total
}
