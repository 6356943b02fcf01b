package gcbudget

import (
	"context"
	"errors"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestPercent(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		name                          string
		budget, live, stacks, globals uint64
		want                          int
	}{
		{"a small live heap waits for the budget", 1500 * mib, 150 * mib, 60 * mib, 0, 642},
		{"stacks and globals count toward the goal", 1000 * mib, 100 * mib, 50 * mib, 50 * mib, 450},
		{"a tiny live heap is capped at the maximum", 1500 * mib, 1 * mib, 0, 0, 1000},
		{"past half the budget the default pacing holds", 1000 * mib, 600 * mib, 0, 0, 100},
		{"a live heap over the budget never collects continuously", 1000 * mib, 1200 * mib, 0, 0, 100},
		{"nothing measured yet", 1000 * mib, 0, 0, 0, 100},
		{"the runtime's 4 MiB floor, scaled by GOGC, stays in the budget", 20 * mib, 0, 1, 0, 500},
		{"a budget under the floor paces as by default", 2 * mib, 1 * mib, 0, 0, 100},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := Percent(c.budget, c.live, c.stacks, c.globals, 100, 1000); got != c.want {
				t.Errorf("Percent = %d; want %d", got, c.want)
			}
		})
	}
}

func TestStartRequiresABudget(t *testing.T) {
	if _, err := Start(context.Background(), Config{}); !errors.Is(err, ErrNoBudget) {
		t.Fatalf("Start without a budget = %v; want ErrNoBudget", err)
	}
}

// After a collection, GOGC is what Percent says for what it left; when
// stopped, the GOGC found at the start is back.
func TestStartSetsGOGCAfterEachCollectionAndRestoresIt(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(77))
	gogc := func() int {
		s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
		metrics.Read(s)
		return int(s[0].Value.Uint64())
	}
	// A budget of one byte: any live heap is past it, so the minimum.
	stop, err := Start(context.Background(), Config{Heap: 1, MinPercent: 150, MaxPercent: 5000, Poll: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	deadline := time.Now().Add(10 * time.Second)
	for gogc() != 150 {
		if time.Now().After(deadline) {
			t.Fatalf("GOGC after a collection = %d; want 150", gogc())
		}
		time.Sleep(time.Millisecond)
	}
	stop()
	if p := gogc(); p != 77 {
		t.Errorf("GOGC after stop = %d; want the 77 found at the start", p)
	}
}

func TestDueEarly(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		name             string
		heap, live, goal uint64
		startAt          float64
		want             bool
	}{
		{"short of the mark", 899 * mib, 100 * mib, 1100 * mib, 0.8, false},
		{"at the mark", 900 * mib, 100 * mib, 1100 * mib, 0.8, true},
		{"past the goal", 1200 * mib, 100 * mib, 1100 * mib, 0.8, true},
		{"1 leaves it to the runtime", 1099 * mib, 100 * mib, 1100 * mib, 1, false},
		{"a goal not above the live heap", 100 * mib, 100 * mib, 100 * mib, 0.8, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := dueEarly(c.heap, c.live, c.goal, c.startAt); got != c.want {
				t.Errorf("dueEarly = %v; want %v", got, c.want)
			}
		})
	}
}

func TestGoalForPutsTheBudgetStartAtOfTheWay(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		name         string
		budget, live uint64
		startAt      float64
		want         uint64
	}{
		{"a quarter of the room again beyond the budget", 1100 * mib, 100 * mib, 0.8, 1350 * mib},
		{"1 keeps the goal at the budget", 1100 * mib, 100 * mib, 1, 1100 * mib},
		{"a live heap past the budget keeps it", 1100 * mib, 1200 * mib, 0.8, 1100 * mib},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := goalFor(c.budget, c.live, c.startAt)
			if got != c.want {
				t.Errorf("goalFor = %d MiB; want %d MiB", got/mib, c.want/mib)
			}
			if c.startAt < 1 && c.live < c.budget && !dueEarly(c.budget, c.live, got, c.startAt) {
				t.Errorf("a heap at the budget is not due under goal %d MiB", got/mib)
			}
		})
	}
}

// Under a budget, the pacer itself starts a collection once the heap is
// StartAt of the way to the goal, before the runtime would.
func TestStartCollectsBeforeTheGoal(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	forced := func() uint64 {
		s := []metrics.Sample{{Name: "/gc/cycles/forced:gc-cycles"}}
		metrics.Read(s)
		return s[0].Value.Uint64()
	}
	stop, err := Start(context.Background(), Config{Heap: 256 << 20, StartAt: 0.25, Poll: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	runtime.GC() // measures the live heap, so the budget sets the goal
	before := forced()
	var keep [64][]byte
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; forced() == before; i++ {
		if time.Now().After(deadline) {
			t.Fatal("no collection started by the pacer in 30s of allocating")
		}
		keep[i%len(keep)] = make([]byte, 64<<10)
		if i%256 == 0 {
			time.Sleep(time.Millisecond) // let the poller run on one CPU
		}
	}
}
