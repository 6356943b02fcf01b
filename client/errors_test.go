package client

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestFromStatus(t *testing.T) {
	invalid, _ := status.New(codes.InvalidArgument, "spec.nodes: must be at least 1").WithDetails(&errdetails.BadRequest{
		FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: "spec.nodes", Description: "must be at least 1"}},
	})
	cases := []struct {
		name     string
		in       error
		sentinel error
		fields   []string
	}{
		{"an invalid request matches ErrInvalid and names its fields", invalid.Err(), ErrInvalid, []string{"spec.nodes"}},
		{"not found matches ErrNotFound", status.Error(codes.NotFound, "job 9 not found"), ErrNotFound, nil},
		{"failed precondition matches ErrFailedPrecondition", status.Error(codes.FailedPrecondition, "ended"), ErrFailedPrecondition, nil},
		{"unavailable matches ErrUnavailable", status.Error(codes.Unavailable, "not leader"), ErrUnavailable, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := fromStatus(c.in)
			if !errors.Is(err, c.sentinel) {
				t.Fatalf("errors.Is(%v, %v) = false", err, c.sentinel)
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("%T is not *Error", err)
			}
			var got []string
			for _, v := range e.Violations {
				got = append(got, v.Field)
			}
			if fmt.Sprint(got) != fmt.Sprint(c.fields) {
				t.Errorf("violations = %v, want %v", got, c.fields)
			}
		})
	}
	if err := fromStatus(errors.New("plain")); errors.Is(err, ErrInvalid) {
		t.Error("a non-status error matched a sentinel")
	}
}
