package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/gpusched/gpusched/internal/invariants"
)

func newCheckCmd() *cobra.Command {
	var (
		endpoints, prefix, acceptedFile string
		timeout                         time.Duration
	)
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Replay the etcd history and prove the scheduler kept its invariants",
		Long: `Replay every scheduler write in etcd, in revision order, and check that no
node was ever in two active leases, every job has exactly one current state,
and no deposed leader wrote after its successor. Exit 0 when all hold, 1 with
the violations otherwise. Needs the full history (no etcd compaction).`,
		Example: `  gpusched check --etcd-endpoints http://127.0.0.1:2379
  gpusched check --etcd-endpoints http://127.0.0.1:2379 --accepted ids.txt`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			eps := splitList([]string{endpoints})
			if len(eps) == 0 {
				return usageError("--etcd-endpoints is required")
			}
			var accepted []string
			if acceptedFile != "" {
				b, err := os.ReadFile(acceptedFile)
				if err != nil {
					return usageError("--accepted: %v", err)
				}
				accepted = strings.Fields(string(b))
			}
			cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
			if err != nil {
				return fmt.Errorf("etcd: %w", err)
			}
			defer cli.Close()
			ctx, cancel := signalContext(cmd.Context())
			defer cancel()
			ctx, cancelT := context.WithTimeout(ctx, timeout)
			defer cancelT()
			r, err := invariants.Check(ctx, cli, prefix, accepted)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), r)
			if !r.OK() {
				return &codedError{code: exitError}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&endpoints, "etcd-endpoints", "", "etcd client URLs, comma-separated (required)")
	f.StringVar(&prefix, "prefix", "/gpusched", "etcd key prefix of the scheduler")
	f.StringVar(&acceptedFile, "accepted", "", "file of job IDs clients saw accepted (whitespace-separated); each must exist")
	f.DurationVar(&timeout, "timeout", 5*time.Minute, "give up after this long")
	return cmd
}
