package api_test

import (
	"context"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
)

func streamTelemetry(req *pb.StreamTelemetryRequest) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		stream, err := pb.NewTelemetryServiceClient(conn).StreamTelemetry(ctx, req)
		if err != nil {
			return err
		}
		_, err = stream.Recv()
		return err
	}
}

func getTelemetry(req *pb.GetTelemetryRequest) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := pb.NewTelemetryServiceClient(conn).GetTelemetry(ctx, req)
		return err
	}
}

func watchTelemetry(req *pb.WatchTelemetryRequest) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		stream, err := pb.NewTelemetryServiceClient(conn).WatchTelemetry(ctx, req)
		if err != nil {
			return err
		}
		_, err = stream.Recv()
		return err
	}
}

func TestTelemetryRequestsAreValidatedFieldByField(t *testing.T) {
	c := schedtest.StartCluster(t, schedtest.ClusterConfig{Scheduler: scheduler.Config{Name: "leader"}})
	cases := []struct {
		name   string
		call   call
		fields []field
	}{
		{"an unknown field name", streamTelemetry(&pb.StreamTelemetryRequest{Fields: []string{"gpu_util", "gpu_utilisation"}}),
			[]field{{"fields[1]", `unknown field "gpu_utilisation"`}}},
		{"a negative interval", streamTelemetry(&pb.StreamTelemetryRequest{Every: durationpb.New(-1)}),
			[]field{{"every", "must not be negative"}}},
		{"a malformed interval", streamTelemetry(&pb.StreamTelemetryRequest{Every: &durationpb.Duration{Seconds: 1, Nanos: -1}}),
			[]field{{"every", "is not a valid duration"}}},
		{"every bad filter at once", streamTelemetry(&pb.StreamTelemetryRequest{
			Nodes: []string{"gpu-01", "bad node"}, JobIds: []string{"../7"}, LeaseIds: []string{""}, Tenant: "a b",
		}), []field{
			{"nodes[1]", "is not a valid ID"}, {"job_ids[0]", "is not a valid ID"},
			{"lease_ids[0]", "must not be empty"}, {"tenant", "is not a valid ID"},
		}},
		{"a history of nothing in particular", getTelemetry(&pb.GetTelemetryRequest{}),
			[]field{{"node", "one of node, job_id or lease_id is required"}}},
		{"a bad history request", getTelemetry(&pb.GetTelemetryRequest{
			Node: "n/1", Fields: []string{"temp"}, Every: durationpb.New(-1), Since: &timestamppb.Timestamp{Nanos: -1}, Limit: -1,
		}), []field{
			{"node", "is not a valid ID"}, {"fields[0]", `unknown field "temp"`}, {"every", "must not be negative"},
			{"since", "is not a valid timestamp"}, {"limit", "must not be negative"},
		}},
		{"too large a limit", getTelemetry(&pb.GetTelemetryRequest{JobId: "1", Limit: 1 << 20}),
			[]field{{"limit", "must be at most 20000"}}},
		{"a bad watch", watchTelemetry(&pb.WatchTelemetryRequest{Nodes: []string{""}, JobId: "x y"}),
			[]field{{"nodes[0]", "must not be empty"}, {"job_id", "is not a valid ID"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call(schedtest.Context(t), c.Replica.Conn)
			checkStatus(t, err, codes.InvalidArgument, tc.fields[0].name, tc.fields)
		})
	}
}

func TestGetTelemetryAnswersFromTheLeadersHistory(t *testing.T) {
	c := schedtest.StartCluster(t, schedtest.ClusterConfig{Scheduler: scheduler.Config{Name: "leader"}, Agents: 1})
	b := &pb.TelemetryBatch{Time: timestamppb.Now(), Samples: []*pb.GpuSample{{Gpu: 0, GpuUtil: 42, GpuTemp: 60}}}
	if err := c.Agents[0].Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Telemetry{Telemetry: b}}); err != nil {
		t.Fatal(err)
	}
	tel := pb.NewTelemetryServiceClient(c.Replica.Conn)
	schedtest.Eventually(t, "the sample in node-0's history", func() (bool, string) {
		resp, err := tel.GetTelemetry(schedtest.Context(t), &pb.GetTelemetryRequest{Node: "node-0", Fields: []string{"gpu_util"}})
		if err != nil {
			return false, err.Error()
		}
		s := resp.GetSamples()
		return len(s) == 1 && s[0].GetSample().GetGpuUtil() == 42 && s[0].GetSample().GetGpuTemp() == 0 && s[0].GetNode() == "node-0", resp.String()
	})
}
