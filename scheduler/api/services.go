package api

import (
	"context"
	"errors"
	"fmt"
	"io"

	"google.golang.org/grpc"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/wire"
)

// LeaderFunc returns the engine of the current leadership term, or an error
// wrapping model.ErrNotLeader when this replica does not lead.
type LeaderFunc func() (*engine.Engine, error)

// Register adds every public service to srv.
func Register(srv *grpc.Server, leader LeaderFunc) {
	pb.RegisterJobServiceServer(srv, &jobServer{leader: leader})
	pb.RegisterNodeServiceServer(srv, &nodeServer{leader: leader})
	pb.RegisterAgentServiceServer(srv, &agentServer{leader: leader})
}

type jobServer struct {
	pb.UnimplementedJobServiceServer
	leader LeaderFunc
}

var _ pb.JobServiceServer = (*jobServer)(nil)

func (s *jobServer) SubmitJob(ctx context.Context, req *pb.SubmitJobRequest) (*pb.SubmitJobResponse, error) {
	if req.GetSpec() == nil {
		return nil, toStatus(&model.ValidationError{Violations: []model.FieldViolation{{Field: "spec", Description: "is required"}}})
	}
	eng, err := s.leader()
	if err != nil {
		return nil, toStatus(err)
	}
	j, err := eng.Submit(ctx, wire.JobSpecFromProto(req.GetSpec()))
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.SubmitJobResponse{Job: wire.JobToProto(j)}, nil
}

func (s *jobServer) GetJob(_ context.Context, req *pb.GetJobRequest) (*pb.GetJobResponse, error) {
	eng, err := s.leader()
	if err != nil {
		return nil, toStatus(err)
	}
	j, err := eng.GetJob(req.GetId())
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.GetJobResponse{Job: wire.JobToProto(j)}, nil
}

func (s *jobServer) ListJobs(_ context.Context, req *pb.ListJobsRequest) (*pb.ListJobsResponse, error) {
	f := engine.JobFilter{PageSize: int(req.GetPageSize()), PageToken: req.GetPageToken()}
	for i, st := range req.GetStates() {
		if _, ok := pb.JobState_name[int32(st)]; !ok || st == pb.JobState_JOB_STATE_UNSPECIFIED {
			return nil, toStatus(&model.ValidationError{Violations: []model.FieldViolation{{Field: fieldIndex("states", i), Description: "unknown job state"}}})
		}
		f.States = append(f.States, model.JobState(st))
	}
	eng, err := s.leader()
	if err != nil {
		return nil, toStatus(err)
	}
	jobs, next, err := eng.ListJobs(f)
	if err != nil {
		return nil, toStatus(err)
	}
	resp := &pb.ListJobsResponse{NextPageToken: next, Jobs: make([]*pb.Job, len(jobs))}
	for i, j := range jobs {
		resp.Jobs[i] = wire.JobToProto(j)
	}
	return resp, nil
}

func (s *jobServer) CancelJob(ctx context.Context, req *pb.CancelJobRequest) (*pb.CancelJobResponse, error) {
	eng, err := s.leader()
	if err != nil {
		return nil, toStatus(err)
	}
	j, err := eng.Cancel(ctx, req.GetId(), req.GetReason())
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.CancelJobResponse{Job: wire.JobToProto(j)}, nil
}

func (s *jobServer) GetJobLogs(req *pb.GetJobLogsRequest, stream grpc.ServerStreamingServer[pb.GetJobLogsResponse]) error {
	eng, err := s.leader()
	if err != nil {
		return toStatus(err)
	}
	err = eng.JobLogs(stream.Context(), req.GetId(), func(node string, rank int, data []byte) error {
		return stream.Send(&pb.GetJobLogsResponse{Node: node, Rank: int32(rank), Data: data})
	})
	return toStatus(err)
}

type nodeServer struct {
	pb.UnimplementedNodeServiceServer
	leader LeaderFunc
}

var _ pb.NodeServiceServer = (*nodeServer)(nil)

func (s *nodeServer) ListNodes(_ context.Context, req *pb.ListNodesRequest) (*pb.ListNodesResponse, error) {
	var states []model.NodeState
	for i, st := range req.GetStates() {
		if _, ok := pb.NodeState_name[int32(st)]; !ok || st == pb.NodeState_NODE_STATE_UNSPECIFIED {
			return nil, toStatus(&model.ValidationError{Violations: []model.FieldViolation{{Field: fieldIndex("states", i), Description: "unknown node state"}}})
		}
		states = append(states, model.NodeState(st))
	}
	eng, err := s.leader()
	if err != nil {
		return nil, toStatus(err)
	}
	nodes := eng.ListNodes(states)
	resp := &pb.ListNodesResponse{Nodes: make([]*pb.Node, len(nodes))}
	for i, n := range nodes {
		resp.Nodes[i] = wire.NodeToProto(n)
	}
	return resp, nil
}

func (s *nodeServer) GetNode(_ context.Context, req *pb.GetNodeRequest) (*pb.GetNodeResponse, error) {
	eng, err := s.leader()
	if err != nil {
		return nil, toStatus(err)
	}
	n, err := eng.GetNode(req.GetId())
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.GetNodeResponse{Node: wire.NodeToProto(n)}, nil
}

type agentServer struct {
	pb.UnimplementedAgentServiceServer
	leader LeaderFunc
}

var _ pb.AgentServiceServer = (*agentServer)(nil)

func (s *agentServer) Connect(stream grpc.BidiStreamingServer[pb.ConnectRequest, pb.ConnectResponse]) error {
	eng, err := s.leader()
	if err != nil {
		return toStatus(err)
	}
	err = eng.ServeAgent(stream)
	if errors.Is(err, io.EOF) {
		return nil
	}
	return toStatus(err)
}

func fieldIndex(field string, i int) string {
	return fmt.Sprintf("%s[%d]", field, i)
}
