package telemetry

import (
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func TestLatestPerGPU(t *testing.T) {
	h := New(Options{})
	if got := h.LatestPerGPU(); len(got) != 0 {
		t.Fatalf("empty hub: %v", got)
	}
	round := func(sec int64, lease, job string, util uint32, gpus ...int32) *pb.TelemetryBatch {
		b := &pb.TelemetryBatch{Time: timestamppb.New(time.Unix(sec, 0)), LeaseId: lease, JobId: job}
		for _, g := range gpus {
			b.Samples = append(b.Samples, &pb.GpuSample{Gpu: g, GpuUtil: util})
		}
		return b
	}
	h.Publish("n2", "", round(1, "", "", 1, 0, 1))
	h.Publish("n1", "", round(1, "", "", 1, 1, 0))
	h.Publish("n1", "vision", round(2, "7.1", "7", 90, 0, 1))
	// A round that lost GPU 1: its older sample is still the newest one.
	h.Publish("n1", "vision", round(3, "7.1", "7", 95, 0))
	got := h.LatestPerGPU()
	type row struct {
		node, tenant, lease, job string
		gpu                      int32
		sec                      int64
		util                     uint32
	}
	want := []row{
		{"n1", "vision", "7.1", "7", 0, 3, 95},
		{"n1", "vision", "7.1", "7", 1, 2, 90},
		{"n2", "", "", "", 0, 1, 1},
		{"n2", "", "", "", 1, 1, 1},
	}
	if len(got) != len(want) {
		t.Fatalf("LatestPerGPU: %d samples, want %d: %v", len(got), len(want), got)
	}
	for i, w := range want {
		g := got[i]
		r := row{g.Node, g.Tenant, g.LeaseID, g.JobID, g.Sample.GetGpu(), g.Time.Unix(), g.Sample.GetGpuUtil()}
		if r != w {
			t.Errorf("LatestPerGPU[%d] = %+v, want %+v", i, r, w)
		}
	}
}
