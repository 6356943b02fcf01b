package model

import "time"

// NodeEventKind says what happened on a node; values match the API enum.
type NodeEventKind int

// Node event kinds; see NodeEventKind in proto/gpusched/v1/node.proto.
const (
	EventForeignProcess NodeEventKind = iota + 1
	EventXID
	EventECCDoubleBit
	EventPreLeaseCheckFailed
	EventCleanupFailed
	EventUnhealthy
	EventRecovered
)

// Bounds on the events kept with a node and with a job.
const (
	MaxNodeEvents = 20
	MaxJobEvents  = 50
)

// NodeEvent is something that happened on a node worth attention.
type NodeEvent struct {
	Time    time.Time
	Kind    NodeEventKind
	Node    string
	GPU     int // -1: the whole node
	LeaseID string
	PID     uint32
	XID     uint64
	Action  string
	Message string
}

// AppendEvent adds ev to events, keeping at most max of the newest.
func AppendEvent(events []NodeEvent, ev NodeEvent, max int) []NodeEvent {
	events = append(events, ev)
	if len(events) > max {
		events = append(events[:0:0], events[len(events)-max:]...)
	}
	return events
}
