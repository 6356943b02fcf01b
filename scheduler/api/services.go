package api

import (
	"context"
	"errors"
	"fmt"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
	"github.com/gpusched/gpusched/scheduler/telemetry"
	"github.com/gpusched/gpusched/scheduler/wire"
)

// Backend is what the services need from the replica they run in.
type Backend struct {
	// Leader returns the engine of the current term, or an error wrapping
	// model.ErrNotLeader when this replica does not lead. Required.
	Leader func() (*engine.Engine, error)
	// LeaderConn returns a connection to the replica that leads, so a
	// follower can forward leader-only work. Nil: followers answer
	// Unavailable and clients fail over by themselves.
	LeaderConn func(ctx context.Context) (*grpc.ClientConn, error)
	// LeaderAddr returns the leader's address, which a replica that
	// refuses an agent hands to it (trailer LeaderTrailer): a follower
	// names the leader, so the agent reconnects there at once; a leader
	// still loading its state names itself, so the agent comes back to it
	// after a backoff. It is called for every refused stream (thousands a
	// second while 10,000 agents wait out a cold start), so it must be
	// cheap: no etcd read per call. Nil: no hint.
	LeaderAddr func(ctx context.Context) (string, error)
	// Status reports the replicas and the leader (ClusterService). Nil:
	// the service is not registered.
	Status func(ctx context.Context) (*pb.GetStatusResponse, error)
	// Telemetry is the replica's telemetry hub (TelemetryService). Nil:
	// the service is not registered.
	Telemetry *telemetry.Hub
	// Store serves WatchJobs straight from etcd, on any replica. Nil:
	// WatchJobs answers Unimplemented.
	Store *store.Store
}

// Register adds every public service to srv.
func Register(srv *grpc.Server, b Backend) {
	pb.RegisterJobServiceServer(srv, &jobServer{b: b})
	pb.RegisterNodeServiceServer(srv, &nodeServer{b: b})
	pb.RegisterAgentServiceServer(srv, &agentServer{b: b})
	if b.Status != nil {
		pb.RegisterClusterServiceServer(srv, &clusterServer{b: b})
	}
	if b.Telemetry != nil {
		pb.RegisterTelemetryServiceServer(srv, &telemetryServer{b: b})
	}
	pb.RegisterMockServiceServer(srv, &mockServer{b: b})
	pb.RegisterTenantServiceServer(srv, &tenantServer{b: b})
	pb.RegisterQueueServiceServer(srv, &queueServer{b: b})
}

// forwardedKey marks a call a follower forwarded, so it is never forwarded
// twice (two replicas that each think the other leads must not ping-pong).
const forwardedKey = "gpusched-forwarded"

// call runs a leader-only RPC: on the engine when this replica leads, else
// forwarded to the leader, whose answer (or status error) is returned as is.
func call[R any](ctx context.Context, b Backend, local func(*engine.Engine) (R, error), remote func(context.Context, *grpc.ClientConn) (R, error)) (R, error) {
	eng, err := b.Leader()
	if err == nil {
		r, err := local(eng)
		return r, toStatus(err)
	}
	var zero R
	conn, ferr := leaderConn(ctx, b)
	if ferr != nil {
		return zero, toStatus(fmt.Errorf("%w; cannot forward to the leader: %v", err, ferr))
	}
	r, err := remote(metadata.AppendToOutgoingContext(ctx, forwardedKey, "1"), conn)
	if st, ok := status.FromError(err); ok && st.Code() == codes.Unavailable && len(st.Details()) == 0 {
		// The leader we know of cannot be reached (it died and its key has
		// not expired yet): to the client that is an election under way.
		return r, toStatus(model.Errorf(model.ErrNotLeader, "leader unreachable: %s", st.Message()))
	}
	return r, err
}

// leaderConn returns a connection to the leader if this call may be
// forwarded, or why not.
func leaderConn(ctx context.Context, b Backend) (*grpc.ClientConn, error) {
	if b.LeaderConn == nil {
		return nil, errors.New("forwarding disabled")
	}
	if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get(forwardedKey)) > 0 {
		return nil, errors.New("already forwarded once")
	}
	return b.LeaderConn(ctx)
}

type jobServer struct {
	pb.UnimplementedJobServiceServer
	b Backend
}

var _ pb.JobServiceServer = (*jobServer)(nil)

func (s *jobServer) SubmitJob(ctx context.Context, req *pb.SubmitJobRequest) (*pb.SubmitJobResponse, error) {
	if req.GetSpec() == nil {
		return nil, toStatus(&model.ValidationError{Violations: []model.FieldViolation{{Field: "spec", Description: "is required"}}})
	}
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.SubmitJobResponse, error) {
		j, err := eng.SubmitIdempotent(ctx, wire.JobSpecFromProto(req.GetSpec()), req.GetIdempotencyKey())
		if err != nil {
			return nil, err
		}
		return &pb.SubmitJobResponse{Job: wire.JobToProto(j)}, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.SubmitJobResponse, error) {
		return pb.NewJobServiceClient(conn).SubmitJob(ctx, req)
	})
}

func (s *jobServer) GetJob(ctx context.Context, req *pb.GetJobRequest) (*pb.GetJobResponse, error) {
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.GetJobResponse, error) {
		j, err := eng.GetJob(req.GetId())
		if err != nil {
			return nil, err
		}
		return &pb.GetJobResponse{Job: wire.JobToProto(j)}, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.GetJobResponse, error) {
		return pb.NewJobServiceClient(conn).GetJob(ctx, req)
	})
}

func (s *jobServer) SubmitJobs(ctx context.Context, req *pb.SubmitJobsRequest) (*pb.SubmitJobsResponse, error) {
	if err := model.ValidateBatchSize(len(req.GetItems())); err != nil {
		return nil, toStatus(err)
	}
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.SubmitJobsResponse, error) {
		items := make([]engine.SubmitItem, len(req.GetItems()))
		for i, it := range req.GetItems() {
			items[i] = engine.SubmitItem{Spec: wire.JobSpecFromProto(it.GetSpec()), IdempotencyKey: it.GetIdempotencyKey()}
			if it.GetSpec() == nil {
				items[i].Spec = model.JobSpec{} // fails validation with field paths
			}
		}
		results, err := eng.SubmitBatch(ctx, items)
		if err != nil {
			return nil, err
		}
		resp := &pb.SubmitJobsResponse{Results: make([]*pb.SubmitJobsResult, len(results))}
		for i, r := range results {
			if r.Err != nil {
				resp.Results[i] = &pb.SubmitJobsResult{Error: itemError(r.Err)}
				continue
			}
			resp.Results[i] = &pb.SubmitJobsResult{Job: wire.JobToProto(r.Job)}
		}
		return resp, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.SubmitJobsResponse, error) {
		return pb.NewJobServiceClient(conn).SubmitJobs(ctx, req)
	})
}

func (s *jobServer) ListJobs(ctx context.Context, req *pb.ListJobsRequest) (*pb.ListJobsResponse, error) {
	sel, err := selectorFromProto(req.GetSelector())
	if err != nil {
		return nil, toStatus(err)
	}
	for i, st := range req.GetStates() {
		if _, ok := pb.JobState_name[int32(st)]; !ok || st == pb.JobState_JOB_STATE_UNSPECIFIED {
			return nil, toStatus(&model.ValidationError{Violations: []model.FieldViolation{{Field: fieldIndex("states", i), Description: "unknown job state"}}})
		}
		sel.States = append(sel.States, model.JobState(st))
	}
	f := engine.JobFilter{Selector: sel, PageSize: int(req.GetPageSize()), PageToken: req.GetPageToken()}
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.ListJobsResponse, error) {
		page, err := eng.ListJobs(f)
		if err != nil {
			return nil, err
		}
		resp := &pb.ListJobsResponse{NextPageToken: page.NextPageToken, Cursor: formatCursor(page.Revision), Jobs: make([]*pb.Job, len(page.Jobs))}
		for i, j := range page.Jobs {
			resp.Jobs[i] = wire.JobToProto(j)
		}
		return resp, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.ListJobsResponse, error) {
		return pb.NewJobServiceClient(conn).ListJobs(ctx, req)
	})
}

func (s *jobServer) CancelJob(ctx context.Context, req *pb.CancelJobRequest) (*pb.CancelJobResponse, error) {
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.CancelJobResponse, error) {
		j, err := eng.Cancel(ctx, req.GetId(), req.GetReason())
		if err != nil {
			return nil, err
		}
		return &pb.CancelJobResponse{Job: wire.JobToProto(j)}, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.CancelJobResponse, error) {
		return pb.NewJobServiceClient(conn).CancelJob(ctx, req)
	})
}

func (s *jobServer) GetJobLogs(req *pb.GetJobLogsRequest, stream grpc.ServerStreamingServer[pb.GetJobLogsResponse]) error {
	ctx := stream.Context()
	_, err := call(ctx, s.b, func(eng *engine.Engine) (struct{}, error) {
		return struct{}{}, eng.JobLogs(ctx, req.GetId(), req.GetFollow(), func(node string, rank int, data []byte) error {
			return stream.Send(&pb.GetJobLogsResponse{Node: node, Rank: int32(rank), Data: data})
		})
	}, func(ctx context.Context, conn *grpc.ClientConn) (struct{}, error) {
		up, err := pb.NewJobServiceClient(conn).GetJobLogs(ctx, req)
		if err != nil {
			return struct{}{}, err
		}
		for {
			chunk, err := up.Recv()
			if errors.Is(err, io.EOF) {
				return struct{}{}, nil
			}
			if err != nil {
				return struct{}{}, err
			}
			if err := stream.Send(chunk); err != nil {
				return struct{}{}, err
			}
		}
	})
	return err
}

type nodeServer struct {
	pb.UnimplementedNodeServiceServer
	b Backend
}

var _ pb.NodeServiceServer = (*nodeServer)(nil)

func (s *nodeServer) ListNodes(ctx context.Context, req *pb.ListNodesRequest) (*pb.ListNodesResponse, error) {
	var states []model.NodeState
	for i, st := range req.GetStates() {
		if _, ok := pb.NodeState_name[int32(st)]; !ok || st == pb.NodeState_NODE_STATE_UNSPECIFIED {
			return nil, toStatus(&model.ValidationError{Violations: []model.FieldViolation{{Field: fieldIndex("states", i), Description: "unknown node state"}}})
		}
		states = append(states, model.NodeState(st))
	}
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.ListNodesResponse, error) {
		nodes := eng.ListNodes(states)
		resp := &pb.ListNodesResponse{Nodes: make([]*pb.Node, len(nodes))}
		for i, n := range nodes {
			resp.Nodes[i] = wire.NodeToProto(n)
		}
		return resp, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.ListNodesResponse, error) {
		return pb.NewNodeServiceClient(conn).ListNodes(ctx, req)
	})
}

func (s *nodeServer) GetNode(ctx context.Context, req *pb.GetNodeRequest) (*pb.GetNodeResponse, error) {
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.GetNodeResponse, error) {
		n, err := eng.GetNode(req.GetId())
		if err != nil {
			return nil, err
		}
		return &pb.GetNodeResponse{Node: wire.NodeToProto(n)}, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.GetNodeResponse, error) {
		return pb.NewNodeServiceClient(conn).GetNode(ctx, req)
	})
}

func (s *nodeServer) DrainNode(ctx context.Context, req *pb.DrainNodeRequest) (*pb.DrainNodeResponse, error) {
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.DrainNodeResponse, error) {
		n, err := eng.Drain(ctx, req.GetId(), req.GetReason(), req.GetNow())
		if err != nil {
			return nil, err
		}
		return &pb.DrainNodeResponse{Node: wire.NodeToProto(n)}, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.DrainNodeResponse, error) {
		return pb.NewNodeServiceClient(conn).DrainNode(ctx, req)
	})
}

func (s *nodeServer) UndrainNode(ctx context.Context, req *pb.UndrainNodeRequest) (*pb.UndrainNodeResponse, error) {
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.UndrainNodeResponse, error) {
		n, err := eng.Undrain(ctx, req.GetId())
		if err != nil {
			return nil, err
		}
		return &pb.UndrainNodeResponse{Node: wire.NodeToProto(n)}, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.UndrainNodeResponse, error) {
		return pb.NewNodeServiceClient(conn).UndrainNode(ctx, req)
	})
}

func (s *nodeServer) LabelNode(ctx context.Context, req *pb.LabelNodeRequest) (*pb.LabelNodeResponse, error) {
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.LabelNodeResponse, error) {
		n, err := eng.Label(ctx, req.GetId(), req.GetSet(), req.GetRemove())
		if err != nil {
			return nil, err
		}
		return &pb.LabelNodeResponse{Node: wire.NodeToProto(n)}, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.LabelNodeResponse, error) {
		return pb.NewNodeServiceClient(conn).LabelNode(ctx, req)
	})
}

// agentServer does not forward: an agent's stream belongs on the leader,
// so any other replica answers Unavailable (with ErrorInfo NO_LEADER) and,
// when it can, names the leader in LeaderTrailer. Agents reconnect at once
// to a leader named elsewhere, and back off (growing, jittered, up to a
// few seconds) when the replica that refused them is the leader still
// loading, or no leader is known; without a hint they try the next
// endpoint they know.
type agentServer struct {
	pb.UnimplementedAgentServiceServer
	b Backend
}

var _ pb.AgentServiceServer = (*agentServer)(nil)

// LeaderTrailer is the trailer key in which a replica that refuses an
// agent's stream names the leader's address: another replica's, or its
// own while it leads but is still loading its state.
const LeaderTrailer = "gpusched-leader"

func (s *agentServer) Connect(stream grpc.BidiStreamingServer[pb.ConnectRequest, pb.ConnectResponse]) error {
	eng, err := s.b.Leader()
	if err != nil {
		// Refused without reading the hello: the agent says it again to
		// whoever serves it.
		if s.b.LeaderAddr != nil {
			if addr, aerr := s.b.LeaderAddr(stream.Context()); aerr == nil {
				stream.SetTrailer(metadata.Pairs(LeaderTrailer, addr))
			}
		}
		return toStatus(err)
	}
	err = eng.ServeAgent(stream)
	if errors.Is(err, io.EOF) {
		return nil
	}
	return toStatus(err)
}

// clusterServer answers from etcd on any replica: no forwarding needed.
type clusterServer struct {
	pb.UnimplementedClusterServiceServer
	b Backend
}

var _ pb.ClusterServiceServer = (*clusterServer)(nil)

func (s *clusterServer) GetStatus(ctx context.Context, _ *pb.GetStatusRequest) (*pb.GetStatusResponse, error) {
	resp, err := s.b.Status(ctx)
	return resp, toStatus(err)
}

// mockServer relays fault injection to simulated nodes.
type mockServer struct {
	pb.UnimplementedMockServiceServer
	b Backend
}

var _ pb.MockServiceServer = (*mockServer)(nil)

func (s *mockServer) InjectFault(ctx context.Context, req *pb.InjectFaultRequest) (*pb.InjectFaultResponse, error) {
	inj := &pb.MockInject{Gpu: req.GetGpu()}
	switch f := req.GetFault().(type) {
	case *pb.InjectFaultRequest_Xid:
		inj.Fault = &pb.MockInject_Xid{Xid: f.Xid}
	case *pb.InjectFaultRequest_EccDoubleBit:
		inj.Fault = &pb.MockInject_EccDoubleBit{EccDoubleBit: f.EccDoubleBit}
	case *pb.InjectFaultRequest_GpuProcess:
		inj.Fault = &pb.MockInject_GpuProcess{GpuProcess: f.GpuProcess}
	case *pb.InjectFaultRequest_Clear:
		inj.Fault = &pb.MockInject_Clear{Clear: f.Clear}
	default:
		return nil, toStatus(&model.ValidationError{Violations: []model.FieldViolation{{Field: "fault", Description: "one of xid, ecc_double_bit, gpu_process or clear is required"}}})
	}
	if req.GetGpu() < -1 || req.GetGpu() > model.MaxGPUsPerNode {
		return nil, toStatus(&model.ValidationError{Violations: []model.FieldViolation{{Field: "gpu", Description: "must be a GPU index, or -1 for the whole node"}}})
	}
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.InjectFaultResponse, error) {
		return &pb.InjectFaultResponse{}, eng.MockInject(ctx, req.GetNode(), inj)
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.InjectFaultResponse, error) {
		return pb.NewMockServiceClient(conn).InjectFault(ctx, req)
	})
}

func fieldIndex(field string, i int) string {
	return fmt.Sprintf("%s[%d]", field, i)
}
