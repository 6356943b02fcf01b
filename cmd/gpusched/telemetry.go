package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func newTelemetryCmd() *cobra.Command {
	var (
		nodes    []string
		job      string
		output   string
		liveOnly bool
	)
	cmd := &cobra.Command{
		Use:   "telemetry",
		Short: "Stream GPU telemetry (utilization, memory, temperature, power, ECC, XIDs)",
		Long: `Stream per-GPU samples as the agents report them (every --telemetry-interval
of the agent, 1s by default): the recent history the scheduler keeps in memory
first, then live samples until Ctrl-C. -o json prints one JSON object per line
(protojson, dcgm-exporter field names).`,
		Example: `  gpusched telemetry
  gpusched telemetry --node gpu-01
  gpusched telemetry --job 42 -o json | jq .sample.gpuUtil`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return usageError("-o must be table or json, got %q", output)
			}
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			w := cmd.OutOrStdout()
			header := false
			req := &pb.WatchTelemetryRequest{Nodes: splitList(nodes), JobId: job, LiveOnly: liveOnly}
			err = c.WatchTelemetry(ctx, req, func(r *pb.WatchTelemetryResponse) error {
				if output == "json" {
					b, err := protojson.Marshal(r)
					if err != nil {
						return err
					}
					_, err = fmt.Fprintf(w, "%s\n", b)
					return err
				}
				if !header {
					fmt.Fprintf(w, "%-12s %-10s %-3s %5s %5s %9s %5s %7s %6s %4s %-8s\n",
						"TIME", "NODE", "GPU", "UTIL", "MEM%", "FB-USED", "TEMP", "POWER", "SM-MHZ", "XID", "JOB")
					header = true
				}
				s := r.GetSample()
				if r.GetDropped() > 0 {
					fmt.Fprintf(cmd.ErrOrStderr(), "(%d samples dropped: reading too slowly)\n", r.GetDropped())
				}
				_, err := fmt.Fprintf(w, "%-12s %-10s %-3d %4d%% %4d%% %6dMiB %4dC %6dW %6d %4d %-8s\n",
					r.GetTime().AsTime().Local().Format("15:04:05.000"), r.GetNode(), s.GetGpu(), s.GetGpuUtil(), s.GetMemCopyUtil(),
					s.GetFbUsedBytes()>>20, s.GetGpuTemp(), s.GetPowerUsageMilliwatts()/1000, s.GetSmClockMhz(), s.GetLastXid(), orDash(r.GetJobId()))
				return err
			})
			if ctx.Err() != nil && (err == nil || errors.Is(err, context.Canceled)) {
				return nil // Ctrl-C
			}
			return err
		},
	}
	cmd.Flags().StringSliceVar(&nodes, "node", nil, "only these nodes (repeatable or comma-separated)")
	cmd.Flags().StringVar(&job, "job", "", "only samples taken while this job held the node")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json (JSON lines)")
	cmd.Flags().BoolVar(&liveOnly, "live", false, "skip the recent history")
	return cmd
}

func newMockCmd() *cobra.Command {
	mock := &cobra.Command{
		Use:   "mock",
		Short: "Dev and test tools for simulated GPU nodes",
	}
	var (
		node          string
		gpu           int
		xid           uint64
		eccDBE, clear bool
		gpuProcess    uint32
		timeout       time.Duration
	)
	inject := &cobra.Command{
		Use:   "inject --node NODE (--xid N | --ecc-dbe | --gpu-process PID | --clear) [--gpu K]",
		Short: "Inject a fault into a simulated node (agents on real NVML refuse)",
		Long: `Inject a fault into a node running a mock GPU backend:
  --xid N           an XID error on GPU K (fatal ones such as 79 drain the node; 13, 31, 43 are recorded only)
  --ecc-dbe         an uncorrectable (double-bit) ECC error on GPU K
  --gpu-process PID register a real OS process as using GPU K (the agent treats it as foreign)
  --clear           remove every injected fault and process; the node recovers at its next re-check`,
		Example: `  gpusched mock inject --node gpu-01 --xid 79 --gpu 3
  sleep 600 & gpusched mock inject --node gpu-02 --gpu-process $! --gpu 0
  gpusched mock inject --node gpu-01 --clear`,
		Args: exactArgs(0, "no arguments (use flags)"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if node == "" {
				return usageError("--node is required")
			}
			req := &pb.InjectFaultRequest{Node: node, Gpu: int32(gpu)}
			set := 0
			f := cmd.Flags()
			if f.Changed("xid") {
				req.Fault, set = &pb.InjectFaultRequest_Xid{Xid: xid}, set+1
			}
			if eccDBE {
				req.Fault, set = &pb.InjectFaultRequest_EccDoubleBit{EccDoubleBit: true}, set+1
			}
			if f.Changed("gpu-process") {
				req.Fault, set = &pb.InjectFaultRequest_GpuProcess{GpuProcess: gpuProcess}, set+1
			}
			if clear {
				req.Fault, set = &pb.InjectFaultRequest_Clear{Clear: true}, set+1
			}
			if set != 1 {
				return usageError("give exactly one of --xid, --ecc-dbe, --gpu-process or --clear")
			}
			if !clear && !f.Changed("gpu") {
				req.Gpu = 0
			}
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			if err := c.InjectFault(ctx, req); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "injected into %s\n", node)
			return nil
		},
	}
	f := inject.Flags()
	f.StringVar(&node, "node", "", "node to inject into (required)")
	f.IntVar(&gpu, "gpu", -1, "GPU index (default 0; the whole node for --clear)")
	f.Uint64Var(&xid, "xid", 0, "inject this XID error")
	f.BoolVar(&eccDBE, "ecc-dbe", false, "inject an uncorrectable ECC error")
	f.Uint32Var(&gpuProcess, "gpu-process", 0, "register this PID as a process using the GPU")
	f.BoolVar(&clear, "clear", false, "remove all injected faults and processes")
	f.DurationVar(&timeout, "timeout", 30*time.Second, "give up after this long")
	mock.AddCommand(inject)
	return mock
}
