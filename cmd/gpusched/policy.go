package main

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func newTenantsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tenants",
		Short: "Tenants: who pays, their fair-share weight and hard node limits",
	}
	var (
		maxNodes int32
		perModel []string
		weight   float64
		output   string
	)
	set := &cobra.Command{
		Use:   "set NAME [--max-nodes N] [--max-nodes-per-model H100=8,...] [--weight W]",
		Short: "Create or replace a tenant",
		Long: `Create or replace a tenant. --max-nodes and --max-nodes-per-model are hard
limits on the nodes it holds at once (0 or absent: unlimited); jobs over them
wait with "tenant NAME at quota". --weight is its fair share: between tenants
that both want more than there is, nodes go in proportion to weight.`,
		Example: `  gpusched tenants set acme --max-nodes 16 --max-nodes-per-model H100=8 --weight 2`,
		Args:    exactArgs(1, "one tenant name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			t := &pb.Tenant{Name: args[0], MaxNodes: maxNodes, Weight: weight}
			for _, kv := range splitList(perModel) {
				k, v, ok := strings.Cut(kv, "=")
				n, err := strconv.Atoi(v)
				if !ok || err != nil {
					return usageError("--max-nodes-per-model wants MODEL=N[,MODEL=N...], got %q", kv)
				}
				if t.MaxNodesPerModel == nil {
					t.MaxNodesPerModel = map[string]int32{}
				}
				t.MaxNodesPerModel[k] = int32(n)
			}
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			if _, err := c.SetTenant(cmd.Context(), t); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "tenant %s set\n", args[0])
			return nil
		},
	}
	set.Flags().Int32Var(&maxNodes, "max-nodes", 0, "most nodes held at once (0: unlimited)")
	set.Flags().StringSliceVar(&perModel, "max-nodes-per-model", nil, "most nodes of a GPU model, MODEL=N[,MODEL=N...]")
	set.Flags().Float64Var(&weight, "weight", 1, "fair-share weight")
	list := &cobra.Command{
		Use:     "list",
		Short:   "List tenants with their limits and usage",
		Example: `  gpusched tenants list`,
		Args:    readArgs(&output, "argument"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			ts, err := c.Tenants(cmd.Context())
			if err != nil {
				return err
			}
			switch {
			case structured(output):
				return printProto(cmd.OutOrStdout(), output, &pb.ListTenantsResponse{Tenants: ts})
			case output == "name":
				for _, u := range ts {
					if err := printNames(cmd.OutOrStdout(), u.GetTenant().GetName()); err != nil {
						return err
					}
				}
				return nil
			}
			t := newTable(cmd.OutOrStdout(), "TENANT", "WEIGHT", "NODES", "MAX-NODES", "PER-MODEL", "PENDING", "RUNNING")
			for _, u := range ts {
				max := "-"
				if u.GetTenant().GetMaxNodes() > 0 {
					max = fmt.Sprint(u.GetTenant().GetMaxNodes())
				}
				var caps []string
				for m, n := range u.GetTenant().GetMaxNodesPerModel() {
					caps = append(caps, fmt.Sprintf("%s=%d/%d", m, u.GetNodesPerModel()[m], n))
				}
				sort.Strings(caps)
				t.row(u.GetTenant().GetName(), fmt.Sprint(u.GetTenant().GetWeight()), fmt.Sprint(u.GetNodes()), max,
					orDash(strings.Join(caps, ",")), fmt.Sprint(u.GetPendingJobs()), fmt.Sprint(u.GetRunningJobs()))
			}
			return t.flush()
		},
	}
	list.Flags().StringVarP(&output, "output", "o", "table", "output format: table, wide, json, yaml or name")
	cmd.AddCommand(set, list)
	return cmd
}

func newQueuesCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "queues",
		Short: "Queues: a higher queue priority goes first; the queue \"default\" always exists",
	}
	var (
		priority int32
		weight   float64
		paused   bool
		output   string
	)
	save := func(create bool) func(cmd *cobra.Command, args []string) error {
		return func(cmd *cobra.Command, args []string) error {
			q := &pb.Queue{Name: args[0], Priority: priority, Weight: weight, Paused: create && paused}
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			err = c.QueueService(cmd.Context(), func(ctx context.Context, qs pb.QueueServiceClient) error {
				if create {
					_, err := qs.CreateQueue(ctx, &pb.CreateQueueRequest{Queue: q})
					return err
				}
				_, err := qs.UpdateQueue(ctx, &pb.UpdateQueueRequest{Queue: q})
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "queue %s saved\n", args[0])
			return nil
		}
	}
	create := &cobra.Command{Use: "create NAME [--priority P] [--weight W] [--paused]", Short: "Create a queue",
		Example: `  gpusched queues create batch --priority -10
  gpusched queues create urgent --priority 100
  gpusched queues create nightly --paused    # fill it, then: gpusched queues resume nightly`, Args: exactArgs(1, "one queue name"), RunE: save(true)}
	create.Flags().BoolVar(&paused, "paused", false, "create it paused: its jobs wait until it is resumed")
	update := &cobra.Command{Use: "update NAME [--priority P] [--weight W]", Short: "Change a queue's priority and weight",
		Example: `  gpusched queues update batch --priority 0`, Args: exactArgs(1, "one queue name"), RunE: save(false)}
	for _, c := range []*cobra.Command{create, update} {
		c.Flags().Int32Var(&priority, "priority", 0, "queue priority, -1000..1000 (higher goes first)")
		c.Flags().Float64Var(&weight, "weight", 1, "queue weight")
	}
	pause := func(p bool) func(cmd *cobra.Command, args []string) error {
		return func(cmd *cobra.Command, args []string) error {
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			err = c.QueueService(cmd.Context(), func(ctx context.Context, qs pb.QueueServiceClient) error {
				if p {
					_, err := qs.PauseQueue(ctx, &pb.PauseQueueRequest{Name: args[0]})
					return err
				}
				_, err := qs.ResumeQueue(ctx, &pb.ResumeQueueRequest{Name: args[0]})
				return err
			})
			if err == nil {
				fmt.Fprintf(cmd.ErrOrStderr(), "queue %s %s\n", args[0], map[bool]string{true: "paused", false: "resumed"}[p])
			}
			return err
		}
	}
	pauseCmd := &cobra.Command{Use: "pause NAME", Short: "Start no more jobs from a queue (they stay PENDING)",
		Example: `  gpusched queues pause batch`, Args: exactArgs(1, "one queue name"), RunE: pause(true)}
	resumeCmd := &cobra.Command{Use: "resume NAME", Short: "Start jobs from a paused queue again",
		Example: `  gpusched queues resume batch`, Args: exactArgs(1, "one queue name"), RunE: pause(false)}
	list := &cobra.Command{
		Use:     "list",
		Short:   "List queues with their job counts",
		Example: `  gpusched queues list`,
		Args:    readArgs(&output, "argument"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			qs, err := c.Queues(cmd.Context())
			if err != nil {
				return err
			}
			switch {
			case structured(output):
				return printProto(cmd.OutOrStdout(), output, &pb.ListQueuesResponse{Queues: qs})
			case output == "name":
				for _, u := range qs {
					if err := printNames(cmd.OutOrStdout(), u.GetQueue().GetName()); err != nil {
						return err
					}
				}
				return nil
			}
			t := newTable(cmd.OutOrStdout(), "QUEUE", "PRIORITY", "WEIGHT", "STATE", "PENDING", "RUNNING")
			for _, u := range qs {
				state := "active"
				if u.GetQueue().GetPaused() {
					state = "paused"
				}
				t.row(u.GetQueue().GetName(), fmt.Sprint(u.GetQueue().GetPriority()), fmt.Sprint(u.GetQueue().GetWeight()),
					state, fmt.Sprint(u.GetPendingJobs()), fmt.Sprint(u.GetRunningJobs()))
			}
			return t.flush()
		},
	}
	list.Flags().StringVarP(&output, "output", "o", "table", "output format: table, wide, json, yaml or name")
	cmd.AddCommand(create, update, list, pauseCmd, resumeCmd)
	return cmd
}
