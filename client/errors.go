package client

import (
	"errors"
	"fmt"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Sentinels for errors.Is on errors returned by Client methods.
var (
	ErrInvalid            = errors.New("gpusched: invalid request")
	ErrNotFound           = errors.New("gpusched: not found")
	ErrAlreadyExists      = errors.New("gpusched: already exists")
	ErrFailedPrecondition = errors.New("gpusched: failed precondition")
	// ErrQuotaExceeded: a limit refused the request (ResourceExhausted).
	ErrQuotaExceeded = errors.New("gpusched: quota exceeded")
	// ErrPermissionDenied and ErrUnauthenticated come from the scheduler's
	// authentication and access control.
	ErrPermissionDenied = errors.New("gpusched: permission denied")
	ErrUnauthenticated  = errors.New("gpusched: unauthenticated")
	ErrUnavailable      = errors.New("gpusched: unavailable")
	ErrInternal         = errors.New("gpusched: internal error")
	// ErrCursorCompacted: a watch cursor points into history the cluster
	// no longer keeps; list again and watch from the list's cursor
	// (ListAndWatch does it for you).
	ErrCursorCompacted = errors.New("gpusched: watch cursor compacted")
)

var codeSentinels = map[codes.Code]error{
	codes.InvalidArgument:    ErrInvalid,
	codes.NotFound:           ErrNotFound,
	codes.AlreadyExists:      ErrAlreadyExists,
	codes.FailedPrecondition: ErrFailedPrecondition,
	codes.ResourceExhausted:  ErrQuotaExceeded,
	codes.PermissionDenied:   ErrPermissionDenied,
	codes.Unauthenticated:    ErrUnauthenticated,
	codes.Unavailable:        ErrUnavailable,
	codes.Internal:           ErrInternal,
}

// FieldViolation is one invalid field of a rejected request.
type FieldViolation struct {
	Field       string
	Description string
}

// Error is a failed RPC: its code, the server's message and, for invalid
// requests, the fields at fault.
type Error struct {
	Code       codes.Code
	Message    string
	Violations []FieldViolation
	// NoLeader: a replica answered that the cluster is between leaders;
	// the call is worth retrying.
	NoLeader bool
	// CursorCompacted: a watch cursor is too old (see ErrCursorCompacted).
	CursorCompacted bool
}

// Error returns the server's message.
func (e *Error) Error() string { return e.Message }

// Is matches the sentinel for e's code.
func (e *Error) Is(target error) bool {
	if target == ErrCursorCompacted {
		return e.CursorCompacted
	}
	s, ok := codeSentinels[e.Code]
	return ok && s == target
}

// fromStatus turns a gRPC error into *Error; other errors pass through.
func fromStatus(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	e := &Error{Code: st.Code(), Message: st.Message()}
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				e.Violations = append(e.Violations, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		case *errdetails.ErrorInfo:
			// Mirrors scheduler/api's ReasonNoLeader (the SDK imports no
			// scheduler code).
			e.NoLeader = d.GetReason() == "NO_LEADER" && d.GetDomain() == "gpusched.io"
			e.CursorCompacted = d.GetReason() == "CURSOR_COMPACTED" && d.GetDomain() == "gpusched.io"
		}
	}
	if e.Code == codes.Unavailable && !strings.Contains(e.Message, "unavailable") {
		e.Message = fmt.Sprintf("unavailable: %s", e.Message)
	}
	return e
}
