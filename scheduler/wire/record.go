package wire

import (
	"math"
	"time"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/gpusched/gpusched/scheduler/model"
)

// The store writes a job's record on every change of it, and a lease's on
// every node's progress: at 2,000 jobs a second, building them through
// JobToProto and LeaseToProto was a fifth of all the leader allocated
// (a generated struct per timestamp, transition, exit and node). The
// Append functions encode the same messages straight from the model.
// JobToProto and LeaseToProto stay the definition: record_test.go decodes
// what these write and compares it with them, over values that set every
// field of every message (and fails when a field is added to the protos
// but not here).

// AppendJobRecord appends j as the store keeps it: a pb.Job equal to
// JobToProto(j).
func AppendJobRecord(b []byte, j *model.Job) []byte {
	b = appendString(b, 1, j.ID)
	b = appendMessage(b, 2, func(b []byte) []byte { return appendJobSpec(b, &j.Spec) })
	b = appendVarint(b, 3, uint64(j.State))
	b = appendString(b, 4, j.Reason)
	b = appendString(b, 5, j.LeaseID)
	for _, n := range j.Nodes {
		b = appendStringAlways(b, 6, n)
	}
	b = appendTime(b, 7, j.CreateTime)
	b = appendTime(b, 8, j.ScheduleTime)
	b = appendTime(b, 9, j.StartTime)
	b = appendTime(b, 10, j.EndTime)
	for i := range j.Exits {
		b = appendMessage(b, 11, func(b []byte) []byte { return appendNodeExit(b, &j.Exits[i]) })
	}
	b = appendInt32(b, 12, j.Attempts)
	b = appendInt32(b, 13, j.Retries)
	for i := range j.Events {
		b = appendMessage(b, 14, func(b []byte) []byte { return appendNodeEvent(b, &j.Events[i]) })
	}
	b = appendString(b, 15, j.IdempotencyKey)
	for i := range j.Transitions {
		b = appendMessage(b, 16, func(b []byte) []byte { return appendTransition(b, &j.Transitions[i]) })
	}
	if j.LastLeaseSummary != (model.LeaseSummary{}) {
		b = appendMessage(b, 17, func(b []byte) []byte { return appendLeaseSummary(b, &j.LastLeaseSummary) })
	}
	return b
}

// AppendLeaseRecord appends l as the store keeps it: a pb.Lease equal to
// LeaseToProto(l).
func AppendLeaseRecord(b []byte, l *model.Lease) []byte {
	b = appendString(b, 1, l.ID)
	b = appendString(b, 2, l.JobID)
	b = appendString(b, 3, l.Tenant)
	for i := range l.Nodes {
		b = appendMessage(b, 4, func(b []byte) []byte { return appendLeaseNode(b, &l.Nodes[i]) })
	}
	state := uint64(2) // LEASE_STATE_ENDED
	if l.Active {
		state = 1 // LEASE_STATE_ACTIVE
	}
	b = appendVarint(b, 5, state)
	b = appendVarint(b, 6, uint64(l.FencingToken))
	b = appendTime(b, 7, l.StartTime)
	b = appendTime(b, 8, l.EndTime)
	b = appendString(b, 9, l.EndReason)
	if l.Summary != (model.LeaseSummary{}) {
		b = appendMessage(b, 10, func(b []byte) []byte { return appendLeaseSummary(b, &l.Summary) })
	}
	return b
}

func appendJobSpec(b []byte, s *model.JobSpec) []byte {
	b = appendString(b, 1, s.Name)
	b = appendString(b, 2, s.Tenant)
	b = appendInt32(b, 3, s.Nodes)
	b = appendString(b, 4, s.GPUModel)
	b = appendInt32(b, 5, s.GPUsPerNode)
	for _, c := range s.Command {
		b = appendStringAlways(b, 6, c)
	}
	b = appendMap(b, 7, s.Env)
	if s.TimeLimit > 0 {
		b = appendMessage(b, 8, func(b []byte) []byte { return appendDuration(b, s.TimeLimit) })
	}
	// Explicit presence: always written, as JobSpecToProto sets it.
	b = protowire.AppendTag(b, 9, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(int64(int32(s.MaxRetries))))
	b = appendVarint(b, 10, s.MinGPUMemoryBytes)
	b = appendMap(b, 11, s.Selector)
	b = appendString(b, 12, s.Topology)
	b = appendString(b, 13, s.PreferTopology)
	b = appendString(b, 14, s.Queue)
	b = appendInt32(b, 15, s.Priority)
	b = appendMap(b, 16, s.Labels)
	b = appendString(b, 17, s.JobSet)
	return b
}

func appendNodeExit(b []byte, x *model.NodeExit) []byte {
	b = appendString(b, 1, x.Node)
	b = appendInt32(b, 2, x.Rank)
	b = appendInt32(b, 3, x.ExitCode)
	b = appendString(b, 4, x.Signal)
	b = appendString(b, 5, x.Message)
	return appendTime(b, 6, x.Time)
}

func appendNodeEvent(b []byte, e *model.NodeEvent) []byte {
	b = appendTime(b, 1, e.Time)
	b = appendVarint(b, 2, uint64(e.Kind))
	b = appendString(b, 3, e.Node)
	b = appendInt32(b, 4, e.GPU)
	b = appendString(b, 5, e.LeaseID)
	b = appendVarint(b, 6, uint64(e.PID))
	b = appendVarint(b, 7, e.XID)
	b = appendString(b, 8, e.Action)
	return appendString(b, 9, e.Message)
}

func appendTransition(b []byte, t *model.Transition) []byte {
	b = appendInt32(b, 1, t.Seq)
	b = appendVarint(b, 2, uint64(t.State))
	b = appendTime(b, 3, t.Time)
	return appendString(b, 4, t.Reason)
}

func appendLeaseSummary(b []byte, s *model.LeaseSummary) []byte {
	b = appendString(b, 1, s.LeaseID)
	b = appendDouble(b, 2, s.GPUHours)
	b = appendDouble(b, 3, s.MeanGPUUtil)
	b = appendVarint(b, 4, uint64(s.PeakGPUUtil))
	b = appendVarint(b, 5, s.PeakFBUsedBytes)
	b = appendDouble(b, 6, s.EnergyWh)
	b = appendVarint(b, 7, uint64(uint32(s.XIDEvents)))
	b = appendVarint(b, 8, uint64(uint32(s.ForeignProcessEvents)))
	b = appendVarint(b, 9, s.Samples)
	b = appendTime(b, 10, s.FirstSample)
	return appendTime(b, 11, s.LastSample)
}

func appendLeaseNode(b []byte, n *model.LeaseNode) []byte {
	b = appendString(b, 1, n.Node)
	b = appendInt32(b, 2, n.Rank)
	b = appendString(b, 3, n.GPUModel)
	b = appendInt32(b, 4, n.GPUCount)
	for _, u := range n.GPUUUIDs {
		b = appendStringAlways(b, 5, u)
	}
	return appendString(b, 6, n.Cleanup)
}

// appendMessage appends field num holding the message enc appends. The
// length goes before the body, so the body is written after a one-byte
// length and moved when it needs more.
func appendMessage(b []byte, num protowire.Number, enc func([]byte) []byte) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	at := len(b)
	b = enc(append(b, 0))
	n := len(b) - at - 1
	if n < 0x80 {
		b[at] = byte(n)
		return b
	}
	extra := protowire.SizeVarint(uint64(n)) - 1
	b = append(b, make([]byte, extra)...)
	copy(b[at+1+extra:], b[at+1:at+1+n])
	protowire.AppendVarint(b[:at], uint64(n))
	return b
}

// The scalar helpers skip zero values, as proto3 does for fields without
// presence.

func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	return appendStringAlways(b, num, s)
}

// appendStringAlways writes s even when empty: an element of a repeated
// field, which counts as one.
func appendStringAlways(b []byte, num protowire.Number, s string) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func appendVarint(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

// appendInt32 writes an int field as the proto's int32 (negative values
// sign-extended, as proto does).
func appendInt32(b []byte, num protowire.Number, v int) []byte {
	return appendVarint(b, num, uint64(int64(int32(v))))
}

func appendDouble(b []byte, num protowire.Number, v float64) []byte {
	bits := math.Float64bits(v)
	if bits == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.Fixed64Type)
	return protowire.AppendFixed64(b, bits)
}

func appendMap(b []byte, num protowire.Number, m map[string]string) []byte {
	for k, v := range m {
		b = appendMessage(b, num, func(b []byte) []byte {
			return appendString(appendString(b, 1, k), 2, v)
		})
	}
	return b
}

// appendTime writes a google.protobuf.Timestamp, or nothing for the zero
// time (ts's "unset").
func appendTime(b []byte, num protowire.Number, t time.Time) []byte {
	if t.IsZero() {
		return b
	}
	return appendMessage(b, num, func(b []byte) []byte {
		b = appendVarint(b, 1, uint64(t.Unix()))
		return appendVarint(b, 2, uint64(int64(int32(t.Nanosecond()))))
	})
}

// appendDuration writes a google.protobuf.Duration's fields.
func appendDuration(b []byte, d time.Duration) []byte {
	secs := d.Nanoseconds() / 1e9
	b = appendVarint(b, 1, uint64(secs))
	return appendVarint(b, 2, uint64(int64(int32(d.Nanoseconds()-secs*1e9))))
}
