package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newDrainCmd() *cobra.Command {
	var (
		now    bool
		reason string
	)
	cmd := &cobra.Command{
		Use:   "drain NODE",
		Short: "Stop new leases on a node (the current lease may finish unless --now)",
		Long: `Drain a node for maintenance: it takes no new lease until undrained. Its
current lease runs to the end (the node shows DRAINING, then DRAINED), unless
--now: then the lease is stopped (SIGTERM, then SIGKILL after the grace) and
its job requeued without spending a retry.`,
		Example: `  gpusched drain gpu-07 --reason "replace PSU"
  gpusched drain gpu-07 --now
  gpusched undrain gpu-07`,
		Args: exactArgs(1, "one node name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			n, err := c.Drain(cmd.Context(), args[0], reason, now)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "node %s %s\n", n.GetId(), nodeStateName(n.GetState()))
			return nil
		},
	}
	cmd.Flags().BoolVar(&now, "now", false, "stop the current lease now and requeue its job")
	cmd.Flags().StringVar(&reason, "reason", "", "why, shown on the node")
	return cmd
}

func newUndrainCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "undrain NODE",
		Short:   "Return a drained node to service",
		Example: `  gpusched undrain gpu-07`,
		Args:    exactArgs(1, "one node name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			n, err := c.Undrain(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "node %s %s\n", n.GetId(), nodeStateName(n.GetState()))
			return nil
		},
	}
}
