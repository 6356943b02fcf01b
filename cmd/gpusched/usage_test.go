package main

import (
	"bytes"
	"strings"
	"testing"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func TestDescribeJobShowsItsLastLeasesUsage(t *testing.T) {
	j := &pb.Job{Id: "42", Spec: &pb.JobSpec{Tenant: "acme", Nodes: 2, Command: []string{"train"}}, State: pb.JobState_JOB_STATE_SUCCEEDED,
		LeaseId: "42.1", LastLeaseSummary: &pb.LeaseSummary{
			LeaseId: "42.1", GpuHours: 16, EnergyWh: 8123.4, MeanGpuUtil: 75, PeakGpuUtil: 100, PeakFbUsedBytes: 40 << 30,
			XidEvents: 2, ForeignProcessEvents: 1, Samples: 12,
		}}
	var buf bytes.Buffer
	if err := describeJob(&buf, j); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Usage:", "lease 42.1: 16.00 GPU-hours, 8123.4 Wh", "GPU utilization mean 75.0%, peak 100%; peak memory used 40.0 GiB",
		"2 XID event(s), 1 foreign GPU process event(s)", "from 12 GPU samples",
	} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("describeJob output lacks %q:\n%s", want, buf.String())
		}
	}
	buf.Reset()
	j.LastLeaseSummary = nil
	if err := describeJob(&buf, j); err != nil || strings.Contains(buf.String(), "Usage:") {
		t.Errorf("a job without a summary shows a usage block: %v\n%s", err, buf.String())
	}
}
