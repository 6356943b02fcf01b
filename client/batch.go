package client

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// MaxBatch is the most jobs one SubmitBatch call takes.
const MaxBatch = 1000

// BatchItem is one job of a SubmitBatch call.
type BatchItem struct {
	Spec *pb.JobSpec
	// IdempotencyKey makes this item safe to resubmit (see
	// WithIdempotencyKey); empty: none.
	IdempotencyKey string
}

// BatchResult is the outcome of one BatchItem: Job on success, else Err,
// an *Error (errors.Is works with the sentinels; field violations name
// fields of the item, e.g. "spec.nodes").
type BatchResult struct {
	Job *pb.Job
	Err error
}

// SubmitBatch submits up to MaxBatch jobs in one call and one group commit.
// Each item succeeds or fails on its own: results are in item order, and
// the error is for the call as a whole (nothing was submitted, or it is
// unknown what was: retry with idempotency keys to be safe).
func (c *Client) SubmitBatch(ctx context.Context, items []BatchItem) ([]BatchResult, error) {
	req := &pb.SubmitJobsRequest{Items: make([]*pb.SubmitJobRequest, len(items))}
	for i, it := range items {
		req.Items[i] = &pb.SubmitJobRequest{Spec: it.Spec, IdempotencyKey: it.IdempotencyKey}
	}
	var resp *pb.SubmitJobsResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewJobServiceClient(conn).SubmitJobs(ctx, req)
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make([]BatchResult, len(resp.GetResults()))
	for i, r := range resp.GetResults() {
		if e := r.GetError(); e != nil {
			ie := &Error{Code: codes.Code(e.GetCode()), Message: e.GetMessage()}
			for _, v := range e.GetFieldViolations() {
				ie.Violations = append(ie.Violations, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
			out[i].Err = ie
			continue
		}
		out[i].Job = r.GetJob()
	}
	return out, nil
}
