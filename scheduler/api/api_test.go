package api_test

import (
	"context"
	"io"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler"
	"github.com/gpusched/gpusched/scheduler/api"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// field is one expected BadRequest field violation: the exact field and a
// fragment of its description.
type field struct{ name, fragment string }

// call is one RPC against a replica, returning its error.
type call func(ctx context.Context, conn *grpc.ClientConn) error

func submit(spec *pb.JobSpec) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := pb.NewJobServiceClient(conn).SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec})
		return err
	}
}

func getJob(id string) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := pb.NewJobServiceClient(conn).GetJob(ctx, &pb.GetJobRequest{Id: id})
		return err
	}
}

func cancelJob(id string) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := pb.NewJobServiceClient(conn).CancelJob(ctx, &pb.CancelJobRequest{Id: id})
		return err
	}
}

func listJobs(req *pb.ListJobsRequest) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := pb.NewJobServiceClient(conn).ListJobs(ctx, req)
		return err
	}
}

func jobLogs(id string) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		stream, err := pb.NewJobServiceClient(conn).GetJobLogs(ctx, &pb.GetJobLogsRequest{Id: id})
		if err != nil {
			return err
		}
		for {
			if _, err := stream.Recv(); err == io.EOF {
				return nil
			} else if err != nil {
				return err
			}
		}
	}
}

func getNode(id string) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := pb.NewNodeServiceClient(conn).GetNode(ctx, &pb.GetNodeRequest{Id: id})
		return err
	}
}

func listNodes(req *pb.ListNodesRequest) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := pb.NewNodeServiceClient(conn).ListNodes(ctx, req)
		return err
	}
}

// connect opens an agent stream, sends first, and returns the stream's
// error.
func connect(first *pb.ConnectRequest) call {
	return func(ctx context.Context, conn *grpc.ClientConn) error {
		stream, err := pb.NewAgentServiceClient(conn).Connect(ctx)
		if err != nil {
			return err
		}
		if err := stream.Send(first); err != nil {
			return err
		}
		for {
			if _, err := stream.Recv(); err != nil {
				return err
			}
		}
	}
}

func spec(nodes int32) *pb.JobSpec {
	return &pb.JobSpec{Nodes: nodes, Command: []string{"train.sh"}}
}

// checkStatus compares err with the wanted code, message fragment and
// BadRequest violations (in order; none wanted means no detail).
func checkStatus(t *testing.T, err error, code codes.Code, msg string, fields []field) {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("error %v is not a gRPC status", err)
	}
	if st.Code() != code || !strings.Contains(st.Message(), msg) {
		t.Fatalf("status = %s %q; want %s containing %q", st.Code(), st.Message(), code, msg)
	}
	var got []*errdetails.BadRequest_FieldViolation
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			got = append(got, br.GetFieldViolations()...)
		}
	}
	if len(got) != len(fields) {
		t.Fatalf("BadRequest violations = %v; want %v", got, fields)
	}
	for i, f := range fields {
		if got[i].GetField() != f.name || !strings.Contains(got[i].GetDescription(), f.fragment) {
			t.Errorf("violation %d = %s: %q; want %s: ...%q...", i, got[i].GetField(), got[i].GetDescription(), f.name, f.fragment)
		}
	}
}

func TestErrorsReachClientsAsStatusCodes(t *testing.T) {
	c := schedtest.StartCluster(t, schedtest.ClusterConfig{Scheduler: scheduler.Config{Name: "leader"}})
	// One job that exists and has ended, for the precondition case.
	ended := schedtest.Submit(t, c.Replica.Jobs, spec(1))
	if _, err := c.Replica.Jobs.CancelJob(schedtest.Context(t), &pb.CancelJobRequest{Id: ended.GetId()}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		call   call
		code   codes.Code
		msg    string
		fields []field
	}{
		{"zero nodes is an invalid argument on spec.nodes", submit(spec(0)),
			codes.InvalidArgument, "spec.nodes: must be at least 1, got 0", []field{{"spec.nodes", "must be at least 1, got 0"}}},
		{"a missing spec is an invalid argument", submit(nil),
			codes.InvalidArgument, "spec: is required", []field{{"spec", "is required"}}},
		{"every bad field of a spec is reported in one error",
			submit(&pb.JobSpec{Nodes: -1, GpuModel: "Z1", Env: map[string]string{"GPUSCHED_RANK": "0"}}),
			codes.InvalidArgument, "spec.nodes", []field{
				{"spec.nodes", "at least 1"}, {"spec.gpu_model", `unknown GPU model "Z1"`},
				{"spec.command", "must not be empty"}, {"spec.env", `key "GPUSCHED_RANK" is set by gpusched itself`},
			}},
		{"an invalid duration is reported on spec.time_limit",
			submit(&pb.JobSpec{Nodes: 1, Command: []string{"x"}, TimeLimit: &durationpb.Duration{Seconds: -1, Nanos: 5}}),
			codes.InvalidArgument, "time_limit", []field{{"spec.time_limit", "must not be negative"}}},
		{"an unknown job is not found", getJob("424242"), codes.NotFound, "job 424242 not found", nil},
		{"an empty job ID is an invalid argument", getJob(""), codes.InvalidArgument, "id", []field{{"id", "must not be empty"}}},
		{"a job ID with a slash is an invalid argument", getJob("../x"), codes.InvalidArgument, "id", []field{{"id", "is not a valid ID"}}},
		{"cancelling an unknown job is not found", cancelJob("77"), codes.NotFound, "job 77 not found", nil},
		{"cancelling an ended job fails its precondition", cancelJob(ended.GetId()), codes.FailedPrecondition, "already ended (CANCELLED)", nil},
		{"logs of an unknown job are not found", jobLogs("88"), codes.NotFound, "job 88 not found", nil},
		{"an unknown node is not found", getNode("gpu-99"), codes.NotFound, "node gpu-99 not found", nil},
		{"a bad page token is an invalid argument", listJobs(&pb.ListJobsRequest{PageToken: "x"}),
			codes.InvalidArgument, "page_token", []field{{"page_token", "is not a token from a previous response"}}},
		{"a negative page size is an invalid argument", listJobs(&pb.ListJobsRequest{PageSize: -1}),
			codes.InvalidArgument, "page_size", []field{{"page_size", "must not be negative"}}},
		{"an unknown job state filter is an invalid argument",
			listJobs(&pb.ListJobsRequest{States: []pb.JobState{pb.JobState_JOB_STATE_RUNNING, pb.JobState(99)}}),
			codes.InvalidArgument, "states[1]", []field{{"states[1]", "unknown job state"}}},
		{"an unspecified node state filter is an invalid argument",
			listNodes(&pb.ListNodesRequest{States: []pb.NodeState{pb.NodeState_NODE_STATE_UNSPECIFIED}}),
			codes.InvalidArgument, "states[0]", []field{{"states[0]", "unknown node state"}}},
		{"an agent that does not say hello first is refused",
			connect(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Heartbeat{Heartbeat: &pb.Heartbeat{}}}),
			codes.InvalidArgument, "first message must be hello", nil},
		{"an agent with an invalid node ID is refused",
			connect(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Hello{Hello: &pb.AgentHello{NodeId: "bad id"}}}),
			codes.InvalidArgument, "hello.node_id", []field{{"hello.node_id", "is not a valid ID"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call(schedtest.Context(t), c.Replica.Conn)
			checkStatus(t, err, tc.code, tc.msg, tc.fields)
		})
	}
}

func TestAStandbyForwardsLeaderOnlyCallsToTheLeader(t *testing.T) {
	c := schedtest.StartCluster(t, schedtest.ClusterConfig{Scheduler: scheduler.Config{Name: "leader"}})
	standby := schedtest.StartReplica(t, scheduler.Config{Etcd: c.Etcd.Client, Name: "standby"})
	cases := []struct {
		name string
		call call
		code codes.Code
		msg  string
	}{
		{"SubmitJob is accepted by the leader", submit(spec(1)), codes.OK, ""},
		{"GetJob answers from the leader", getJob("1"), codes.OK, ""},
		{"GetJob of an unknown job is the leader's NotFound", getJob("99"), codes.NotFound, "job 99 not found"},
		{"ListJobs answers from the leader", listJobs(&pb.ListJobsRequest{}), codes.OK, ""},
		{"CancelJob reaches the leader", cancelJob("1"), codes.OK, ""},
		{"GetJobLogs is relayed from the leader", jobLogs("1"), codes.OK, ""},
		{"GetNode answers from the leader", getNode("n1"), codes.NotFound, "node n1 not found"},
		{"ListNodes answers from the leader", listNodes(&pb.ListNodesRequest{}), codes.OK, ""},
		{"an agent's Connect is refused: its stream belongs on the leader",
			connect(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Hello{Hello: &pb.AgentHello{NodeId: "n1"}}}),
			codes.Unavailable, "standby: scheduler: not leader"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call(schedtest.Context(t), standby.Conn)
			if tc.code == codes.OK {
				if err != nil {
					t.Fatalf("got %v; want success", err)
				}
				return
			}
			checkStatus(t, err, tc.code, tc.msg, nil)
		})
	}
	if j := schedtest.GetJob(t, c.Replica.Jobs, "1"); j.GetState() != pb.JobState_JOB_STATE_CANCELLED {
		t.Errorf("the leader's job 1 is %s; want CANCELLED through the standby", j.GetState())
	}
}

func TestAForwardedCallIsNeverForwardedAgain(t *testing.T) {
	c := schedtest.StartCluster(t, schedtest.ClusterConfig{Scheduler: scheduler.Config{Name: "leader"}})
	standby := schedtest.StartReplica(t, scheduler.Config{Etcd: c.Etcd.Client, Name: "standby"})
	// As if another replica had forwarded the call here already.
	ctx := metadata.AppendToOutgoingContext(schedtest.Context(t), "gpusched-forwarded", "1")
	err := getJob("1")(ctx, standby.Conn)
	checkStatus(t, err, codes.Unavailable, "standby: scheduler: not leader; cannot forward to the leader: already forwarded once", nil)
}

func TestListingThroughTheAPI(t *testing.T) {
	c := schedtest.StartCluster(t, schedtest.ClusterConfig{Scheduler: scheduler.Config{Name: "leader"}, Agents: 2})
	ctx := schedtest.Context(t)
	for range 5 {
		schedtest.Submit(t, c.Replica.Jobs, &pb.JobSpec{Nodes: 3, Command: []string{"x"}}) // never fits
	}
	if _, err := c.Replica.Jobs.CancelJob(ctx, &pb.CancelJobRequest{Id: "4"}); err != nil {
		t.Fatal(err)
	}
	var ids []string
	token := ""
	for pages := 0; ; pages++ {
		resp, err := c.Replica.Jobs.ListJobs(ctx, &pb.ListJobsRequest{PageSize: 2, PageToken: token,
			States: []pb.JobState{pb.JobState_JOB_STATE_PENDING}})
		if err != nil {
			t.Fatal(err)
		}
		for _, j := range resp.GetJobs() {
			ids = append(ids, j.GetId())
		}
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
		if pages > 5 {
			t.Fatal("paging does not end")
		}
	}
	if strings.Join(ids, ",") != "1,2,3,5" {
		t.Errorf("pending jobs paged through = %v; want 1,2,3,5", ids)
	}
	resp, err := c.Replica.Nodes.ListNodes(ctx, &pb.ListNodesRequest{States: []pb.NodeState{pb.NodeState_NODE_STATE_READY}})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetNodes()) != 2 || resp.GetNodes()[0].GetId() != "node-0" || resp.GetNodes()[1].GetId() != "node-1" {
		t.Errorf("ready nodes = %s; want node-0, node-1 in order", schedtest.DescribeNodes(resp.GetNodes()))
	}
	n := resp.GetNodes()[0]
	if inv := n.GetInventory(); inv.GetGpuModel() != "H100" || inv.GetGpuCount() != 8 || len(inv.GetGpus()) != 8 || !n.GetConnected() || n.GetAddress() != "node-0:29500" {
		t.Errorf("node-0 = %v", n)
	}
	resp, err = c.Replica.Nodes.ListNodes(ctx, &pb.ListNodesRequest{States: []pb.NodeState{pb.NodeState_NODE_STATE_LEASED}})
	if err != nil || len(resp.GetNodes()) != 0 {
		t.Errorf("leased nodes = %v, %v; want none", resp.GetNodes(), err)
	}
}

func TestAStandbyPointsAgentsToTheLeader(t *testing.T) {
	c := schedtest.StartCluster(t, schedtest.ClusterConfig{Scheduler: scheduler.Config{Name: "leader"}})
	standby := schedtest.StartReplica(t, scheduler.Config{Etcd: c.Etcd.Client, Name: "standby"})
	stream, err := pb.NewAgentServiceClient(standby.Conn).Connect(schedtest.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Hello{Hello: &pb.AgentHello{NodeId: "n1"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("Recv = %v; want Unavailable", err)
	}
	if got := stream.Trailer().Get(api.LeaderTrailer); len(got) != 1 || got[0] != c.Replica.Addr {
		t.Fatalf("trailer %s = %v; want the leader's address %s", api.LeaderTrailer, got, c.Replica.Addr)
	}
}
