package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func newTelemetryCmd() *cobra.Command {
	var (
		nodes, jobs, leases, fields []string
		tenant, output              string
		every                       time.Duration
		liveOnly, history           bool
	)
	cmd := &cobra.Command{
		Use:   "telemetry",
		Short: "Stream GPU telemetry (utilization, memory, temperature, power, ECC, XIDs)",
		Long: `Stream per-GPU samples as the agents report them (every --telemetry-interval
of the agent, 1s by default): the recent history the scheduler keeps in memory
first, then live samples until Ctrl-C. -o json prints one JSON object per line
(protojson, dcgm-exporter field names).

--tenant, --lease, --field and --every (or several --job) filter on the
server: the stream starts with the latest sample of every matching GPU
instead of the history, --field sends only the named sample fields, and
--every sends at most one sample per GPU per interval. --history prints the
recent history of one node, job or lease and exits.

A reader too slow for the stream loses the oldest samples; the count is
reported on stderr.`,
		Example: `  gpusched telemetry
  gpusched telemetry --node gpu-01
  gpusched telemetry --job 42 -o json | jq .sample.gpuUtil
  gpusched telemetry --tenant acme --field gpu_util,power_usage_milliwatts --every 10s
  gpusched telemetry --history --job 42 --every 30s -o json`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return usageError("-o must be table or json, got %q", output)
			}
			nodes, jobs, leases, fields = splitList(nodes), splitList(jobs), splitList(leases), splitList(fields)
			if every < 0 {
				return usageError("--every must not be negative")
			}
			if history && (len(nodes) > 1 || len(jobs) > 1 || len(leases) > 1 || tenant != "" || liveOnly) {
				return usageError("--history takes at most one --node, --job and --lease, and no --tenant or --live")
			}
			if history && len(nodes)+len(jobs)+len(leases) == 0 {
				return usageError("--history needs --node, --job or --lease")
			}
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			p := &samplePrinter{w: cmd.OutOrStdout(), errw: cmd.ErrOrStderr(), json: output == "json"}
			switch {
			case history:
				req := &pb.GetTelemetryRequest{Node: first(nodes), JobId: first(jobs), LeaseId: first(leases), Fields: fields}
				if every > 0 {
					req.Every = durationpb.New(every)
				}
				resp, err := c.GetTelemetry(ctx, req)
				if err != nil {
					return err
				}
				for _, s := range resp.GetSamples() {
					if err := p.print(s); err != nil {
						return err
					}
				}
				if resp.GetTruncated() {
					fmt.Fprintln(cmd.ErrOrStderr(), "(older samples left out: the answer is bounded)")
				}
				return nil
			case tenant != "" || len(leases) > 0 || len(fields) > 0 || every > 0 || len(jobs) > 1:
				req := &pb.StreamTelemetryRequest{Nodes: nodes, JobIds: jobs, LeaseIds: leases, Tenant: tenant, Fields: fields}
				if every > 0 {
					req.Every = durationpb.New(every)
				}
				err = c.StreamTelemetry(ctx, req, func(r *pb.StreamTelemetryResponse) error {
					if r.GetSnapshot() && liveOnly {
						return nil
					}
					p.dropped(r.GetDropped())
					for _, s := range r.GetSamples() {
						if err := p.print(s); err != nil {
							return err
						}
					}
					return nil
				})
			default:
				req := &pb.WatchTelemetryRequest{Nodes: nodes, JobId: first(jobs), LiveOnly: liveOnly}
				err = c.WatchTelemetry(ctx, req, func(r *pb.WatchTelemetryResponse) error {
					p.dropped(r.GetDropped())
					if p.json {
						return p.printJSON(r)
					}
					return p.print(&pb.TelemetrySample{Node: r.GetNode(), Time: r.GetTime(), LeaseId: r.GetLeaseId(), JobId: r.GetJobId(), Sample: r.GetSample()})
				})
			}
			if ctx.Err() != nil && (err == nil || errors.Is(err, context.Canceled)) {
				return nil // Ctrl-C
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&nodes, "node", nil, "only these nodes (repeatable or comma-separated)")
	f.StringSliceVar(&jobs, "job", nil, "only samples taken while this job held the node (repeatable)")
	f.StringSliceVar(&leases, "lease", nil, "only samples taken while this lease held the node (repeatable)")
	f.StringVar(&tenant, "tenant", "", "only samples taken while a lease of this tenant held the node")
	f.StringSliceVar(&fields, "field", nil, "send only these sample fields, e.g. gpu_util,fb_used_bytes (repeatable)")
	f.DurationVar(&every, "every", 0, "at most one sample per GPU per interval, e.g. 10s")
	f.StringVarP(&output, "output", "o", "table", "output format: table or json (JSON lines)")
	f.BoolVar(&liveOnly, "live", false, "skip the recent history (or the snapshot)")
	f.BoolVar(&history, "history", false, "print the recent history of one --node, --job or --lease and exit")
	return cmd
}

// samplePrinter prints telemetry samples as a table or JSON lines.
type samplePrinter struct {
	w, errw io.Writer
	json    bool
	header  bool
}

// dropped reports samples the server dropped for this reader.
func (p *samplePrinter) dropped(n uint64) {
	if n > 0 {
		fmt.Fprintf(p.errw, "(%d samples dropped: reading too slowly)\n", n)
	}
}

func (p *samplePrinter) printJSON(m proto.Message) error {
	b, err := protojson.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(p.w, "%s\n", b)
	return err
}

func (p *samplePrinter) print(r *pb.TelemetrySample) error {
	if p.json {
		return p.printJSON(r)
	}
	if !p.header {
		fmt.Fprintf(p.w, "%-12s %-10s %-3s %5s %5s %9s %5s %7s %6s %4s %-8s\n",
			"TIME", "NODE", "GPU", "UTIL", "MEM%", "FB-USED", "TEMP", "POWER", "SM-MHZ", "XID", "JOB")
		p.header = true
	}
	s := r.GetSample()
	_, err := fmt.Fprintf(p.w, "%-12s %-10s %-3d %4d%% %4d%% %6dMiB %4dC %6dW %6d %4d %-8s\n",
		r.GetTime().AsTime().Local().Format("15:04:05.000"), r.GetNode(), s.GetGpu(), s.GetGpuUtil(), s.GetMemCopyUtil(),
		s.GetFbUsedBytes()>>20, s.GetGpuTemp(), s.GetPowerUsageMilliwatts()/1000, s.GetSmClockMhz(), s.GetLastXid(), orDash(r.GetJobId()))
	return err
}

// first returns the first of xs, or "".
func first(xs []string) string {
	if len(xs) == 0 {
		return ""
	}
	return xs[0]
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
