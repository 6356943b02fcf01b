package api

import (
	"context"

	"google.golang.org/grpc"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/wire"
)

func required(field string) error {
	return &model.ValidationError{Violations: []model.FieldViolation{{Field: field, Description: "is required"}}}
}

type tenantServer struct {
	pb.UnimplementedTenantServiceServer
	b Backend
}

var _ pb.TenantServiceServer = (*tenantServer)(nil)

func (s *tenantServer) SetTenant(ctx context.Context, req *pb.SetTenantRequest) (*pb.SetTenantResponse, error) {
	if req.GetTenant() == nil {
		return nil, toStatus(required("tenant"))
	}
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.SetTenantResponse, error) {
		t, err := eng.SetTenant(ctx, wire.TenantFromProto(req.GetTenant()))
		if err != nil {
			return nil, err
		}
		return &pb.SetTenantResponse{Tenant: wire.TenantToProto(t)}, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.SetTenantResponse, error) {
		return pb.NewTenantServiceClient(conn).SetTenant(ctx, req)
	})
}

func (s *tenantServer) ListTenants(ctx context.Context, req *pb.ListTenantsRequest) (*pb.ListTenantsResponse, error) {
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.ListTenantsResponse, error) {
		resp := &pb.ListTenantsResponse{}
		for _, u := range eng.ListTenants() {
			tu := &pb.TenantUsage{Tenant: wire.TenantToProto(u.Tenant), Nodes: int32(u.Nodes),
				PendingJobs: int32(u.Pending), RunningJobs: int32(u.Running)}
			for m, n := range u.NodesPerModel {
				if tu.NodesPerModel == nil {
					tu.NodesPerModel = map[string]int32{}
				}
				tu.NodesPerModel[m] = int32(n)
			}
			resp.Tenants = append(resp.Tenants, tu)
		}
		return resp, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.ListTenantsResponse, error) {
		return pb.NewTenantServiceClient(conn).ListTenants(ctx, req)
	})
}

type queueServer struct {
	pb.UnimplementedQueueServiceServer
	b Backend
}

var _ pb.QueueServiceServer = (*queueServer)(nil)

func (s *queueServer) save(ctx context.Context, q *pb.Queue, create bool) (*pb.Queue, error) {
	if q == nil {
		return nil, toStatus(required("queue"))
	}
	type resp = *pb.Queue
	r, err := call(ctx, s.b, func(eng *engine.Engine) (resp, error) {
		out, err := eng.SaveQueue(ctx, wire.QueueFromProto(q), create)
		if err != nil {
			return nil, err
		}
		return wire.QueueToProto(out), nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (resp, error) {
		c := pb.NewQueueServiceClient(conn)
		if create {
			r, err := c.CreateQueue(ctx, &pb.CreateQueueRequest{Queue: q})
			return r.GetQueue(), err
		}
		r, err := c.UpdateQueue(ctx, &pb.UpdateQueueRequest{Queue: q})
		return r.GetQueue(), err
	})
	return r, err
}

func (s *queueServer) CreateQueue(ctx context.Context, req *pb.CreateQueueRequest) (*pb.CreateQueueResponse, error) {
	q, err := s.save(ctx, req.GetQueue(), true)
	if err != nil {
		return nil, err
	}
	return &pb.CreateQueueResponse{Queue: q}, nil
}

func (s *queueServer) UpdateQueue(ctx context.Context, req *pb.UpdateQueueRequest) (*pb.UpdateQueueResponse, error) {
	q, err := s.save(ctx, req.GetQueue(), false)
	if err != nil {
		return nil, err
	}
	return &pb.UpdateQueueResponse{Queue: q}, nil
}

func (s *queueServer) ListQueues(ctx context.Context, req *pb.ListQueuesRequest) (*pb.ListQueuesResponse, error) {
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.ListQueuesResponse, error) {
		resp := &pb.ListQueuesResponse{}
		for _, u := range eng.ListQueues() {
			resp.Queues = append(resp.Queues, &pb.QueueUsage{Queue: wire.QueueToProto(u.Queue),
				PendingJobs: int32(u.Pending), RunningJobs: int32(u.Running)})
		}
		return resp, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.ListQueuesResponse, error) {
		return pb.NewQueueServiceClient(conn).ListQueues(ctx, req)
	})
}

func (s *queueServer) pause(ctx context.Context, name string, pause bool) (*pb.Queue, error) {
	return call(ctx, s.b, func(eng *engine.Engine) (*pb.Queue, error) {
		q, err := eng.PauseQueue(ctx, name, pause)
		if err != nil {
			return nil, err
		}
		return wire.QueueToProto(q), nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.Queue, error) {
		c := pb.NewQueueServiceClient(conn)
		if pause {
			r, err := c.PauseQueue(ctx, &pb.PauseQueueRequest{Name: name})
			return r.GetQueue(), err
		}
		r, err := c.ResumeQueue(ctx, &pb.ResumeQueueRequest{Name: name})
		return r.GetQueue(), err
	})
}

func (s *queueServer) PauseQueue(ctx context.Context, req *pb.PauseQueueRequest) (*pb.PauseQueueResponse, error) {
	q, err := s.pause(ctx, req.GetName(), true)
	if err != nil {
		return nil, err
	}
	return &pb.PauseQueueResponse{Queue: q}, nil
}

func (s *queueServer) ResumeQueue(ctx context.Context, req *pb.ResumeQueueRequest) (*pb.ResumeQueueResponse, error) {
	q, err := s.pause(ctx, req.GetName(), false)
	if err != nil {
		return nil, err
	}
	return &pb.ResumeQueueResponse{Queue: q}, nil
}
