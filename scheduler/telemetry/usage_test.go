package telemetry

import (
	"math"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
)

// point is one GPU sample of a fake series.
type point struct {
	node  string
	gpu   int32
	sec   int64
	util  uint32
	fb    uint64
	watts uint32
}

func TestLeaseUsageMath(t *testing.T) {
	cases := []struct {
		name   string
		series []point
		want   model.TelemetryUsage
	}{
		{"no samples", nil, model.TelemetryUsage{}},
		{"one sample has no energy yet", []point{{"a", 0, 0, 50, 10, 300}},
			model.TelemetryUsage{Samples: 1, FirstSample: time.Unix(0, 0), LastSample: time.Unix(0, 0), MeanGPUUtil: 50, PeakGPUUtil: 50, PeakFBUsedBytes: 10}},
		{"constant 360 W for 10 s is 1 Wh", []point{
			{"a", 0, 0, 10, 1, 360}, {"a", 0, 5, 20, 3, 360}, {"a", 0, 10, 90, 2, 360},
		}, model.TelemetryUsage{Samples: 3, FirstSample: time.Unix(0, 0), LastSample: time.Unix(10, 0),
			MeanGPUUtil: 40, PeakGPUUtil: 90, PeakFBUsedBytes: 3, EnergyWh: 1}},
		{"a linear ramp integrates exactly (trapezoids)", []point{
			{"a", 0, 0, 0, 0, 0}, {"a", 0, 36, 0, 0, 200}, {"a", 0, 72, 0, 0, 400},
		}, model.TelemetryUsage{Samples: 3, FirstSample: time.Unix(0, 0), LastSample: time.Unix(72, 0), EnergyWh: 4}}, // 200 W mean over 72 s is 14400 J
		{"two GPUs on two nodes add up", []point{
			{"a", 0, 0, 100, 5, 720}, {"b", 3, 0, 0, 7, 360},
			{"a", 0, 10, 100, 5, 720}, {"b", 3, 10, 0, 7, 360},
		}, model.TelemetryUsage{Samples: 4, FirstSample: time.Unix(0, 0), LastSample: time.Unix(10, 0),
			MeanGPUUtil: 50, PeakGPUUtil: 100, PeakFBUsedBytes: 7, EnergyWh: 3}},
		{"a gap over MaxPowerGap counts for nothing", []point{
			{"a", 0, 0, 0, 0, 360}, {"a", 0, 10, 0, 0, 360}, {"a", 0, 10 + 61, 0, 0, 360}, {"a", 0, 10 + 61 + 10, 0, 0, 360},
		}, model.TelemetryUsage{Samples: 4, FirstSample: time.Unix(0, 0), LastSample: time.Unix(81, 0), EnergyWh: 2}},
		{"duplicates and stale samples are ignored", []point{
			{"a", 0, 0, 10, 0, 360}, {"a", 0, 10, 30, 0, 360}, {"a", 0, 10, 99, 0, 9999}, {"a", 0, 5, 99, 0, 9999},
		}, model.TelemetryUsage{Samples: 2, FirstSample: time.Unix(0, 0), LastSample: time.Unix(10, 0),
			MeanGPUUtil: 20, PeakGPUUtil: 30, EnergyWh: 1}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := New(Options{})
			for _, p := range c.series {
				h.Publish(p.node, "t", &pb.TelemetryBatch{LeaseId: "1.1", JobId: "1", Time: timestamppb.New(time.Unix(p.sec, 0)),
					Samples: []*pb.GpuSample{{Gpu: p.gpu, GpuUtil: p.util, FbUsedBytes: p.fb, PowerUsageMilliwatts: p.watts * 1000}}})
			}
			h.Publish("a", "", batch(1, "", 8)) // no lease: counts for none
			got := h.TakeLeaseUsage("1.1")
			if !sameUsage(got, c.want) {
				t.Errorf("usage = %+v; want %+v", got, c.want)
			}
		})
	}
}

// sameUsage compares usages, the floating-point figures within 1e-9.
func sameUsage(a, b model.TelemetryUsage) bool {
	near := func(x, y float64) bool { return math.Abs(x-y) < 1e-9 }
	return near(a.MeanGPUUtil, b.MeanGPUUtil) && near(a.EnergyWh, b.EnergyWh) &&
		a.Samples == b.Samples && a.FirstSample.Equal(b.FirstSample) && a.LastSample.Equal(b.LastSample) &&
		a.PeakGPUUtil == b.PeakGPUUtil && a.PeakFBUsedBytes == b.PeakFBUsedBytes
}

func TestTakingAUsageStopsCountingAndCanBeRepeated(t *testing.T) {
	h := New(Options{})
	sample := func(sec int64, util uint32) *pb.TelemetryBatch {
		return &pb.TelemetryBatch{LeaseId: "4.2", Time: timestamppb.New(time.Unix(sec, 0)),
			Samples: []*pb.GpuSample{{GpuUtil: util, PowerUsageMilliwatts: 360000}}}
	}
	h.Publish("a", "", sample(0, 10))
	h.Publish("a", "", sample(10, 30))
	first := h.TakeLeaseUsage("4.2")
	h.Publish("a", "", sample(20, 100)) // sampled during the cleanup after the lease
	if again := h.TakeLeaseUsage("4.2"); !sameUsage(first, again) || first.Samples != 2 || first.PeakGPUUtil != 30 {
		t.Errorf("usage = %+v, then %+v; want 2 samples, peak 30, twice", first, again)
	}
	if u := h.TakeLeaseUsage("9.9"); u != (model.TelemetryUsage{}) {
		t.Errorf("usage of a lease without samples = %+v; want zero", u)
	}
}

func TestUsageNobodyTakesIsForgotten(t *testing.T) {
	now := time.Unix(1000, 0)
	h := New(Options{Now: func() time.Time { return now }, UsageIdleTTL: time.Hour})
	h.Publish("a", "", &pb.TelemetryBatch{LeaseId: "5.1", Time: timestamppb.New(time.Unix(0, 0)), Samples: []*pb.GpuSample{{GpuUtil: 50}}})
	now = now.Add(2 * time.Hour)
	h.Publish("a", "", &pb.TelemetryBatch{LeaseId: "6.1", Time: timestamppb.New(time.Unix(1, 0)), Samples: []*pb.GpuSample{{}}})
	if u := h.TakeLeaseUsage("5.1"); u.Samples != 0 {
		t.Errorf("usage idle past its TTL = %+v; want forgotten", u)
	}
	if u := h.TakeLeaseUsage("6.1"); u.Samples != 1 {
		t.Errorf("fresh usage = %+v; want 1 sample", u)
	}
}
