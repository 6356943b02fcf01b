package nodeagent

import (
	"context"
	"sync"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpusched/gpusched/nodeagent/gpu"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// monitor samples the node every TelemetryInterval until ctx ends: one
// round checks exclusivity (exclusivity.go) and sends a TelemetryBatch
// attributed to the lease holding the node. It runs whether or not a stream
// is up; only the batch needs one.
func (a *Agent) monitor(ctx context.Context) {
	tick := time.NewTicker(a.cfg.TelemetryInterval)
	defer tick.Stop()
	r := newSampler()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			a.sampleOnce(r)
		}
	}
}

// sampler is the state the monitor keeps between rounds. Only the monitor
// goroutine touches it.
type sampler struct {
	ex excl
	// lastErr is the last NVML failure logged, so a broken call is logged
	// when it starts failing (or fails differently), not every second.
	lastErr string
}

func newSampler() *sampler { return &sampler{ex: excl{seen: map[uint32]*foreignProc{}}} }

// sampleOnce is one round: exclusivity, then telemetry.
func (a *Agent) sampleOnce(r *sampler) {
	now := time.Now()
	h := a.holder()
	procs, err := gpu.ListGPUProcesses(a.cfg.NVML)
	if err == nil {
		a.checkExclusivity(&r.ex, h, procs, now)
	} else {
		r.logErr(a.log, "listing GPU processes", err)
	}
	samples, err := gpu.ReadTelemetry(a.cfg.NVML)
	if err != nil {
		r.logErr(a.log, "reading telemetry", err)
		return
	}
	r.lastErr = ""
	if procs != nil {
		a.fb.learn(samples, procs)
	}
	a.sendTelemetry(now, h, samples)
}

func (r *sampler) logErr(log *zap.Logger, what string, err error) {
	if msg := what + ": " + err.Error(); msg != r.lastErr {
		r.lastErr = msg
		log.Warn("sampling the GPUs failed", zap.String("what", what), zap.Error(err))
	}
}

// maxQueuedTelemetry: a batch is sent only while the stream's queue is at
// most this full. Telemetry is worth little once late, and a scheduler that
// reads slowly must find room for the reports that matter (LeaseExited,
// LeaseReleased, events) rather than a backlog of samples.
const maxQueuedTelemetry = 64

// sendTelemetry sends one batch on the current stream, if there is one and
// it has room; a dropped batch is simply a gap in the history. Either way
// the batch becomes the latest round (LatestTelemetry).
func (a *Agent) sendTelemetry(now time.Time, h holder, samples []gpu.Sample) {
	lastXID := a.health.lastXIDs()
	batch := &pb.TelemetryBatch{
		Time: timestamppb.New(now), LeaseId: h.id, JobId: h.job,
		Samples: make([]*pb.GpuSample, len(samples)),
	}
	for i, x := range samples {
		g := sampleToWire(x)
		if x.Index >= 0 && x.Index < len(lastXID) {
			g.LastXid = lastXID[x.Index]
		}
		batch.Samples[i] = g
	}
	a.latest.Store(batch)
	s := a.currentSession()
	if s == nil || len(s.out) > maxQueuedTelemetry {
		return
	}
	select {
	case s.out <- &pb.ConnectRequest{Msg: &pb.ConnectRequest_Telemetry{Telemetry: batch}}:
	default:
	}
}

// sampleToWire converts one GPU's sample to its wire form (dcgm-exporter
// names; see GpuSample in node.proto). LastXid is the caller's.
func sampleToWire(x gpu.Sample) *pb.GpuSample {
	return &pb.GpuSample{
		Gpu: int32(x.Index), Uuid: x.UUID,
		GpuUtil: x.GPUUtil, MemCopyUtil: x.MemUtil,
		FbUsedBytes: x.FBUsedBytes, FbFreeBytes: x.FBFreeBytes,
		GpuTemp: x.TempC, PowerUsageMilliwatts: x.PowerMilliwatts,
		SmClockMhz: x.SMClockMHz, MemClockMhz: x.MemClockMHz,
		ClockThrottleReasons: x.ThrottleReasons,
		EccSbeVolatile:       x.ECCVolatileSBE, EccDbeVolatile: x.ECCVolatileDBE,
		RemappedRowsCorrectable:   clampU32(x.RemappedRowsCorrectable),
		RemappedRowsUncorrectable: clampU32(x.RemappedRowsUncorrectable),
	}
}

func clampU32(n int) uint32 {
	if n < 0 {
		return 0
	}
	return uint32(min(uint64(n), 1<<32-1))
}

// fbMiB is a byte count in MiB, for messages.
func fbMiB(b uint64) uint64 { return b >> 20 }

// Framebuffer tolerances over the idle baseline: the mock lands exactly on
// its baseline, real GPUs wander a little (driver allocations, ECC pages).
const (
	mockFBTolerance = 16 << 20
	realFBTolerance = 256 << 20
)

// fbBaseline is each GPU's framebuffer use when idle: what cleanup waits to
// see again after a lease. On the mock it is the simulated driver's
// reservation; on real NVML it is learned, the first time each GPU is seen
// without processes (at agent start, normally).
type fbBaseline struct {
	mock      bool // fixed baseline, nothing to learn
	tolerance uint64

	mu    sync.Mutex
	bytes []uint64 // 0: not known yet
}

func (b *fbBaseline) init(a *Agent, gpus int) {
	b.bytes = make([]uint64, gpus)
	if a.cfg.Mock != nil {
		b.mock, b.tolerance = true, mockFBTolerance
		for i := range b.bytes {
			b.bytes[i] = a.cfg.Mock.IdleFBUsedBytes()
		}
		return
	}
	b.tolerance = realFBTolerance
	procs, err := gpu.ListGPUProcesses(a.cfg.NVML)
	if err != nil {
		return
	}
	if samples, err := gpu.ReadTelemetry(a.cfg.NVML); err == nil {
		b.learn(samples, procs)
	}
}

// learn records the baseline of every GPU that has none yet and runs no
// process now.
func (b *fbBaseline) learn(samples []gpu.Sample, procs map[int][]uint32) {
	if b.mock {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, x := range samples {
		if x.Index >= 0 && x.Index < len(b.bytes) && b.bytes[x.Index] == 0 && len(procs[x.Index]) == 0 {
			b.bytes[x.Index] = x.FBUsedBytes
		}
	}
}

// over lists the GPUs whose framebuffer use is above their idle baseline
// (plus tolerance), as problems.
func (b *fbBaseline) over(samples []gpu.Sample) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, x := range samples {
		if x.Index < 0 || x.Index >= len(b.bytes) || b.bytes[x.Index] == 0 {
			continue
		}
		if base := b.bytes[x.Index]; x.FBUsedBytes > base+b.tolerance {
			out = append(out, gpuProblem(x.Index, "%d MiB of memory in use, idle baseline %d MiB",
				fbMiB(x.FBUsedBytes), fbMiB(base)))
		}
	}
	return out
}
