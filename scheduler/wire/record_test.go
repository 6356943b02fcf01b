package wire

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
)

// The records AppendJobRecord and AppendLeaseRecord write decode to what
// JobToProto and LeaseToProto build, for values that between them set
// every field of every message in a record; a field added to the protos
// and to the ToProto functions but not to the Append ones fails here.
func TestRecordsDecodeAsTheirProtos(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	set := map[protoreflect.FullName]bool{}
	for i := range 500 {
		j := randomJob(r)
		want := JobToProto(j)
		var got pb.Job
		if err := proto.Unmarshal(AppendJobRecord(nil, j), &got); err != nil {
			t.Fatalf("job %d: %v", i, err)
		}
		if !proto.Equal(&got, want) {
			t.Fatalf("job %d decodes as\n%v\nwant\n%v", i, &got, want)
		}
		fieldsSet(want.ProtoReflect(), set)

		l := randomLease(r)
		wantL := LeaseToProto(l)
		var gotL pb.Lease
		if err := proto.Unmarshal(AppendLeaseRecord([]byte("kept"), l)[4:], &gotL); err != nil {
			t.Fatalf("lease %d: %v", i, err)
		}
		if !proto.Equal(&gotL, wantL) {
			t.Fatalf("lease %d decodes as\n%v\nwant\n%v", i, &gotL, wantL)
		}
		fieldsSet(wantL.ProtoReflect(), set)
	}
	for _, m := range []protoreflect.MessageDescriptor{
		(&pb.Job{}).ProtoReflect().Descriptor(), (&pb.Lease{}).ProtoReflect().Descriptor(),
	} {
		for _, missing := range unset(m, set, map[protoreflect.FullName]bool{}) {
			t.Errorf("no test value sets %s: set it in randomJob or randomLease (and encode it in record.go)", missing)
		}
	}
}

// A message longer than 127 bytes needs a longer length prefix than the
// one byte appendMessage reserves.
func TestAppendMessageMovesALongBody(t *testing.T) {
	for _, n := range []int{0, 1, 127, 128, 300, 16383, 16384, 70000} {
		var got pb.Job
		if err := proto.Unmarshal(AppendJobRecord(nil, &model.Job{ID: "1", Spec: model.JobSpec{Name: string(make([]byte, n))}}), &got); err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if len(got.GetSpec().GetName()) != n {
			t.Errorf("a spec with a %d-byte name decodes with %d", n, len(got.GetSpec().GetName()))
		}
	}
}

func fieldsSet(m protoreflect.Message, set map[protoreflect.FullName]bool) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		set[fd.FullName()] = true
		switch {
		case fd.IsList() && fd.Message() != nil:
			for i := 0; i < v.List().Len(); i++ {
				fieldsSet(v.List().Get(i).Message(), set)
			}
		case fd.IsMap():
		case fd.Message() != nil:
			fieldsSet(v.Message(), set)
		}
		return true
	})
}

func unset(m protoreflect.MessageDescriptor, set, seen map[protoreflect.FullName]bool) (missing []protoreflect.FullName) {
	if seen[m.FullName()] {
		return nil
	}
	seen[m.FullName()] = true
	for i := 0; i < m.Fields().Len(); i++ {
		fd := m.Fields().Get(i)
		if !set[fd.FullName()] {
			missing = append(missing, fd.FullName())
		}
		if fd.Message() != nil && !fd.IsMap() {
			missing = append(missing, unset(fd.Message(), set, seen)...)
		}
	}
	return missing
}

func randomString(r *rand.Rand) string {
	if r.IntN(4) == 0 {
		return ""
	}
	return fmt.Sprintf("s%d-ünï-%x", r.IntN(1000), r.Uint64())
}

func randomStrings(r *rand.Rand) []string {
	var out []string
	for range r.IntN(4) {
		out = append(out, randomString(r)) // "" too: an element counts
	}
	return out
}

func randomMap(r *rand.Rand) map[string]string {
	if r.IntN(3) == 0 {
		return nil
	}
	m := map[string]string{}
	for range r.IntN(4) {
		m[randomString(r)] = randomString(r)
	}
	return m
}

func randomInt(r *rand.Rand) int {
	switch r.IntN(4) {
	case 0:
		return 0
	case 1:
		return -r.IntN(1000)
	default:
		return r.IntN(1 << 20)
	}
}

func randomTime(r *rand.Rand) time.Time {
	switch r.IntN(4) {
	case 0:
		return time.Time{}
	case 1:
		return time.Unix(-r.Int64N(1e9), r.Int64N(1e9)).UTC() // before 1970
	default:
		return time.Unix(r.Int64N(4e9), r.Int64N(1e9)).UTC()
	}
}

func randomSummary(r *rand.Rand) model.LeaseSummary {
	if r.IntN(4) == 0 {
		return model.LeaseSummary{}
	}
	return model.LeaseSummary{
		LeaseID: randomString(r), GPUHours: r.Float64() * 100, XIDEvents: r.IntN(3), ForeignProcessEvents: r.IntN(3),
		TelemetryUsage: model.TelemetryUsage{
			Samples: r.Uint64N(1e6), FirstSample: randomTime(r), LastSample: randomTime(r),
			MeanGPUUtil: r.Float64() * 100, PeakGPUUtil: uint32(r.IntN(101)), PeakFBUsedBytes: r.Uint64(), EnergyWh: r.Float64() * 1e4,
		},
	}
}

func randomJob(r *rand.Rand) *model.Job {
	j := &model.Job{
		ID: randomString(r), State: model.JobState(r.IntN(7)), Reason: randomString(r), LeaseID: randomString(r),
		Nodes: randomStrings(r), CreateTime: randomTime(r), ScheduleTime: randomTime(r), StartTime: randomTime(r),
		EndTime: randomTime(r), Attempts: randomInt(r), Retries: randomInt(r), IdempotencyKey: randomString(r),
		LastLeaseSummary: randomSummary(r),
		Spec: model.JobSpec{
			Name: randomString(r), Tenant: randomString(r), Nodes: randomInt(r), GPUModel: randomString(r),
			GPUsPerNode: randomInt(r), Command: randomStrings(r), Env: randomMap(r), MaxRetries: randomInt(r),
			MinGPUMemoryBytes: r.Uint64N(1 << 40), Selector: randomMap(r), Topology: randomString(r),
			PreferTopology: randomString(r), Queue: randomString(r), Priority: randomInt(r), Labels: randomMap(r),
			JobSet: randomString(r),
		},
	}
	if r.IntN(2) == 0 {
		j.Spec.TimeLimit = time.Duration(r.Int64N(int64(48 * time.Hour)))
	}
	for range r.IntN(3) {
		j.Exits = append(j.Exits, model.NodeExit{Node: randomString(r), Rank: randomInt(r), ExitCode: randomInt(r),
			Signal: randomString(r), Message: randomString(r), Time: randomTime(r)})
	}
	for range r.IntN(3) {
		j.Events = append(j.Events, model.NodeEvent{Time: randomTime(r), Kind: model.NodeEventKind(r.IntN(5)),
			Node: randomString(r), GPU: randomInt(r), LeaseID: randomString(r), PID: r.Uint32(), XID: r.Uint64N(200),
			Action: randomString(r), Message: randomString(r)})
	}
	for i := range r.IntN(4) {
		j.Transitions = append(j.Transitions, model.Transition{Seq: i + 1, State: model.JobState(r.IntN(7)),
			Time: randomTime(r), Reason: randomString(r)})
	}
	return j
}

func randomLease(r *rand.Rand) *model.Lease {
	l := &model.Lease{
		ID: randomString(r), JobID: randomString(r), Tenant: randomString(r), Active: r.IntN(2) == 0,
		FencingToken: r.Int64N(1 << 40), StartTime: randomTime(r), EndTime: randomTime(r),
		EndReason: randomString(r), Summary: randomSummary(r),
	}
	for i := range r.IntN(5) {
		l.Nodes = append(l.Nodes, model.LeaseNode{Node: randomString(r), Rank: i, GPUModel: randomString(r),
			GPUCount: randomInt(r), GPUUUIDs: randomStrings(r), Cleanup: randomString(r)})
	}
	return l
}
