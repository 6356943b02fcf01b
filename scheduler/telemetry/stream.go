package telemetry

import (
	"context"
	"slices"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// MaxSamplesPerMessage bounds the samples of one StreamTelemetryResponse
// (about 130 bytes each with every field), far below gRPC's 4 MiB.
const MaxSamplesPerMessage = 1000

// StreamOptions select what Stream sends.
type StreamOptions struct {
	Filter
	// Fields are the sample fields sent; the zero value sends all.
	Fields Fields
	// Every, when positive, keeps at most one sample per GPU per interval
	// (the first taken in it; intervals aligned to the sample clock).
	Every time.Duration
}

// Stream sends a snapshot (the latest sample of every matching GPU, the
// last snapshot message marked SnapshotComplete even when empty), then
// live samples as they are published, until ctx ends (returning its
// error) or send fails. A subscriber that reads too slowly loses its
// oldest queued samples; each message carries the count lost since the
// previous one.
func (h *Hub) Stream(ctx context.Context, o StreamOptions, send func(*pb.StreamTelemetryResponse) error) error {
	s, v, cancel := h.subscribe(o.Filter.compile())
	defer cancel()
	ds := newDownsampler(o.Every)
	snap := v.latest(&s.m)
	for _, x := range snap {
		ds.keep(gpuKey{x.e.Node, x.s.GetGpu()}, x.e.Batch.GetTime().AsTime())
	}
	s.mu.Lock()
	s.ds = ds // from now on only touched under s.mu
	s.mu.Unlock()

	for first := true; first || len(snap) > 0; first = false {
		n := min(len(snap), MaxSamplesPerMessage)
		r := &pb.StreamTelemetryResponse{Snapshot: true, SnapshotComplete: n == len(snap)}
		for _, x := range snap[:n] {
			r.Samples = append(r.Samples, x.toProto(o.Fields))
		}
		if err := send(r); err != nil {
			return err
		}
		snap = snap[n:]
	}
	var total uint64
	for {
		batches, dropped, err := s.next(ctx, MaxSamplesPerMessage)
		if err != nil {
			return err
		}
		if len(batches) == 0 && dropped == 0 {
			continue
		}
		total += dropped
		r := &pb.StreamTelemetryResponse{Dropped: dropped, DroppedTotal: total}
		for _, b := range batches {
			for _, smp := range b.samples {
				r.Samples = append(r.Samples, sampleAt{&b.e, smp}.toProto(o.Fields))
			}
		}
		if err := send(r); err != nil {
			return err
		}
	}
}

// Watch serves WatchTelemetry: the matching history in time order (unless
// liveOnly), then live samples, one response per GPU sample, until ctx
// ends (returning its error) or send fails.
func (h *Hub) Watch(ctx context.Context, f Filter, liveOnly bool, send func(*pb.WatchTelemetryResponse) error) error {
	s, v, cancel := h.subscribe(f.compile())
	defer cancel()
	var dropped uint64
	if !liveOnly {
		var backlog []*Entry
		for _, r := range v {
			for i := range r.entries {
				if s.m.match(&r.entries[i]) {
					backlog = append(backlog, &r.entries[i])
				}
			}
		}
		slices.SortStableFunc(backlog, func(a, b *Entry) int {
			return a.Batch.GetTime().AsTime().Compare(b.Batch.GetTime().AsTime())
		})
		for _, e := range backlog {
			if err := sendWatch(e, e.Batch.GetSamples(), 0, send); err != nil {
				return err
			}
		}
	}
	for {
		batches, d, err := s.next(ctx, MaxSamplesPerMessage)
		if err != nil {
			return err
		}
		dropped += d // told with the next sample sent
		for _, b := range batches {
			if err := sendWatch(&b.e, b.samples, dropped, send); err != nil {
				return err
			}
			if len(b.samples) > 0 {
				dropped = 0
			}
		}
	}
}

// sendWatch sends one WatchTelemetryResponse per sample; the first carries
// the drop count.
func sendWatch(e *Entry, samples []*pb.GpuSample, dropped uint64, send func(*pb.WatchTelemetryResponse) error) error {
	for _, smp := range samples {
		if err := send(&pb.WatchTelemetryResponse{
			Node: e.Node, Time: e.Batch.GetTime(), LeaseId: e.Batch.GetLeaseId(), JobId: e.Batch.GetJobId(),
			Sample: smp, Dropped: dropped,
		}); err != nil {
			return err
		}
		dropped = 0
	}
	return nil
}
