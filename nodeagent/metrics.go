package nodeagent

import (
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// LatestTelemetry returns the newest sampling round of the node's GPUs,
// whether or not it reached a scheduler, or nil before the first round.
// It backs the agent's own /metrics. The batch is shared: callers must not
// modify it.
func (a *Agent) LatestTelemetry() *pb.TelemetryBatch { return a.latest.Load() }

// Hostname is the machine's hostname, as reported in the node's inventory.
func (a *Agent) Hostname() string { return a.hostname }

// NodeID is the node's name.
func (a *Agent) NodeID() string { return a.cfg.NodeID }

// Connected reports whether the agent holds a stream to a scheduler now.
func (a *Agent) Connected() bool { return a.currentSession() != nil }
