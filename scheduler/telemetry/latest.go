package telemetry

import (
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// GPULatest is the newest sample the hub holds for one GPU, with the batch
// it came in: when it was taken and what held the node then.
type GPULatest struct {
	Node string
	// Tenant, LeaseID and JobID held the node when the sample was taken;
	// empty when the node was idle.
	Tenant  string
	LeaseID string
	JobID   string
	Time    time.Time
	Sample  *pb.GpuSample
}

// LatestPerGPU returns the newest sample of every GPU of every node the hub
// has heard from, ordered by node and GPU index (what a metrics scrape
// exports). Samples are shared with the hub's history: callers must not
// modify them.
func (h *Hub) LatestPerGPU() []GPULatest {
	m := Filter{}.compile()
	h.mu.Lock()
	v := h.viewLocked(&m)
	h.mu.Unlock()
	snap := v.latest(&m)
	out := make([]GPULatest, len(snap))
	for i, x := range snap {
		b := x.e.Batch
		out[i] = GPULatest{Node: x.e.Node, Tenant: x.e.Tenant, LeaseID: b.GetLeaseId(), JobID: b.GetJobId(),
			Time: b.GetTime().AsTime(), Sample: x.s}
	}
	return out
}
