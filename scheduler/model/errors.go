package model

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors of the scheduler. scheduler/api maps each to one gRPC code
// in a single table; wrap them with %w to add detail.
var (
	// ErrInvalid: the request is malformed. Returned as *ValidationError.
	ErrInvalid = errors.New("scheduler: invalid request")
	// ErrNotFound: no job, node or lease by that ID.
	ErrNotFound = errors.New("scheduler: not found")
	// ErrAlreadyExists: the object to create exists already.
	ErrAlreadyExists = errors.New("scheduler: already exists")
	// ErrJobEnded: the job already reached a terminal state.
	ErrJobEnded = errors.New("scheduler: job already ended")
	// ErrNotLeader: this replica does not lead and cannot do leader work.
	ErrNotLeader = errors.New("scheduler: not leader")
	// ErrStopped: the scheduler is shutting down or its term ended.
	ErrStopped = errors.New("scheduler: stopped")
	// ErrNodeUnavailable: the agent holding a job's logs (or a node asked
	// for something) is not connected.
	ErrNodeUnavailable = errors.New("scheduler: node unavailable")
	// ErrFailedPrecondition: the request is valid but cannot apply to the
	// target as it is (e.g. fault injection on real hardware).
	ErrFailedPrecondition = errors.New("scheduler: failed precondition")
)

// detailed is an error whose message is written for humans ("job 9 not
// found") while errors.Is still sees its sentinel.
type detailed struct {
	msg      string
	sentinel error
}

func (e *detailed) Error() string { return e.msg }
func (e *detailed) Unwrap() error { return e.sentinel }

// Errorf returns an error with a formatted message that wraps sentinel
// without repeating its text.
func Errorf(sentinel error, format string, args ...any) error {
	return &detailed{msg: fmt.Sprintf(format, args...), sentinel: sentinel}
}

// FieldViolation names one bad field and says what is wrong with it.
type FieldViolation struct {
	Field       string // path in the API request, e.g. "spec.nodes"
	Description string
}

// ValidationError lists every problem found in one request, so a user fixes
// them all at once rather than one per round trip.
type ValidationError struct {
	Violations []FieldViolation
}

// Error joins the violations as "field: description; ...".
func (e *ValidationError) Error() string {
	parts := make([]string, len(e.Violations))
	for i, v := range e.Violations {
		parts[i] = v.Field + ": " + v.Description
	}
	return strings.Join(parts, "; ")
}

// Is makes errors.Is(err, ErrInvalid) true for validation errors.
func (e *ValidationError) Is(target error) bool { return target == ErrInvalid }

// add records a violation.
func (e *ValidationError) add(field, desc string) {
	e.Violations = append(e.Violations, FieldViolation{Field: field, Description: desc})
}

// err returns nil when there are no violations.
func (e *ValidationError) err() error {
	if len(e.Violations) == 0 {
		return nil
	}
	return e
}
