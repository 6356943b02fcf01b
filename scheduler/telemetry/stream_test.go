package telemetry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// leased is a batch of gpus samples taken at second sec while lease held
// the node (job is the lease's job: "7.1" belongs to "7").
func leased(sec int64, lease string, gpus int) *pb.TelemetryBatch {
	b := batch(sec, "", gpus)
	if lease != "" {
		b.LeaseId, b.JobId = lease, lease[:len(lease)-2]
	}
	return b
}

// key renders a sample as node/gpu@second, for comparing.
func key(s *pb.TelemetrySample) string {
	return fmt.Sprintf("%s/%d@%d", s.GetNode(), s.GetSample().GetGpu(), s.GetTime().AsTime().Unix())
}

func keys(samples []*pb.TelemetrySample) []string {
	out := make([]string, len(samples))
	for i, s := range samples {
		out[i] = key(s)
	}
	return out
}

// streamRun is one Stream running in the background; its messages arrive
// on ch.
type streamRun struct {
	ch chan *pb.StreamTelemetryResponse
}

// startStream runs h.Stream until the test ends. send, if set, is called
// before a message is handed to ch (a slow subscriber blocks in it).
func startStream(t *testing.T, h *Hub, o StreamOptions, send func(ctx context.Context) error) *streamRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &streamRun{ch: make(chan *pb.StreamTelemetryResponse, 4096)}
	done := make(chan error, 1)
	go func() {
		done <- h.Stream(ctx, o, func(m *pb.StreamTelemetryResponse) error {
			if send != nil {
				if err := send(ctx); err != nil {
					return err
				}
			}
			select {
			case r.ch <- m:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Stream returned %v; want context.Canceled", err)
		}
	})
	return r
}

func (r *streamRun) next(t *testing.T) *pb.StreamTelemetryResponse {
	t.Helper()
	select {
	case m := <-r.ch:
		return m
	case <-time.After(wait):
		t.Fatal("no message from the stream")
		return nil
	}
}

// snapshot reads the snapshot and returns its samples.
func (r *streamRun) snapshot(t *testing.T) []*pb.TelemetrySample {
	t.Helper()
	var out []*pb.TelemetrySample
	for {
		m := r.next(t)
		if !m.GetSnapshot() {
			t.Fatalf("a live message before the snapshot was complete: %v", m)
		}
		out = append(out, m.GetSamples()...)
		if m.GetSnapshotComplete() {
			return out
		}
	}
}

// live reads live messages until n samples arrived.
func (r *streamRun) live(t *testing.T, n int) []*pb.TelemetrySample {
	t.Helper()
	var out []*pb.TelemetrySample
	for len(out) < n {
		m := r.next(t)
		if m.GetSnapshot() {
			t.Fatalf("a snapshot message among live ones: %v", m)
		}
		out = append(out, m.GetSamples()...)
	}
	if len(out) != n {
		t.Fatalf("got %d live samples %v; want %d", len(out), keys(out), n)
	}
	return out
}

func TestStreamSendsTheLatestSampleOfEveryGPUThenLiveOnes(t *testing.T) {
	h := New(Options{})
	h.Publish("a", "acme", leased(1, "7.1", 2))
	h.Publish("a", "acme", leased(2, "7.1", 2))
	only0 := leased(3, "7.1", 1) // a round in which GPU 1 did not answer
	h.Publish("a", "acme", only0)
	h.Publish("b", "", leased(1, "", 1))

	r := startStream(t, h, StreamOptions{}, nil)
	snap := r.snapshot(t)
	if got, want := keys(snap), []string{"a/0@3", "a/1@2", "b/0@1"}; !slices.Equal(got, want) {
		t.Fatalf("snapshot = %v; want %v", got, want)
	}
	if s := snap[0]; s.GetLeaseId() != "7.1" || s.GetJobId() != "7" || s.GetTenant() != "acme" || s.GetSample().GetGpuUtil() != 3 {
		t.Errorf("snapshot sample = %v; want lease 7.1, job 7, tenant acme, utilization 3", s)
	}
	h.Publish("b", "", leased(4, "", 1))
	if got := keys(r.live(t, 1)); !slices.Equal(got, []string{"b/0@4"}) {
		t.Errorf("live = %v; want b/0@4", got)
	}
}

func TestAnEmptySnapshotIsStillMarkedComplete(t *testing.T) {
	r := startStream(t, New(Options{}), StreamOptions{}, nil)
	if m := r.next(t); !m.GetSnapshot() || !m.GetSnapshotComplete() || len(m.GetSamples()) != 0 {
		t.Errorf("first message = %v; want an empty, complete snapshot", m)
	}
}

func TestStreamFilters(t *testing.T) {
	// n1: tenant acme, lease 7.1, 2 GPUs; n2: tenant beta, lease 8.1;
	// n3: no lease.
	publish := func(h *Hub, sec int64) {
		h.Publish("n3", "", leased(sec, "", 2))
		h.Publish("n2", "beta", leased(sec, "8.1", 2))
		h.Publish("n1", "acme", leased(sec, "7.1", 2))
	}
	cases := []struct {
		name  string
		f     Filter
		nodes []string // the nodes whose samples match
	}{
		{"nodes", Filter{Nodes: []string{"n1", "n3"}}, []string{"n1", "n3"}},
		{"job", Filter{JobIDs: []string{"8"}}, []string{"n2"}},
		{"leases", Filter{LeaseIDs: []string{"7.1", "8.1"}}, []string{"n1", "n2"}},
		{"tenant", Filter{Tenant: "acme"}, []string{"n1"}},
		{"tenant and job", Filter{Tenant: "beta", JobIDs: []string{"8", "7"}}, []string{"n2"}},
		{"criteria combine with AND", Filter{Tenant: "acme", Nodes: []string{"n2"}}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := New(Options{})
			publish(h, 1)
			r := startStream(t, h, StreamOptions{Filter: c.f}, nil)
			var want []string
			for _, n := range c.nodes {
				want = append(want, n+"/0@1", n+"/1@1")
			}
			if got := keys(r.snapshot(t)); !slices.Equal(got, want) {
				t.Fatalf("snapshot = %v; want %v", got, want)
			}
			if len(c.nodes) == 0 {
				return
			}
			// Two live rounds: a sample that should not have matched in the
			// first would show up ahead of the second's.
			for sec := int64(2); sec <= 3; sec++ {
				publish(h, sec)
				for _, s := range r.live(t, 2*len(c.nodes)) {
					if !slices.Contains(c.nodes, s.GetNode()) || s.GetTime().AsTime().Unix() != sec {
						t.Errorf("round %d: live sample %s does not match", sec, key(s))
					}
				}
			}
		})
	}
}

func TestStreamSendsOnlyTheRequestedFields(t *testing.T) {
	full := &pb.GpuSample{Gpu: 3, Uuid: "GPU-3", GpuUtil: 97, MemCopyUtil: 40, FbUsedBytes: 1 << 30, FbFreeBytes: 2 << 30,
		GpuTemp: 70, PowerUsageMilliwatts: 650000, SmClockMhz: 1980, LastXid: 13}
	h := New(Options{})
	h.Publish("a", "", &pb.TelemetryBatch{Time: timestamppb.New(time.Unix(1, 0)), Samples: []*pb.GpuSample{full}})
	fields, err := ParseFields([]string{"gpu_util", "fb_used_bytes"})
	if err != nil {
		t.Fatal(err)
	}
	r := startStream(t, h, StreamOptions{Fields: fields}, nil)
	want := &pb.GpuSample{Gpu: 3, GpuUtil: 97, FbUsedBytes: 1 << 30}
	if snap := r.snapshot(t); len(snap) != 1 || !proto.Equal(snap[0].GetSample(), want) {
		t.Errorf("snapshot = %v; want only %v", snap, want)
	}
	h.Publish("a", "", &pb.TelemetryBatch{Time: timestamppb.New(time.Unix(2, 0)), Samples: []*pb.GpuSample{full}})
	if live := r.live(t, 1); !proto.Equal(live[0].GetSample(), want) {
		t.Errorf("live sample = %v; want only %v", live[0].GetSample(), want)
	}
	if full.GetUuid() != "GPU-3" || full.GetGpuTemp() != 70 {
		t.Errorf("selecting fields modified the published sample: %v", full)
	}
	if _, err := ParseFields([]string{"gpu_util", "gpu_utilization"}); !errors.Is(err, ErrUnknownField) {
		t.Errorf("ParseFields with an unknown name = %v; want ErrUnknownField", err)
	}
	if !IsField("power_usage_milliwatts") || IsField("power") {
		t.Error("IsField does not follow GpuSample's field names")
	}
}

func TestStreamDownsamplesToOneSamplePerGPUPerInterval(t *testing.T) {
	h := New(Options{})
	h.Publish("a", "", batch(1, "", 2))
	r := startStream(t, h, StreamOptions{Every: 10 * time.Second}, nil)
	if got := keys(r.snapshot(t)); !slices.Equal(got, []string{"a/0@1", "a/1@1"}) {
		t.Fatalf("snapshot = %v", got)
	}
	for sec := int64(2); sec <= 25; sec++ {
		h.Publish("a", "", batch(sec, "", 2))
	}
	h.Publish("a", "", batch(30, "", 2))
	// Intervals [0,10) (already sent in the snapshot), [10,20), [20,30),
	// [30,40): the first sample of each.
	want := []string{"a/0@10", "a/1@10", "a/0@20", "a/1@20", "a/0@30", "a/1@30"}
	if got := keys(r.live(t, len(want))); !slices.Equal(got, want) {
		t.Errorf("live = %v; want %v", got, want)
	}
}

func TestASlowSubscriberNeverBlocksPublishNorAFastOne(t *testing.T) {
	h := New(Options{SubscriberBuffer: 4})
	entered, release := make(chan struct{}), make(chan struct{})
	first := true
	slow := startStream(t, h, StreamOptions{}, func(ctx context.Context) error {
		if first { // the slow reader stalls on its very first message
			first = false
			close(entered)
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	})
	fast := startStream(t, h, StreamOptions{}, nil)
	fast.snapshot(t)
	select {
	case <-entered: // the slow one is subscribed and stuck
	case <-time.After(wait):
		t.Fatal("the slow subscriber never got its first message")
	}
	const rounds = 50
	for sec := int64(1); sec <= rounds; sec++ {
		h.Publish("a", "", batch(sec, "", 2)) // returns although one subscriber is stuck
		if got := keys(fast.live(t, 2)); !slices.Equal(got, []string{fmt.Sprintf("a/0@%d", sec), fmt.Sprintf("a/1@%d", sec)}) {
			t.Fatalf("fast subscriber got %v in round %d", got, sec)
		}
	}
	close(release)
	slow.snapshot(t)
	m := slow.next(t)
	// The slow one kept its 4 newest samples and lost the rest.
	if got, want := keys(m.GetSamples()), []string{"a/0@49", "a/1@49", "a/0@50", "a/1@50"}; !slices.Equal(got, want) {
		t.Errorf("slow subscriber got %v; want %v", got, want)
	}
	if m.GetDropped() != 2*rounds-4 || m.GetDroppedTotal() != 2*rounds-4 {
		t.Errorf("slow subscriber told dropped=%d total=%d; want %d", m.GetDropped(), m.GetDroppedTotal(), 2*rounds-4)
	}
}
