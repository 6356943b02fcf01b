package telemetry

import (
	"sync"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
)

// MaxPowerGap: two consecutive samples of one GPU further apart than this
// (the agent was disconnected, or a failover happened) are not integrated
// into energy; the gap counts for nothing rather than for a guess.
const MaxPowerGap = time.Minute

// Bookkeeping periods of a usageBook.
const (
	// takenTTL is how long a taken lease's usage is kept: a second take
	// (a commit that failed and is retried by the next term on this
	// replica) gets the same figures, and late batches are ignored.
	takenTTL = 10 * time.Minute
	// sweepEvery is how often expired usage is looked for.
	sweepEvery = time.Minute
)

// TakeLeaseUsage returns what the samples published for a lease add up to,
// and stops counting the lease's later samples (those of the cleanup after
// it). The engine calls it when the lease ends. Only samples this hub
// received count: after a failover, the new leader's figures start with
// its first sample.
func (h *Hub) TakeLeaseUsage(leaseID string) model.TelemetryUsage {
	return h.usage.take(leaseID)
}

// usageBook accumulates per-lease usage as batches are published.
type usageBook struct {
	now  func() time.Time
	idle time.Duration

	mu        sync.Mutex
	leases    map[string]*leaseUsage
	lastSweep time.Time
}

// leaseUsage is the running usage of one lease.
type leaseUsage struct {
	u        model.TelemetryUsage // MeanGPUUtil and EnergyWh are computed on take
	utilSum  uint64
	energyMJ float64 // millijoules: milliwatts times seconds
	gpus     map[gpuKey]powerAt
	touched  time.Time // wall clock of the last sample or the take
	taken    bool
}

// powerAt is a GPU's last sample time and power.
type powerAt struct {
	t  time.Time
	mw uint32
}

func newUsageBook(now func() time.Time, idle time.Duration) *usageBook {
	return &usageBook{now: now, idle: idle, leases: map[string]*leaseUsage{}, lastSweep: now()}
}

// add counts a batch towards its lease, if it has one.
func (b *usageBook) add(node string, batch *pb.TelemetryBatch) {
	id := batch.GetLeaseId()
	if id == "" {
		return
	}
	now := b.now()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sweepLocked(now)
	lu := b.leases[id]
	if lu == nil {
		lu = &leaseUsage{gpus: map[gpuKey]powerAt{}}
		b.leases[id] = lu
	}
	if lu.taken {
		return
	}
	lu.touched = now
	lu.add(node, batch.GetTime().AsTime(), batch.GetSamples())
}

// add counts the samples of one batch taken at t. A sample no newer than
// the GPU's last one (a duplicate) is ignored.
func (lu *leaseUsage) add(node string, t time.Time, samples []*pb.GpuSample) {
	for _, s := range samples {
		k := gpuKey{node, s.GetGpu()}
		prev, seen := lu.gpus[k]
		if seen && !t.After(prev.t) {
			continue
		}
		mw := s.GetPowerUsageMilliwatts()
		if dt := t.Sub(prev.t); seen && dt <= MaxPowerGap {
			lu.energyMJ += (float64(prev.mw) + float64(mw)) / 2 * dt.Seconds()
		}
		lu.gpus[k] = powerAt{t, mw}
		u := &lu.u
		if u.Samples == 0 || t.Before(u.FirstSample) {
			u.FirstSample = t
		}
		if t.After(u.LastSample) {
			u.LastSample = t
		}
		u.Samples++
		lu.utilSum += uint64(s.GetGpuUtil())
		u.PeakGPUUtil = max(u.PeakGPUUtil, s.GetGpuUtil())
		u.PeakFBUsedBytes = max(u.PeakFBUsedBytes, s.GetFbUsedBytes())
	}
}

// result is the usage so far.
func (lu *leaseUsage) result() model.TelemetryUsage {
	u := lu.u
	if u.Samples > 0 {
		u.MeanGPUUtil = float64(lu.utilSum) / float64(u.Samples)
	}
	u.EnergyWh = lu.energyMJ / 3.6e6 // 1 Wh = 3600 J = 3.6e6 mJ
	return u
}

func (b *usageBook) take(id string) model.TelemetryUsage {
	now := b.now()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.sweepLocked(now)
	lu := b.leases[id]
	if lu == nil {
		lu = &leaseUsage{gpus: map[gpuKey]powerAt{}}
		b.leases[id] = lu
	}
	if !lu.taken {
		lu.taken, lu.touched, lu.gpus = true, now, nil
	}
	return lu.result()
}

// sweepLocked forgets usage nobody took within the idle TTL of its last
// sample, and taken usage after takenTTL. Called with b.mu held.
func (b *usageBook) sweepLocked(now time.Time) {
	if now.Sub(b.lastSweep) < sweepEvery {
		return
	}
	b.lastSweep = now
	for id, lu := range b.leases {
		ttl := b.idle
		if lu.taken {
			ttl = takenTTL
		}
		if now.Sub(lu.touched) > ttl {
			delete(b.leases, id)
		}
	}
}
