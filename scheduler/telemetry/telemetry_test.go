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

// wait bounds every wait of these tests: generous, for loaded machines.
const wait = 20 * time.Second

func batch(sec int64, job string, gpus int) *pb.TelemetryBatch {
	b := &pb.TelemetryBatch{Time: timestamppb.New(time.Unix(sec, 0)), JobId: job}
	for i := range gpus {
		b.Samples = append(b.Samples, &pb.GpuSample{Gpu: int32(i), GpuUtil: uint32(sec)})
	}
	return b
}

// collect watches until want responses arrived.
func collect(t *testing.T, h *Hub, f Filter, liveOnly bool, want int, during func()) []*pb.WatchTelemetryResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	var (
		mu  sync.Mutex
		got []*pb.WatchTelemetryResponse
	)
	done := make(chan error, 1)
	started := make(chan struct{})
	go func() {
		close(started)
		done <- h.Watch(ctx, f, liveOnly, func(r *pb.WatchTelemetryResponse) error {
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

// publishUntil publishes a batch on node a every few milliseconds, seconds
// counting up from first, until stop is closed.
func publishUntil(h *Hub, wg *sync.WaitGroup, stop <-chan struct{}, first int64) {
	wg.Go(func() {
		for i := first; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
				h.Publish("a", "", batch(i, "", 1))
			}
		}
	})
}

func TestWatchSendsHistoryFirstInTimeOrderThenLive(t *testing.T) {
	h := New(Options{History: 10})
	h.Publish("b", "", batch(2, "", 1))
	h.Publish("a", "", batch(1, "", 1))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer func() { close(stop); wg.Wait() }()
	got := collect(t, h, Filter{}, false, 3, func() { publishUntil(h, &wg, stop, 100) })
	if got[0].GetSample().GetGpuUtil() != 1 || got[1].GetSample().GetGpuUtil() != 2 || got[2].GetSample().GetGpuUtil() < 100 {
		t.Errorf("order = %d, %d, %d; want history 1, 2 then a live sample",
			got[0].GetSample().GetGpuUtil(), got[1].GetSample().GetGpuUtil(), got[2].GetSample().GetGpuUtil())
	}
}

func TestWatchFilters(t *testing.T) {
	h := New(Options{History: 10})
	h.Publish("a", "", batch(1, "7", 2))
	h.Publish("b", "", batch(2, "8", 2))
	h.Publish("a", "", batch(3, "", 2))
	cases := []struct {
		name string
		f    Filter
		want int
	}{
		{"all nodes and jobs", Filter{}, 6},
		{"one node", Filter{Nodes: []string{"a"}}, 4},
		{"one job", Filter{JobIDs: []string{"8"}}, 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, r := range collect(t, h, c.f, false, c.want, nil) {
				if len(c.f.Nodes) > 0 && r.GetNode() != c.f.Nodes[0] || len(c.f.JobIDs) > 0 && r.GetJobId() != c.f.JobIDs[0] {
					t.Errorf("response %v does not match %+v", r, c.f)
				}
			}
		})
	}
}

func TestHistoryIsBoundedPerNode(t *testing.T) {
	h := New(Options{History: 3})
	for i := range 10 {
		h.Publish("a", "", batch(int64(i), "", 1))
	}
	got := collect(t, h, Filter{}, false, 3, nil)
	if got[0].GetSample().GetGpuUtil() != 7 {
		t.Errorf("oldest kept sample is from second %d; want 7", got[0].GetSample().GetGpuUtil())
	}
}

func TestASlowSubscriberLosesTheOldestAndIsToldSo(t *testing.T) {
	s := newSubscriber(matcher{}, 8)
	for i := range 5 {
		s.push(Entry{Node: "a", Batch: batch(int64(i), "", 4)})
	}
	got, dropped := s.pop(MaxSamplesPerMessage)
	if len(got) != 2 || got[0].samples[0].GetGpuUtil() != 3 || dropped != 12 {
		t.Fatalf("pop = %d batches from second %d, dropped %d; want seconds 3 and 4, and 12 dropped samples",
			len(got), got[0].samples[0].GetGpuUtil(), dropped)
	}
	if _, dropped := s.pop(MaxSamplesPerMessage); dropped != 0 {
		t.Errorf("drops were reported twice")
	}
}

func TestWatchLiveOnlySkipsTheHistory(t *testing.T) {
	h := New(Options{History: 10})
	h.Publish("a", "", batch(1, "", 1))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer func() { close(stop); wg.Wait() }()
	got := collect(t, h, Filter{}, true, 2, func() { publishUntil(h, &wg, stop, 2) })
	if got[0].GetSample().GetGpuUtil() < 2 {
		t.Errorf("a live-only watch delivered history")
	}
}
