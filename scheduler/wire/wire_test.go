package wire

import (
	"reflect"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
)

// at returns a UTC time without a monotonic reading, as times come back
// from protobuf.
func at(sec int, nsec int) time.Time { return time.Date(2026, 3, 1, 12, 0, sec, nsec, time.UTC) }

// viaBytes marshals and unmarshals m, as the store and gRPC do.
func viaBytes[M proto.Message](t *testing.T, m M, fresh M) M {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatalf("marshal: %v", err)
	}
	if err := proto.Unmarshal(b, fresh); err != nil {
		t.Fatalf("unmarshal: %v", err)
	}
	return fresh
}

func TestJobRoundTrip(t *testing.T) {
	cases := []struct {
		name string
		job  *model.Job
	}{
		{"a pending job with only a spec", &model.Job{
			ID: "1", Spec: model.JobSpec{Tenant: "default", Nodes: 1, Command: []string{"true"}},
			State: model.JobPending, Reason: "waiting", CreateTime: at(0, 0),
		}},
		{"a failed gang job with exits, times, env and a time limit", &model.Job{
			ID: "42",
			Spec: model.JobSpec{Name: "llm-pretrain", Tenant: "acme", Nodes: 2, GPUModel: "H100", GPUsPerNode: 8,
				Command: []string{"torchrun", "train.py", "--lr=3e-4"}, Env: map[string]string{"EPOCHS": "3", "WANDB_MODE": "off"},
				TimeLimit: 90*time.Minute + 500*time.Millisecond},
			State: model.JobFailed, Reason: "node n2 (rank 1) exited with code 3", LeaseID: "42.2", Nodes: []string{"n1", "n2"},
			CreateTime: at(0, 1), ScheduleTime: at(1, 2), StartTime: at(2, 3), EndTime: at(59, 999999999),
			Exits: []model.NodeExit{
				{Node: "n1", Rank: 0, ExitCode: 0, Time: at(30, 0)},
				{Node: "n2", Rank: 1, ExitCode: 3, Message: "CUDA error", Time: at(31, 0)},
			},
			Attempts: 2,
		}},
		{"a cancelled job killed by a signal", &model.Job{
			ID: "7", Spec: model.JobSpec{Tenant: "t", Nodes: 1, Command: []string{"sleep", "inf"}},
			State: model.JobCancelled, Reason: "cancelled by user", LeaseID: "7.1", Nodes: []string{"n1"},
			Exits:    []model.NodeExit{{Node: "n1", ExitCode: -1, Signal: "SIGKILL", Message: "killed by SIGKILL", Time: at(5, 0)}},
			Attempts: 1, EndTime: at(6, 0),
		}},
		{"a job whose last lease left a summary", &model.Job{
			ID: "8", Spec: model.JobSpec{Tenant: "t", Nodes: 1, Command: []string{"x"}},
			State: model.JobSucceeded, LeaseID: "8.1", Attempts: 1, LastLeaseSummary: summary("8.1"),
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := JobFromProto(viaBytes(t, JobToProto(c.job), &pb.Job{}))
			if !reflect.DeepEqual(got, c.job) {
				t.Fatalf("round trip changed the job:\n got %+v\nwant %+v", got, c.job)
			}
		})
	}
}

// summary is a complete lease summary with every field set.
func summary(lease string) model.LeaseSummary {
	return model.LeaseSummary{
		LeaseID: lease, GPUHours: 16, XIDEvents: 3, ForeignProcessEvents: 4,
		TelemetryUsage: model.TelemetryUsage{
			Samples: 960, FirstSample: at(1, 5), LastSample: at(59, 0),
			MeanGPUUtil: 87.5, PeakGPUUtil: 100, PeakFBUsedBytes: 80 << 30, EnergyWh: 1234.5,
		},
	}
}

func TestJobSpecFromProto(t *testing.T) {
	cases := []struct {
		name string
		in   *pb.JobSpec
		want model.JobSpec
	}{
		{"a nil spec is the zero spec", nil, model.JobSpec{}},
		{"no time limit is zero", &pb.JobSpec{Nodes: 1}, model.JobSpec{Nodes: 1, MaxRetries: model.DefaultMaxRetries}},
		{"a time limit converts to a duration", &pb.JobSpec{TimeLimit: durationpb.New(time.Hour)}, model.JobSpec{TimeLimit: time.Hour, MaxRetries: model.DefaultMaxRetries}},
		{"an invalid duration becomes negative so validation reports it",
			&pb.JobSpec{TimeLimit: &durationpb.Duration{Seconds: 1, Nanos: -1}}, model.JobSpec{TimeLimit: -1, MaxRetries: model.DefaultMaxRetries}},
		{"unset max retries is the default", &pb.JobSpec{}, model.JobSpec{MaxRetries: model.DefaultMaxRetries}},
		{"zero max retries stays zero", &pb.JobSpec{MaxRetries: proto.Int32(0)}, model.JobSpec{MaxRetries: 0}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := JobSpecFromProto(c.in); !reflect.DeepEqual(got, c.want) {
				t.Fatalf("JobSpecFromProto = %+v; want %+v", got, c.want)
			}
		})
	}
	if _, err := model.NormalizeJobSpec(model.JobSpec{Nodes: 1, Command: []string{"x"}, TimeLimit: -1}); err == nil {
		t.Error("validation accepts the -1ns an invalid duration converts to")
	}
	if p := JobSpecToProto(model.JobSpec{}); p.GetTimeLimit() != nil {
		t.Errorf("a zero time limit is sent as %v; want unset", p.GetTimeLimit())
	}
}

func TestNodeRoundTrip(t *testing.T) {
	cases := []struct {
		name string
		node *model.Node
	}{
		{"a bare node", &model.Node{ID: "n0", State: model.NodeReady}},
		{"a leased node with a full inventory and labels", &model.Node{
			ID: "gpu-07",
			Inventory: model.Inventory{
				GPUModel: "H100", GPUCount: 2, GPUMemoryBytes: 80 << 30, DriverVersion: "550.54.15", CUDAVersion: "12.4", Hostname: "gpu-07.dc1",
				GPUs: []model.GPU{
					{Index: 0, UUID: "GPU-aaaa", Name: "NVIDIA H100 80GB HBM3", MemoryBytes: 80 << 30, PCIBusID: "00000000:18:00.0"},
					{Index: 1, UUID: "GPU-bbbb", Name: "NVIDIA H100 80GB HBM3", MemoryBytes: 80 << 30, PCIBusID: "00000000:2A:00.0"},
				},
			},
			State: model.NodeLeased, Labels: map[string]string{"pool": "train", "rack": "r3"},
			LeaseID: "9.1", JobID: "9", Address: "10.0.0.7:29500", RegisterTime: at(10, 0),
			Reason: "", Connected: true,
		}},
		{"an unhealthy node keeps its reason", &model.Node{ID: "n1", State: model.NodeUnhealthy, Reason: "cleanup after lease 3.1 failed: GPU 0 busy"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := NodeFromProto(viaBytes(t, NodeToProto(c.node), &pb.Node{}))
			if !reflect.DeepEqual(got, c.node) {
				t.Fatalf("round trip changed the node:\n got %+v\nwant %+v", got, c.node)
			}
		})
	}
}

func TestLeaseRoundTrip(t *testing.T) {
	cases := []struct {
		name  string
		lease *model.Lease
		state pb.LeaseState
	}{
		{"an active gang lease", &model.Lease{
			ID: "42.1", JobID: "42", Tenant: "acme", Active: true, FencingToken: 1234, StartTime: at(1, 0),
			Nodes: []model.LeaseNode{
				{Node: "n1", Rank: 0, GPUModel: "H100", GPUCount: 8, GPUUUIDs: []string{"GPU-1", "GPU-2"}},
				{Node: "n2", Rank: 1, GPUModel: "H100", GPUCount: 8, GPUUUIDs: []string{"GPU-3"}},
			},
		}, pb.LeaseState_LEASE_STATE_ACTIVE},
		{"an ended lease with its reason", &model.Lease{
			ID: "42.2", JobID: "42", Tenant: "acme", FencingToken: 99, StartTime: at(1, 0), EndTime: at(50, 5),
			EndReason: "TIMED_OUT: exceeded time limit 1h0m0s",
			Nodes:     []model.LeaseNode{{Node: "n1", GPUModel: "A100", GPUCount: 4, GPUUUIDs: []string{"GPU-9"}}},
		}, pb.LeaseState_LEASE_STATE_ENDED},
		{"an active lease that counted events", &model.Lease{
			ID: "5.1", JobID: "5", Tenant: "t", Active: true, StartTime: at(1, 0),
			Summary: model.LeaseSummary{XIDEvents: 2, ForeignProcessEvents: 1},
		}, pb.LeaseState_LEASE_STATE_ACTIVE},
		{"an ended lease with its summary", &model.Lease{
			ID: "5.2", JobID: "5", Tenant: "t", StartTime: at(1, 0), EndTime: at(3, 0),
			Summary: summary("5.2"),
		}, pb.LeaseState_LEASE_STATE_ENDED},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := LeaseToProto(c.lease)
			if p.GetState() != c.state {
				t.Errorf("state = %s; want %s", p.GetState(), c.state)
			}
			got := LeaseFromProto(viaBytes(t, p, &pb.Lease{}))
			if !reflect.DeepEqual(got, c.lease) {
				t.Fatalf("round trip changed the lease:\n got %+v\nwant %+v", got, c.lease)
			}
		})
	}
}

// The converters cast states straight across, so the model's numbering must
// be the proto's. Checked for every state by name, in both directions.
func TestJobStatesMatchTheProtoEnum(t *testing.T) {
	states := []model.JobState{model.JobPending, model.JobScheduled, model.JobRunning, model.JobSucceeded,
		model.JobFailed, model.JobCancelled, model.JobTimedOut}
	if len(states) != len(pb.JobState_name)-1 {
		t.Fatalf("model has %d job states; the proto enum has %d besides UNSPECIFIED", len(states), len(pb.JobState_name)-1)
	}
	for _, s := range states {
		t.Run(s.String(), func(t *testing.T) {
			protoName := "JOB_STATE_" + s.String()
			v, ok := pb.JobState_value[protoName]
			if !ok {
				t.Fatalf("proto has no %s", protoName)
			}
			if pb.JobState(v) != pb.JobState(s) || model.JobState(v) != s {
				t.Fatalf("%s is %d in the model and %d in the proto", s, int(s), v)
			}
		})
	}
}

func TestNodeStatesMatchTheProtoEnum(t *testing.T) {
	states := []model.NodeState{model.NodeReady, model.NodeLeased, model.NodeCleaning, model.NodeDraining,
		model.NodeDrained, model.NodeUnhealthy, model.NodeLost}
	if len(states) != len(pb.NodeState_name)-1 {
		t.Fatalf("model has %d node states; the proto enum has %d besides UNSPECIFIED", len(states), len(pb.NodeState_name)-1)
	}
	for _, s := range states {
		t.Run(s.String(), func(t *testing.T) {
			protoName := "NODE_STATE_" + s.String()
			v, ok := pb.NodeState_value[protoName]
			if !ok {
				t.Fatalf("proto has no %s", protoName)
			}
			if pb.NodeState(v) != pb.NodeState(s) || model.NodeState(v) != s {
				t.Fatalf("%s is %d in the model and %d in the proto", s, int(s), v)
			}
		})
	}
}

func TestSpotChecksOfStateNumbers(t *testing.T) {
	if model.JobPending.String() != "PENDING" || pb.JobState_JOB_STATE_PENDING != pb.JobState(model.JobPending) {
		t.Error("PENDING differs between model and proto")
	}
	if model.JobTimedOut.String() != "TIMED_OUT" || pb.JobState_JOB_STATE_TIMED_OUT != pb.JobState(model.JobTimedOut) {
		t.Error("TIMED_OUT differs between model and proto")
	}
	if model.NodeLost.String() != "LOST" || pb.NodeState_NODE_STATE_LOST != pb.NodeState(model.NodeLost) {
		t.Error("LOST differs between model and proto")
	}
}
