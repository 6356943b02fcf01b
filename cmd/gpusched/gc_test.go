package main

import (
	"context"
	"os"
	"runtime/debug"
	"testing"

	"go.uber.org/zap"
)

func TestHeapBudgetFlag(t *testing.T) {
	if memoryAvailable() == 0 {
		t.Error("memoryAvailable() = 0 on Linux; want the machine's or the cgroup's memory")
	}
	ctx := context.Background()
	if _, err := (&heapBudgetFlag{size: "lots"}).start(ctx, zap.NewNop()); err == nil {
		t.Error(`--heap-budget lots started; want a usage error`)
	}
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	for _, size := range []string{"auto", "0", "1GiB"} {
		h := &heapBudgetFlag{size: size}
		stop, err := h.start(ctx, zap.NewNop())
		if err != nil {
			t.Fatalf("--heap-budget %s: %v", size, err)
		}
		stop()
	}
	t.Setenv("GOGC", "200")
	stop, err := (&heapBudgetFlag{size: "1GiB"}).start(ctx, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if os.Getenv("GOGC") != "200" || debug.SetGCPercent(100) != 100 {
		t.Error("with GOGC set, the heap budget changed GOGC")
	}
}
