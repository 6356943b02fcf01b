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
