package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/telemetry"
)

// telemetryServer serves from the leader's hub (only the leader receives
// agents' telemetry); a follower relays the leader's answer.
type telemetryServer struct {
	pb.UnimplementedTelemetryServiceServer
	b Backend
}

var _ pb.TelemetryServiceServer = (*telemetryServer)(nil)

func (s *telemetryServer) WatchTelemetry(req *pb.WatchTelemetryRequest, stream grpc.ServerStreamingServer[pb.WatchTelemetryResponse]) error {
	var v violations
	v.ids("nodes", req.GetNodes())
	v.optionalID("job_id", req.GetJobId())
	if err := v.err(); err != nil {
		return toStatus(err)
	}
	f := telemetry.Filter{Nodes: req.GetNodes()}
	if req.GetJobId() != "" {
		f.JobIDs = []string{req.GetJobId()}
	}
	return relay(stream, s.b, func(ctx context.Context) error {
		return s.b.Telemetry.Watch(ctx, f, req.GetLiveOnly(), stream.Send)
	}, func(ctx context.Context, conn *grpc.ClientConn) (grpc.ServerStreamingClient[pb.WatchTelemetryResponse], error) {
		return pb.NewTelemetryServiceClient(conn).WatchTelemetry(ctx, req)
	})
}

func (s *telemetryServer) StreamTelemetry(req *pb.StreamTelemetryRequest, stream grpc.ServerStreamingServer[pb.StreamTelemetryResponse]) error {
	var v violations
	v.ids("nodes", req.GetNodes())
	v.ids("job_ids", req.GetJobIds())
	v.ids("lease_ids", req.GetLeaseIds())
	v.optionalID("tenant", req.GetTenant())
	fields := v.fields("fields", req.GetFields())
	every := v.every("every", req.GetEvery())
	if err := v.err(); err != nil {
		return toStatus(err)
	}
	o := telemetry.StreamOptions{
		Filter: telemetry.Filter{Nodes: req.GetNodes(), JobIDs: req.GetJobIds(), LeaseIDs: req.GetLeaseIds(), Tenant: req.GetTenant()},
		Fields: fields, Every: every,
	}
	return relay(stream, s.b, func(ctx context.Context) error {
		return s.b.Telemetry.Stream(ctx, o, stream.Send)
	}, func(ctx context.Context, conn *grpc.ClientConn) (grpc.ServerStreamingClient[pb.StreamTelemetryResponse], error) {
		return pb.NewTelemetryServiceClient(conn).StreamTelemetry(ctx, req)
	})
}

func (s *telemetryServer) GetTelemetry(ctx context.Context, req *pb.GetTelemetryRequest) (*pb.GetTelemetryResponse, error) {
	var v violations
	if req.GetNode() == "" && req.GetJobId() == "" && req.GetLeaseId() == "" {
		v.add("node", "one of node, job_id or lease_id is required")
	}
	v.optionalID("node", req.GetNode())
	v.optionalID("job_id", req.GetJobId())
	v.optionalID("lease_id", req.GetLeaseId())
	fields := v.fields("fields", req.GetFields())
	every := v.every("every", req.GetEvery())
	since := v.since("since", req.GetSince())
	switch l := req.GetLimit(); {
	case l < 0:
		v.add("limit", "must not be negative")
	case l > telemetry.MaxHistoryLimit:
		v.add("limit", fmt.Sprintf("must be at most %d", telemetry.MaxHistoryLimit))
	}
	if err := v.err(); err != nil {
		return nil, toStatus(err)
	}
	o := telemetry.HistoryOptions{Fields: fields, Every: every, Since: since, Limit: int(req.GetLimit())}
	if req.GetNode() != "" {
		o.Nodes = []string{req.GetNode()}
	}
	if req.GetJobId() != "" {
		o.JobIDs = []string{req.GetJobId()}
	}
	if req.GetLeaseId() != "" {
		o.LeaseIDs = []string{req.GetLeaseId()}
	}
	return call(ctx, s.b, func(*engine.Engine) (*pb.GetTelemetryResponse, error) {
		samples, truncated := s.b.Telemetry.History(o)
		return &pb.GetTelemetryResponse{Samples: samples, Truncated: truncated}, nil
	}, func(ctx context.Context, conn *grpc.ClientConn) (*pb.GetTelemetryResponse, error) {
		return pb.NewTelemetryServiceClient(conn).GetTelemetry(ctx, req)
	})
}

// relay serves a leader-only stream: local on the leader (a client that
// hangs up ends it without error), else the leader's stream copied
// message by message.
func relay[R any](stream grpc.ServerStreamingServer[R], b Backend, local func(ctx context.Context) error,
	open func(ctx context.Context, conn *grpc.ClientConn) (grpc.ServerStreamingClient[R], error)) error {
	ctx := stream.Context()
	_, err := call(ctx, b, func(*engine.Engine) (struct{}, error) {
		err := local(ctx)
		if errors.Is(err, context.Canceled) && ctx.Err() != nil {
			err = nil // the client hung up
		}
		return struct{}{}, err
	}, func(ctx context.Context, conn *grpc.ClientConn) (struct{}, error) {
		up, err := open(ctx, conn)
		if err != nil {
			return struct{}{}, err
		}
		for {
			r, err := up.Recv()
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				return struct{}{}, err
			}
			if err := stream.Send(r); err != nil {
				return struct{}{}, err
			}
		}
	})
	return err
}

// violations collects field violations, so a request's every bad field is
// reported at once.
type violations []model.FieldViolation

func (v *violations) add(field, description string) {
	*v = append(*v, model.FieldViolation{Field: field, Description: description})
}

func (v *violations) err() error {
	if len(*v) == 0 {
		return nil
	}
	return &model.ValidationError{Violations: *v}
}

// optionalID checks an ID that may be empty.
func (v *violations) optionalID(field, id string) {
	if id == "" {
		return
	}
	var verr *model.ValidationError
	if errors.As(model.ValidateID(field, id), &verr) {
		*v = append(*v, verr.Violations...)
	}
}

// ids checks every entry of a list of IDs.
func (v *violations) ids(field string, ids []string) {
	for i, id := range ids {
		f := fieldIndex(field, i)
		if id == "" {
			v.add(f, "must not be empty")
			continue
		}
		v.optionalID(f, id)
	}
}

// fields checks GpuSample field names and returns the selection.
func (v *violations) fields(field string, names []string) telemetry.Fields {
	bad := false
	for i, n := range names {
		if !telemetry.IsField(n) {
			v.add(fieldIndex(field, i), fmt.Sprintf("unknown field %q of GpuSample (e.g. gpu_util, fb_used_bytes, power_usage_milliwatts)", n))
			bad = true
		}
	}
	if bad {
		return telemetry.Fields{}
	}
	f, _ := telemetry.ParseFields(names) // every name is known
	return f
}

// every checks a downsampling interval: unset or zero means none.
func (v *violations) every(field string, d *durationpb.Duration) time.Duration {
	if d == nil {
		return 0
	}
	if err := d.CheckValid(); err != nil {
		v.add(field, "is not a valid duration")
		return 0
	}
	if d.AsDuration() < 0 {
		v.add(field, "must not be negative")
		return 0
	}
	return d.AsDuration()
}

// since checks an optional timestamp.
func (v *violations) since(field string, t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	if err := t.CheckValid(); err != nil {
		v.add(field, "is not a valid timestamp")
		return time.Time{}
	}
	return t.AsTime()
}
