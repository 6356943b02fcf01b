package model

import (
	"fmt"
	"time"
)

// LeaseNode is one node of a lease with what it had when granted, so the
// lease stays a complete metering record even if the node changes later.
type LeaseNode struct {
	Node     string
	Rank     int
	GPUModel string
	GPUCount int
	GPUUUIDs []string
	// Cleanup is "clean" or why the cleanup after the lease failed; empty
	// until the node's agent reported it.
	Cleanup string
}

// Lease grants specific whole nodes to one job for a time span.
type Lease struct {
	ID           string
	JobID        string
	Tenant       string
	Nodes        []LeaseNode
	Active       bool
	FencingToken int64
	StartTime    time.Time
	EndTime      time.Time
	EndReason    string
	// Summary is what the lease used: event counts while it is active,
	// complete once it has ended.
	Summary LeaseSummary
}

// LeaseID names the attempt-th lease of a job: "42.1", "42.2", ...
func LeaseID(jobID string, attempt int) string {
	return fmt.Sprintf("%s.%d", jobID, attempt)
}

// NodeNames returns the lease's nodes in rank order.
func (l *Lease) NodeNames() []string {
	out := make([]string, len(l.Nodes))
	for i, n := range l.Nodes {
		out[i] = n.Node
	}
	return out
}

// Clone returns a deep copy.
func (l *Lease) Clone() *Lease {
	c := *l
	c.Nodes = make([]LeaseNode, len(l.Nodes))
	for i, n := range l.Nodes {
		n.GPUUUIDs = append([]string(nil), n.GPUUUIDs...)
		c.Nodes[i] = n
	}
	return &c
}

// LeaseSummary is what one lease used. The engine counts events on it while
// the lease is active and fills in the rest when the lease ends (see
// Lease.Summarize); it is then stored with the lease and, as the job's
// LastLeaseSummary, with its job.
type LeaseSummary struct {
	// LeaseID is the lease summarized; empty means no summary.
	LeaseID string
	// GPUHours is the GPU count of every node times the lease's duration.
	GPUHours float64
	// XIDEvents and ForeignProcessEvents count node events of those kinds
	// on the lease's nodes while it held them.
	XIDEvents            int
	ForeignProcessEvents int
	// The rest comes from telemetry (see TelemetryUsage).
	TelemetryUsage
}

// TelemetryUsage is the part of a LeaseSummary computed from GPU samples.
// Only samples the current leader received count: those a previous leader
// received before a failover are lost.
type TelemetryUsage struct {
	// Samples is the number of GPU samples behind the figures below, taken
	// between FirstSample and LastSample.
	Samples     uint64
	FirstSample time.Time
	LastSample  time.Time
	// MeanGPUUtil is the mean GPU utilization over all samples, percent.
	MeanGPUUtil float64
	// PeakGPUUtil is the highest utilization of any GPU, percent.
	PeakGPUUtil uint32
	// PeakFBUsedBytes is the most framebuffer memory used on one GPU.
	PeakFBUsedBytes uint64
	// EnergyWh is the GPUs' power integrated over time, in watt-hours.
	EnergyWh float64
}

// CountEvent counts an event of the lease's nodes if it is of a kind the
// summary counts, and reports whether it was.
func (s *LeaseSummary) CountEvent(kind NodeEventKind) bool {
	switch kind {
	case EventXID:
		s.XIDEvents++
	case EventForeignProcess:
		s.ForeignProcessEvents++
	default:
		return false
	}
	return true
}

// GPUHours is the lease's GPU count (over all its nodes) times its
// duration up to end (EndTime if zero), in hours.
func (l *Lease) GPUHours(end time.Time) float64 {
	if end.IsZero() {
		end = l.EndTime
	}
	// Wall-clock times, as etcd stores them: a live leader's monotonic
	// readings drift from the wall clock by microseconds while NTP slews
	// it, and the figure must match one recomputed from the stored lease.
	d := end.Round(0).Sub(l.StartTime.Round(0))
	if d <= 0 {
		return 0
	}
	gpus := 0
	for _, n := range l.Nodes {
		gpus += n.GPUCount
	}
	return float64(gpus) * d.Hours()
}

// Summarize completes the summary of a lease that has ended: GPU-hours
// from its nodes and span, the event counts it kept while active, and the
// telemetry figures u.
func (l *Lease) Summarize(u TelemetryUsage) LeaseSummary {
	s := l.Summary
	s.LeaseID, s.GPUHours, s.TelemetryUsage = l.ID, l.GPUHours(l.EndTime), u
	return s
}
