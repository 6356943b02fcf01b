// Command gpusched is the one binary of gpusched: the dev cluster, the
// scheduler and agent daemons, and the CLI (submit, jobs, nodes, ...).
//
// Exit codes: 0 success; 1 error (server unreachable, RPC failed); 2 invalid
// input (bad flag or InvalidArgument from the server); for `wait`: 3 job
// FAILED, 4 CANCELLED, 5 TIMED_OUT.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/gpusched/gpusched/client"
)

// Exit codes, documented in the README.
const (
	exitOK        = 0
	exitError     = 1
	exitUsage     = 2
	exitFailed    = 3
	exitCancelled = 4
	exitTimedOut  = 5
)

// exitError carries a specific exit code out of a command.
type codedError struct {
	code int
	err  error
}

func (e *codedError) Error() string { return e.err.Error() }
func (e *codedError) Unwrap() error { return e.err }

// usageError marks bad input found by the CLI itself.
func usageError(format string, args ...any) error {
	return &codedError{code: exitUsage, err: fmt.Errorf(format, args...)}
}

func main() {
	root := newRootCmd()
	err := root.Execute()
	os.Exit(exitCode(err))
}

// exitCode prints err as one line and picks the exit code.
func exitCode(err error) int {
	if err == nil {
		return exitOK
	}
	var ce *codedError
	if errors.As(err, &ce) && ce.err == nil {
		return ce.code // already reported
	}
	fmt.Fprintln(os.Stderr, "gpusched: "+err.Error())
	switch {
	case errors.As(err, &ce):
		return ce.code
	case errors.Is(err, client.ErrInvalid):
		return exitUsage
	case isFlagError(err):
		return exitUsage
	}
	return exitError
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "gpusched",
		Short: "Lease whole GPU nodes to jobs and tenants",
		Long: `gpusched leases whole, exclusive GPU nodes to jobs. One binary runs the
dev cluster, the scheduler and node agents, and is the command-line client.

The client commands talk to the scheduler given by --server or the
GPUSCHED_SERVER environment variable (host:port, comma-separated for several
replicas).`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return &codedError{code: exitUsage, err: fmt.Errorf("%w (see '%s --help')", err, c.CommandPath())}
	})
	root.PersistentFlags().String("server", "", "scheduler endpoint(s), host:port[,host:port...] (env GPUSCHED_SERVER)")
	root.PersistentFlags().String("token", "", "tenant token sent with every call (env GPUSCHED_TOKEN)")
	root.AddCommand(
		newDevCmd(), newSchedulerCmd(), newAgentCmd(),
		newEtcdCmd(),
		newSubmitCmd(), newJobsCmd(), newWaitCmd(), newLogsCmd(), newCancelCmd(), newNodesCmd(), newStatusCmd(), newCheckCmd(),
		newDrainCmd(), newUndrainCmd(), newTelemetryCmd(), newTopCmd(), newMockCmd(), newTenantsCmd(), newQueuesCmd(),
		newSimCmd(),
	)
	return root
}

func isFlagError(err error) bool {
	var ce *codedError
	return errors.As(err, &ce) && ce.code == exitUsage
}
