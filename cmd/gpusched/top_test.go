package main

import (
	"strings"
	"testing"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func topSample(node string, gpu int32, util uint32, job, tenant string) *pb.TelemetrySample {
	return &pb.TelemetrySample{Node: node, JobId: job, Tenant: tenant, Sample: &pb.GpuSample{
		Gpu: gpu, GpuUtil: util, FbUsedBytes: 10 << 30, FbFreeBytes: 70 << 30, GpuTemp: 40 + util/10, PowerUsageMilliwatts: 100_000 + util*3000,
	}}
}

func TestTopFrame(t *testing.T) {
	v := &topView{}
	v.setNodes([]*pb.Node{
		{Id: "gpu-01", State: pb.NodeState_NODE_STATE_LEASED, JobId: "7"},
		{Id: "gpu-02", State: pb.NodeState_NODE_STATE_READY},
	})
	v.add(&pb.StreamTelemetryResponse{Samples: []*pb.TelemetrySample{
		topSample("gpu-01", 0, 100, "7", "acme"), topSample("gpu-01", 1, 50, "7", "acme"),
		topSample("gpu-02", 0, 0, "", ""), topSample("gpu-02", 1, 0, "", ""),
	}, DroppedTotal: 3})
	now := time.Date(2026, 11, 27, 1, 2, 3, 0, time.UTC)

	lines := v.frame(now, 0, 0)
	want := []string{
		"gpusched top  01:02:03  nodes 2  GPUs 4  avg util 38%  power 0.8 kW  dropped 3",
		"",
		"NODE    STATE   JOB  TENANT  GPU UTIL  AVG  MEM GiB  TEMP  POWER",
		"gpu-01  LEASED  7    acme    █▄        75%  20/160   50C   650W",
		"gpu-02  READY   -    -                 0%   20/160   40C   200W",
	}
	if got := strings.Join(lines, "\n"); got != strings.Join(want, "\n") {
		t.Errorf("frame:\n%s\nwant:\n%s", got, strings.Join(want, "\n"))
	}

	v.gpus = true
	lines = v.frame(now, 0, 0)
	if len(lines) != 3+4 || !strings.HasPrefix(lines[3], "gpu-01  0    100%  10.0/80  50C   400W   -    7    acme") {
		t.Errorf("per-GPU frame:\n%s", strings.Join(lines, "\n"))
	}

	// A small terminal: rows are cut to the height with a note, lines to
	// the width.
	lines = v.frame(now, 20, 5)
	if len(lines) != 5 || !strings.HasPrefix(lines[4], "... ") {
		t.Errorf("frame in 20x5 = %q; want 5 lines ending in a '... more rows' note", lines)
	}
	for _, l := range lines {
		if n := len([]rune(l)); n > 20 {
			t.Errorf("line %q is %d runes wide; want at most 20", l, n)
		}
	}
}
