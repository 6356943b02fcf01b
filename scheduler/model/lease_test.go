package model

import (
	"testing"
	"time"
)

func TestLeaseSummary(t *testing.T) {
	start := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	cases := []struct {
		name     string
		nodes    []LeaseNode
		span     time.Duration
		gpuHours float64
	}{
		{"two 8-GPU nodes for 90 minutes", []LeaseNode{{GPUCount: 8}, {GPUCount: 8}}, 90 * time.Minute, 24},
		{"mixed nodes for 15 minutes", []LeaseNode{{GPUCount: 8}, {GPUCount: 4}}, 15 * time.Minute, 3},
		{"one GPU for one second", []LeaseNode{{GPUCount: 1}}, time.Second, 1.0 / 3600},
		{"an empty span", []LeaseNode{{GPUCount: 8}}, 0, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := &Lease{ID: "3.1", Nodes: c.nodes, StartTime: start, EndTime: start.Add(c.span)}
			if got := l.GPUHours(time.Time{}); got != c.gpuHours {
				t.Errorf("GPUHours = %g; want %g", got, c.gpuHours)
			}
		})
	}

	l := &Lease{ID: "3.1", Nodes: []LeaseNode{{GPUCount: 8}}, StartTime: start, Active: true}
	for _, k := range []NodeEventKind{EventXID, EventForeignProcess, EventUnhealthy, EventXID, EventRecovered} {
		l.Summary.CountEvent(k)
	}
	if got := l.GPUHours(start.Add(30 * time.Minute)); got != 4 {
		t.Errorf("GPUHours of an active lease until a given time = %g; want 4", got)
	}
	l.Active, l.EndTime = false, start.Add(time.Hour)
	u := TelemetryUsage{Samples: 10, MeanGPUUtil: 50, EnergyWh: 700}
	want := LeaseSummary{LeaseID: "3.1", GPUHours: 8, XIDEvents: 2, ForeignProcessEvents: 1, TelemetryUsage: u}
	if got := l.Summarize(u); got != want {
		t.Errorf("Summarize = %+v; want %+v", got, want)
	}
}
