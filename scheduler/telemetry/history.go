package telemetry

import (
	"slices"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Bounds on the samples History returns.
const (
	// DefaultHistoryLimit applies when HistoryOptions.Limit is zero.
	DefaultHistoryLimit = 5000
	// MaxHistoryLimit is the largest limit accepted: with every field a
	// sample is about 130 bytes, so an answer stays below gRPC's 4 MiB.
	MaxHistoryLimit = 20000
)

// HistoryOptions select what History returns.
type HistoryOptions struct {
	Filter
	// Fields are the sample fields returned; the zero value returns all.
	Fields Fields
	// Every, when positive, keeps at most one sample per GPU per interval,
	// as in StreamOptions.
	Every time.Duration
	// Since, when set, leaves out samples taken before it.
	Since time.Time
	// Limit keeps only the newest samples; zero means DefaultHistoryLimit,
	// and it is capped at MaxHistoryLimit.
	Limit int
}

// History returns the matching samples of the recent history, oldest first
// (ties by node, then GPU), and whether older ones were left out to stay
// within the limit.
func (h *Hub) History(o HistoryOptions) ([]*pb.TelemetrySample, bool) {
	m := o.Filter.compile()
	h.mu.Lock()
	v := h.viewLocked(&m)
	h.mu.Unlock()
	limit := o.Limit
	if limit <= 0 {
		limit = DefaultHistoryLimit
	}
	limit = min(limit, MaxHistoryLimit)

	ds := newDownsampler(o.Every)
	var all []sampleAt
	for _, r := range v {
		for i := range r.entries {
			e := &r.entries[i]
			if !m.match(e) || (!o.Since.IsZero() && e.Batch.GetTime().AsTime().Before(o.Since)) {
				continue
			}
			for _, s := range ds.filter(e) {
				all = append(all, sampleAt{e, s})
			}
		}
	}
	// Nodes are already in order and each node's samples in time order, so
	// a stable sort by time leaves ties by node, then GPU.
	slices.SortStableFunc(all, func(a, b sampleAt) int {
		return a.e.Batch.GetTime().AsTime().Compare(b.e.Batch.GetTime().AsTime())
	})
	truncated := len(all) > limit
	if truncated {
		all = all[len(all)-limit:]
	}
	out := make([]*pb.TelemetrySample, len(all))
	for i, x := range all {
		out[i] = x.toProto(o.Fields)
	}
	return out, truncated
}
