// Package runner runs one lease's command as a real OS process on the node
// and stops it reliably. It owns the process's lifecycle: resolving and
// starting the command in its own process group, sending its stdout and
// stderr to the lease's log file, reaping it, turning its wait status into an
// Exit, and killing the whole group (children included) on Stop.
//
// It knows nothing of leases, the scheduler or GPUs; the node agent decides
// when to start and stop, and what an Exit means for the lease.
package runner

import "errors"

var (
	// ErrEmptyCommand is returned by Start when Spec.Command is empty.
	ErrEmptyCommand = errors.New("runner: empty command")
	// ErrStart is returned by Start when the command cannot be started (not
	// found, not executable, bad working directory). Callers report it as
	// exit code 127, as a shell would.
	ErrStart = errors.New("runner: cannot start command")
	// ErrLog is returned by Start when the log file cannot be opened. It is
	// the node's fault, not the command's.
	ErrLog = errors.New("runner: cannot open log")
	// ErrStopIncomplete is returned by Stop when its context ended before the
	// main process exited or before the last member of its group was gone.
	ErrStopIncomplete = errors.New("runner: stop incomplete")
)
