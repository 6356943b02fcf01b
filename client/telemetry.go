package client

import (
	"context"

	"google.golang.org/grpc"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// WatchTelemetry streams GPU samples one per message (recent history first
// unless req.LiveOnly) until ctx ends or fn fails. StreamTelemetry is the
// richer form.
func (c *Client) WatchTelemetry(ctx context.Context, req *pb.WatchTelemetryRequest, fn func(*pb.WatchTelemetryResponse) error) error {
	return c.stream(ctx, func(ctx context.Context, conn *grpc.ClientConn) error {
		stream, err := pb.NewTelemetryServiceClient(conn).WatchTelemetry(ctx, req)
		if err != nil {
			return err
		}
		return recvAll(stream, fn)
	})
}

// StreamTelemetry streams GPU samples matching req's filters (nodes, jobs,
// leases, tenant), with only req.Fields filled in and at most one sample
// per GPU per req.Every: first a snapshot, the latest sample of every
// matching GPU (messages with Snapshot set, the last one also with
// SnapshotComplete), then live samples until ctx ends or fn fails.
//
// A message's Dropped counts samples the server discarded because this
// client read too slowly. When the replica serving the stream becomes
// unavailable, the stream is opened again on another and starts over with
// a new snapshot.
func (c *Client) StreamTelemetry(ctx context.Context, req *pb.StreamTelemetryRequest, fn func(*pb.StreamTelemetryResponse) error) error {
	return c.stream(ctx, func(ctx context.Context, conn *grpc.ClientConn) error {
		stream, err := pb.NewTelemetryServiceClient(conn).StreamTelemetry(ctx, req)
		if err != nil {
			return err
		}
		return recvAll(stream, fn)
	})
}

// GetTelemetry returns the recent history of a node, a job or a lease
// (at least one of req.Node, req.JobId and req.LeaseId), oldest first and
// at most req.Limit samples (the newest; Truncated says whether older ones
// were left out).
func (c *Client) GetTelemetry(ctx context.Context, req *pb.GetTelemetryRequest) (*pb.GetTelemetryResponse, error) {
	var resp *pb.GetTelemetryResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewTelemetryServiceClient(conn).GetTelemetry(ctx, req)
		return err
	})
	return resp, err
}
