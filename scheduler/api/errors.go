package api

import (
	"context"
	"errors"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/model"
)

// errorCodes is the one table from scheduler errors to gRPC codes. The
// first entry that matches (errors.Is) wins.
var errorCodes = []struct {
	err  error
	code codes.Code
}{
	{model.ErrInvalid, codes.InvalidArgument},
	{engine.ErrAgentInvalid, codes.InvalidArgument},
	{model.ErrNotFound, codes.NotFound},
	{model.ErrAlreadyExists, codes.AlreadyExists},
	{model.ErrJobEnded, codes.FailedPrecondition},
	{model.ErrFailedPrecondition, codes.FailedPrecondition},
	{model.ErrNotLeader, codes.Unavailable},
	{model.ErrStopped, codes.Unavailable},
	{model.ErrNodeUnavailable, codes.Unavailable},
	{context.Canceled, codes.Canceled},
	{context.DeadlineExceeded, codes.DeadlineExceeded},
}

// ErrorInfo reasons the API attaches to errors, in ErrorDomain.
const (
	ErrorDomain = "gpusched.io"
	// ReasonNoLeader: this replica cannot serve the call now because no
	// leader is reachable (an election or a leader's start-up is under way).
	ReasonNoLeader = "NO_LEADER"
	// ReasonCursorCompacted: a watch cursor points into history that has
	// been compacted away (code OutOfRange); list again and watch from the
	// list's cursor.
	ReasonCursorCompacted = "CURSOR_COMPACTED"
)

// codeOf maps an error through errorCodes; unknown errors are Internal.
func codeOf(err error) codes.Code {
	for _, e := range errorCodes {
		if errors.Is(err, e.err) {
			return e.code
		}
	}
	return codes.Internal
}

// compactedStatus is the distinct error for a compacted watch cursor.
func compactedStatus(err error) error {
	st := status.New(codes.OutOfRange, "watch cursor expired: "+err.Error()+"; list the jobs again and watch from the list's cursor")
	if withInfo, derr := st.WithDetails(&errdetails.ErrorInfo{Reason: ReasonCursorCompacted, Domain: ErrorDomain}); derr == nil {
		st = withInfo
	}
	return st.Err()
}

// itemError renders the failure of one item of a batch the way toStatus
// would render it for a call of its own.
func itemError(err error) *pb.ItemError {
	out := &pb.ItemError{Code: int32(codeOf(err)), Message: err.Error()}
	var verr *model.ValidationError
	if errors.As(err, &verr) {
		for _, v := range verr.Violations {
			out.FieldViolations = append(out.FieldViolations, &pb.ItemFieldViolation{Field: v.Field, Description: v.Description})
		}
	}
	return out
}

// toStatus converts an error to a gRPC status error. Validation errors carry
// a BadRequest detail with one FieldViolation per bad field.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	st := status.New(codeOf(err), err.Error())
	if errors.Is(err, model.ErrNotLeader) || errors.Is(err, model.ErrStopped) {
		// Tells clients the cluster is alive but between leaders, so they
		// retry rather than give up.
		if withInfo, derr := st.WithDetails(&errdetails.ErrorInfo{Reason: ReasonNoLeader, Domain: ErrorDomain}); derr == nil {
			st = withInfo
		}
	}
	var verr *model.ValidationError
	if errors.As(err, &verr) {
		br := &errdetails.BadRequest{}
		for _, v := range verr.Violations {
			br.FieldViolations = append(br.FieldViolations, &errdetails.BadRequest_FieldViolation{Field: v.Field, Description: v.Description})
		}
		if withDetails, derr := st.WithDetails(br); derr == nil {
			st = withDetails
		}
	}
	return st.Err()
}
