package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
)

func newStatusCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the scheduler replicas, which one leads, and its fencing token",
		Long: `Show every live scheduler replica, which one leads and the leader's fencing
token (the create revision of its election key in etcd; agents refuse commands
carrying an older one). Any replica answers, from etcd.`,
		Example: `  gpusched status
  gpusched status --server 10.0.0.1:7070,10.0.0.2:7070 -o json`,
		Args: readArgs(&output, "argument"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError("status takes no arguments")
			}
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			st, err := c.Status(cmd.Context())
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			switch {
			case structured(output):
				return printProto(w, output, st)
			case output == "name":
				for _, r := range st.GetReplicas() {
					if err := printNames(w, r.GetName()); err != nil {
						return err
					}
				}
				return nil
			}
			t := newTable(w, "REPLICA", "ADDRESS", "ROLE", "TOKEN", "UP")
			now := time.Now()
			for _, r := range st.GetReplicas() {
				role, token := "follower", "-"
				if r.GetLeader() {
					role, token = "leader", fmt.Sprint(st.GetFencingToken())
				}
				t.row(r.GetName(), r.GetAddress(), role, token, age(r.GetStartTime(), now))
			}
			if err := t.flush(); err != nil {
				return err
			}
			if st.GetLeader() == "" {
				fmt.Fprintln(cmd.ErrOrStderr(), "no leader elected")
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table, wide, json, yaml or name")
	return cmd
}
