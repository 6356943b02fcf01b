package telemetry

import (
	"context"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func batch(sec int64, job string, gpus int) *pb.TelemetryBatch {
	b := &pb.TelemetryBatch{Time: timestamppb.New(time.Unix(sec, 0)), JobId: job}
	for i := range gpus {
		b.Samples = append(b.Samples, &pb.GpuSample{Gpu: int32(i), GpuUtil: uint32(sec)})
	}
	return b
}

// collect watches until want responses arrived.
func collect(t *testing.T, h *Hub, f Filter, want int, during func()) []*pb.WatchTelemetryResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var (
		mu  sync.Mutex
		got []*pb.WatchTelemetryResponse
	)
	done := make(chan error, 1)
	started := make(chan struct{})
	go func() {
		close(started)
		done <- h.Watch(ctx, f, func(r *pb.WatchTelemetryResponse) error {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, r)
			if len(got) == want {
				cancel()
			}
			return nil
		})
	}()
	<-started
	if during != nil {
		during()
	}
	<-done
	mu.Lock()
	defer mu.Unlock()
	if len(got) != want {
		t.Fatalf("got %d responses; want %d", len(got), want)
	}
	return got
}

func TestHistoryComesFirstInTimeOrderThenLive(t *testing.T) {
	h := New(10, 0)
	h.Publish("b", batch(2, "", 1))
	h.Publish("a", batch(1, "", 1))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer func() { close(stop); wg.Wait() }()
	got := collect(t, h, Filter{}, 3, func() {
		wg.Go(func() {
			// Keep publishing until the watcher has seen a live sample.
			for i := int64(100); ; i++ {
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
					h.Publish("a", batch(i, "", 1))
				}
			}
		})
	})
	if got[0].GetSample().GetGpuUtil() != 1 || got[1].GetSample().GetGpuUtil() != 2 || got[2].GetSample().GetGpuUtil() < 100 {
		t.Errorf("order = %d, %d, %d; want history 1, 2 then a live sample",
			got[0].GetSample().GetGpuUtil(), got[1].GetSample().GetGpuUtil(), got[2].GetSample().GetGpuUtil())
	}
}

func TestFilters(t *testing.T) {
	h := New(10, 0)
	h.Publish("a", batch(1, "7", 2))
	h.Publish("b", batch(2, "8", 2))
	h.Publish("a", batch(3, "", 2))
	cases := []struct {
		name string
		f    Filter
		want int
	}{
		{"all nodes and jobs", Filter{}, 6},
		{"one node", Filter{Nodes: []string{"a"}}, 4},
		{"one job", Filter{JobID: "8"}, 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, r := range collect(t, h, c.f, c.want, nil) {
				if len(c.f.Nodes) > 0 && r.GetNode() != c.f.Nodes[0] || c.f.JobID != "" && r.GetJobId() != c.f.JobID {
					t.Errorf("response %v does not match %+v", r, c.f)
				}
			}
		})
	}
}

func TestHistoryIsBoundedPerNode(t *testing.T) {
	h := New(3, 0)
	for i := range 10 {
		h.Publish("a", batch(int64(i), "", 1))
	}
	got := collect(t, h, Filter{}, 3, nil)
	if got[0].GetSample().GetGpuUtil() != 7 {
		t.Errorf("oldest kept sample is from second %d; want 7", got[0].GetSample().GetGpuUtil())
	}
}

func TestASlowSubscriberLosesTheOldestAndIsToldSo(t *testing.T) {
	s := &subscriber{max: 2, wake: make(chan struct{}, 1)}
	for i := range 5 {
		s.push(entry{"a", batch(int64(i), "", 4)})
	}
	e, dropped, ok := s.pop()
	if !ok || e.batch.GetSamples()[0].GetGpuUtil() != 3 || dropped != 12 {
		t.Fatalf("pop = second %d, dropped %d; want second 3 and 12 dropped samples", e.batch.GetSamples()[0].GetGpuUtil(), dropped)
	}
}

func TestLiveOnlySkipsTheHistory(t *testing.T) {
	h := New(10, 0)
	h.Publish("a", batch(1, "", 1))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer func() { close(stop); wg.Wait() }()
	got := collect(t, h, Filter{LiveOnly: true}, 2, func() {
		wg.Go(func() {
			for i := int64(2); ; i++ {
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
					h.Publish("a", batch(i, "", 1))
				}
			}
		})
	})
	if got[0].GetSample().GetGpuUtil() < 2 {
		t.Errorf("a live-only watch delivered history")
	}
}
