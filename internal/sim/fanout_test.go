package sim

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"
)

// TestFanoutSmoke runs the telemetry fan-out benchmark small, in this
// process: 20 hollow agents at 2 Hz, 2 subscribers, a 3 s window. It
// asserts correctness only, never timing: every subscriber got its
// snapshot and live samples, each live sample's latency was measured,
// nothing was dropped and no stream failed.
func TestFanoutSmoke(t *testing.T) {
	var progress bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rep, err := RunFanout(ctx, FanoutConfig{
		Nodes: 20, AgentsPerConn: 8, TelemetryHz: 2, Subscribers: []int{2},
		Warmup: 500 * time.Millisecond, Duration: 3 * time.Second,
		EtcdNoFsync: true, PhaseTimeout: 90 * time.Second, Progress: &progress,
	})
	if err != nil {
		t.Fatalf("RunFanout: %v\nprogress:\n%s", err, progress.String())
	}
	var text bytes.Buffer
	rep.WriteText(&text)
	t.Logf("report:\n%s", text.String())
	if len(rep.Steps) != 1 {
		t.Fatalf("%d steps; want 1", len(rep.Steps))
	}
	st := rep.Steps[0]
	if st.Subscribers != 2 || len(st.PerSubscriber) != 2 || len(st.Errors) > 0 {
		t.Fatalf("step: %d subscribers, %d results, errors %v", st.Subscribers, len(st.PerSubscriber), st.Errors)
	}
	if st.SentSamplesPerSec <= 0 {
		t.Errorf("the agents sent no telemetry in the window")
	}
	var total uint64
	for i, r := range st.PerSubscriber {
		if r.Samples == 0 || r.Messages == 0 {
			t.Errorf("subscriber %d received no live samples: %+v", i, r)
		}
		if uint64(r.Latency.N) != r.Samples || r.Latency.Max <= 0 || r.Latency.P50 > r.Latency.P99 || r.Latency.P99 > r.Latency.Max {
			t.Errorf("subscriber %d: latency %+v for %d samples", i, r.Latency, r.Samples)
		}
		if r.Dropped != 0 || r.DroppedTotal != 0 {
			t.Errorf("subscriber %d: %d dropped (%d in all); 320 samples/s cannot overflow the buffer", i, r.Dropped, r.DroppedTotal)
		}
		total += r.Samples
	}
	if uint64(st.Latency.N) != total {
		t.Errorf("merged latency has %d samples; want %d", st.Latency.N, total)
	}
	if st.SnapshotSamples > 20*8 {
		t.Errorf("snapshot of %d samples; at most 160 GPUs exist", st.SnapshotSamples)
	}
	if len(rep.Targets) != 1 || !strings.Contains(text.String(), "worst sub p99") {
		t.Errorf("report lacks the target or the table: %+v", rep.Targets)
	}
}

func TestLatHist(t *testing.T) {
	var h latHist
	for i := 1; i <= 1000; i++ {
		h.add(time.Duration(i) * time.Millisecond)
	}
	p := h.percentiles()
	near := func(got Millis, want float64) bool { return float64(got) >= want*0.99 && float64(got) <= want*1.01 }
	if p.N != 1000 || !near(p.P50, 500) || !near(p.P99, 990) || !near(p.P999, 999) || p.Max != 1000 || p.Mean != 500.5 {
		t.Errorf("percentiles = %+v", p)
	}
	var a, b latHist
	a.add(50 * time.Microsecond)
	b.add(-time.Millisecond) // a clock step: counted as 0
	b.add(3 * time.Second)
	a.merge(&b)
	if p := a.percentiles(); p.N != 3 || p.P50 != ms(50*time.Microsecond) || p.Max != 3000 {
		t.Errorf("merged = %+v", p)
	}
	for us := int64(0); us < 1<<22; us += 1 + us/97 {
		v := histValue(histIndex(us))
		if d := float64(v/time.Microsecond - time.Duration(us)); d < 0 && -d > float64(us)/100 || d > 0 && d > float64(us)/100 {
			t.Fatalf("%d µs lands in a bucket of midpoint %s", us, v)
		}
	}
}
