package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/gpusched/gpusched/internal/sim"
)

func newSimCmd() *cobra.Command {
	var (
		cfg        sim.Config
		etcd       string
		mix        string
		openRun    string
		backlogRun string
		ceiling    string
		mode       string
		asJSON     bool
		jsonFile   string
	)
	cmd := &cobra.Command{
		Use:   "sim",
		Short: "Benchmark a simulated cluster: etcd, the scheduler and thousands of hollow agents",
		Long: `Run a simulated cluster and measure the scheduler: an etcd (embedded, with
fsync, or --etcd of a real cluster), a scheduler replica (a child process
'gpusched sim replica' by default, so its RSS, CPU and profiles are its own;
--scheduler inproc runs it in this process) and --nodes hollow agents in this
process. Each hollow agent speaks the real AgentService protocol on its own
gRPC stream (many streams share one connection): hello with 8 simulated GPUs,
heartbeats, StartLease → started, "runs" for the job's SIM_DURATION (env),
exits 0, and reports released and clean. A load generator submits through the
Go SDK.

Phases:
  open     --rate jobs/s for --duration, open loop, with free capacity:
           accepted submissions/s and submit → StartLease latency at the agent
  backlog  the queue is paused, --backlog jobs are queued (SubmitBatch), and
           --burst one-node jobs in a queue of higher priority; the burst is
           released first onto the idle cluster (placements/s with free
           nodes, the backlog pending behind), then, once its jobs ended,
           the backlog: committed placements/s until all placed (the drain,
           bound by job turnover)
  then     every job must end SUCCEEDED (--verify), etcd DB size, leader cold
           starts (--cold-start: agents held back, then all retrying), and
           etcd's batched-write ceiling on the same machine (--ceiling-clients).

GOGC and GOMEMLIMIT in the environment apply to the scheduler child only;
the sim process itself paces its collector by a 6 GiB heap budget.

The report is a table, or JSON with --json. See docs/benchmarks.md.
'gpusched sim fanout' measures telemetry fan-out to StreamTelemetry
subscribers instead.`,
		Example: `  gpusched sim                                   # 10,000 nodes, 2,000/s open, 100,000 backlog
  gpusched sim --nodes 1000 --backlog 10000 --duration 10s --rate 500
  gpusched sim --json --cpuprofile sched.cpu --memprofile sched.heap > report.json`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if cfg.Mix, err = sim.ParseMix(mix); err != nil {
				return usageError("--mix: %v", err)
			}
			if cfg.OpenMinRun, cfg.OpenMaxRun, err = parseRunRange(openRun); err != nil {
				return usageError("--run: %v", err)
			}
			if cfg.BacklogMinRun, cfg.BacklogMaxRun, err = parseRunRange(backlogRun); err != nil {
				return usageError("--backlog-run: %v", err)
			}
			for _, c := range splitList([]string{ceiling}) {
				n, err := strconv.Atoi(c)
				if err != nil || n < 1 {
					return usageError("--ceiling-clients wants numbers >= 1, got %q", c)
				}
				cfg.CeilingClients = append(cfg.CeilingClients, n)
			}
			if cfg.SchedulerProcess, err = schedulerMode(mode); err != nil {
				return err
			}
			if cfg.Nodes < 1 {
				return usageError("--nodes must be at least 1")
			}
			if cfg.BurstJobs < 0 {
				cfg.BurstJobs = cfg.Nodes
			}
			cfg.EtcdEndpoints, cfg.Progress = splitList([]string{etcd}), cmd.ErrOrStderr()
			return runSim(cmd, jsonFile, asJSON, func(ctx context.Context) (simReport, error) {
				rep, err := sim.Run(ctx, cfg)
				if rep == nil {
					return nil, err
				}
				return rep, err
			})
		},
	}
	f := cmd.Flags()
	f.IntVar(&cfg.Nodes, "nodes", 10000, "hollow agents (nodes of 8 GPUs)")
	f.StringVar(&cfg.GPUModel, "gpu-model", "H100", "GPU model of every node")
	f.IntVar(&cfg.AgentsPerConn, "agents-per-conn", 100, "hollow agents sharing one gRPC connection (each has its own stream)")
	f.Float64Var(&cfg.TelemetryHz, "telemetry-hz", 0, "telemetry batches per second per agent (0: none)")
	f.StringVar(&etcd, "etcd", "", "endpoints of a real etcd cluster (default: an embedded member in --work-dir)")
	f.BoolVar(&cfg.EtcdNoFsync, "etcd-no-fsync", false, "embedded etcd without fsync (not the production shape)")
	f.StringVar(&cfg.Prefix, "prefix", "/gpusched", "etcd key prefix; must be empty")
	f.StringVar(&mode, "scheduler", "process", "run the scheduler as a child process or inproc")
	f.StringVar(&cfg.SchedulerLogLevel, "scheduler-log-level", "warn", "scheduler log level (child's log in --work-dir/logs)")
	f.StringVar(&cfg.SchedulerHeapBudget, "scheduler-heap-budget", "auto", "the scheduler child's --heap-budget (0: Go's default pacing)")
	f.DurationVar(&cfg.HeartbeatInterval, "heartbeat-interval", 2*time.Second, "agent heartbeat interval the scheduler asks for")
	f.StringVar(&mix, "mix", sim.FormatMix(sim.DefaultMix), "job sizes, weight:nodes or weight:min-max, comma-separated")
	f.IntVar(&cfg.Tenants, "tenants", 8, "tenants the jobs are spread over")
	f.Float64Var(&cfg.OpenRate, "rate", 2000, "open phase: submissions per second (0 skips the phase)")
	f.DurationVar(&cfg.OpenDuration, "duration", 30*time.Second, "open phase: how long to submit")
	f.IntVar(&cfg.OpenBatch, "submit-batch", 1, "open phase: jobs per call (1: Submit, more: SubmitBatch)")
	f.IntVar(&cfg.OpenConcurrency, "submit-concurrency", 512, "open phase: calls in flight at most")
	f.StringVar(&openRun, "run", "200ms-800ms", "open phase: job run time, d or min-max (uniform)")
	f.IntVar(&cfg.BacklogJobs, "backlog", 100000, "backlog phase: jobs queued while the queue is paused (0 skips the phase)")
	f.IntVar(&cfg.BacklogBatch, "backlog-batch", 1000, "backlog phase: jobs per SubmitBatch")
	f.IntVar(&cfg.BacklogConcurrency, "backlog-concurrency", 4, "backlog phase: SubmitBatch calls in flight")
	f.StringVar(&backlogRun, "backlog-run", "0s-200ms", "backlog phase: job run time, d or min-max (uniform)")
	f.IntVar(&cfg.BurstJobs, "burst", -1, "backlog phase: one-node jobs released first onto the idle cluster (-1: --nodes; 0 skips)")
	f.DurationVar(&cfg.BurstRun, "burst-run", 3*time.Second, "backlog phase: run time of each burst job (long enough that none ends during the burst)")
	f.BoolVar(&cfg.ColdStart, "cold-start", true, "stop the leader at the end and time a fresh replica (twice: agents held back, then retrying)")
	f.StringVar(&ceiling, "ceiling-clients", "1,4,16", "etcd batched-write ceiling from this many clients each ('' skips it)")
	f.DurationVar(&cfg.CeilingDuration, "ceiling-duration", 3*time.Second, "how long each ceiling measurement writes")
	f.BoolVar(&cfg.Verify, "verify", true, "wait for every job to end and count their states")
	f.BoolVar(&cfg.CheckInvariants, "check", false, "replay etcd's history and check the invariants (slow on large runs)")
	f.StringVar(&cfg.CPUProfile, "cpuprofile", "", "write the scheduler's CPU profile over the backlog drain here")
	f.StringVar(&cfg.OpenCPUProfile, "cpuprofile-open", "", "write the scheduler's CPU profile over the open phase here")
	f.StringVar(&cfg.MemProfile, "memprofile", "", "write the scheduler's heap profile with the backlog queued here")
	f.StringVar(&cfg.ColdStartCPUProfile, "cpuprofile-cold-start", "", "write the fresh replica's CPU profile, start to state loaded, here (agents held back) and in FILE.retrying")
	f.StringVar(&cfg.SimCPUProfile, "sim-cpuprofile", "", "write this process's (agents, etcd, load) CPU profile over the drain here")
	f.StringVar(&cfg.OpenSimCPUProfile, "sim-cpuprofile-open", "", "write this process's CPU profile over the open phase here")
	f.StringVar(&cfg.WorkDir, "work-dir", "", "etcd data and scheduler logs (default: a temp dir, removed at the end)")
	f.DurationVar(&cfg.PhaseTimeout, "phase-timeout", 10*time.Minute, "give up on any one wait after this long")
	f.BoolVar(&asJSON, "json", false, "print the report as JSON instead of tables")
	f.StringVar(&jsonFile, "json-file", "", "also write the report as JSON to this file")
	f.StringVar(&cfg.LatencyFile, "latency-file", "", "write every open-phase submit → StartLease latency here, as CSV in submission order")
	cmd.AddCommand(newSimReplicaCmd(), newSimFanoutCmd())
	return cmd
}

// newSimFanoutCmd is `gpusched sim fanout`: telemetry fan-out from hollow
// agents through the leader's hub to StreamTelemetry subscribers.
func newSimFanoutCmd() *cobra.Command {
	var (
		cfg      sim.FanoutConfig
		etcd     string
		subs     string
		fields   string
		mode     string
		asJSON   bool
		jsonFile string
	)
	cmd := &cobra.Command{
		Use:   "fanout",
		Short: "Benchmark telemetry fan-out: hollow agents → the leader's hub → StreamTelemetry subscribers",
		Long: `Run etcd, a scheduler replica (a child process by default) and --nodes hollow
agents that each send a TelemetryBatch of their 8 GPUs --telemetry-hz times a
second, stamped with the time right before the send. Then, for each count in
--subscribers, start that many subscribers in this process, each with its own
Go SDK client (its own connection) and goroutine, streaming every node's
samples (StreamTelemetry, all fields unless --fields), wait for their
snapshots, warm up, and measure for --duration: live samples/s received per
subscriber, agent → subscriber latency (same host clock), the drops the
stream reports (dropped, dropped_total), and the scheduler process's CPU
(/proc/<pid>/stat) over the window. Target: p99 <= 250 ms.

GOGC and GOMEMLIMIT in the environment apply to the scheduler child only;
the sim process itself paces its collector by a 6 GiB heap budget.

The report is a table, or JSON with --json. See docs/benchmarks.md.`,
		Example: `  gpusched sim fanout                                            # 2,000 nodes at 1 Hz, 20 subscribers, 60 s
  gpusched sim fanout --nodes 500 --subscribers 1,5,20,50 --warmup 5s --duration 20s
  gpusched sim fanout --fields gpu_util,fb_used_bytes --json --cpuprofile sched.cpu > report.json`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) (err error) {
			for _, c := range splitList([]string{subs}) {
				n, err := strconv.Atoi(c)
				if err != nil || n < 1 {
					return usageError("--subscribers wants numbers >= 1, got %q", c)
				}
				cfg.Subscribers = append(cfg.Subscribers, n)
			}
			if len(cfg.Subscribers) == 0 {
				return usageError("--subscribers wants at least one number")
			}
			cfg.Fields = splitList([]string{fields})
			if cfg.SchedulerProcess, err = schedulerMode(mode); err != nil {
				return err
			}
			if cfg.Nodes < 1 || cfg.TelemetryHz <= 0 || cfg.Duration <= 0 || cfg.Warmup < 0 {
				return usageError("--nodes, --telemetry-hz and --duration must be positive, --warmup not negative")
			}
			cfg.EtcdEndpoints, cfg.Progress = splitList([]string{etcd}), cmd.ErrOrStderr()
			return runSim(cmd, jsonFile, asJSON, func(ctx context.Context) (simReport, error) {
				rep, err := sim.RunFanout(ctx, cfg)
				if rep == nil {
					return nil, err
				}
				return rep, err
			})
		},
	}
	f := cmd.Flags()
	f.IntVar(&cfg.Nodes, "nodes", 2000, "hollow agents (nodes of 8 GPUs)")
	f.StringVar(&cfg.GPUModel, "gpu-model", "H100", "GPU model of every node")
	f.IntVar(&cfg.AgentsPerConn, "agents-per-conn", 100, "hollow agents sharing one gRPC connection (each has its own stream)")
	f.Float64Var(&cfg.TelemetryHz, "telemetry-hz", 1, "telemetry batches per second per agent")
	f.StringVar(&subs, "subscribers", "20", "subscriber counts, comma-separated: one measured step each, in order")
	f.StringVar(&fields, "fields", "", "GpuSample fields the subscribers ask for, comma-separated (default: all)")
	f.DurationVar(&cfg.Warmup, "warmup", 10*time.Second, "after the subscribers' snapshots, wait this long before measuring")
	f.DurationVar(&cfg.Duration, "duration", 60*time.Second, "measurement window of each step")
	f.StringVar(&etcd, "etcd", "", "endpoints of a real etcd cluster (default: an embedded member in --work-dir)")
	f.BoolVar(&cfg.EtcdNoFsync, "etcd-no-fsync", false, "embedded etcd without fsync")
	f.StringVar(&cfg.Prefix, "prefix", "/gpusched", "etcd key prefix; must be empty")
	f.StringVar(&mode, "scheduler", "process", "run the scheduler as a child process or inproc")
	f.StringVar(&cfg.SchedulerLogLevel, "scheduler-log-level", "warn", "scheduler log level (child's log in --work-dir/logs)")
	f.DurationVar(&cfg.HeartbeatInterval, "heartbeat-interval", 2*time.Second, "agent heartbeat interval the scheduler asks for")
	f.StringVar(&cfg.CPUProfile, "cpuprofile", "", "write the scheduler's CPU profile over each window here (FILE-<n>subs.EXT with several steps)")
	f.StringVar(&cfg.SimCPUProfile, "sim-cpuprofile", "", "write this process's (agents, subscribers, etcd) CPU profile over each window here")
	f.StringVar(&cfg.MemProfile, "memprofile", "", "write the scheduler's heap profile after the last window here")
	f.StringVar(&cfg.WorkDir, "work-dir", "", "etcd data and scheduler logs (default: a temp dir, removed at the end)")
	f.DurationVar(&cfg.PhaseTimeout, "phase-timeout", 5*time.Minute, "give up on any one wait after this long")
	f.BoolVar(&asJSON, "json", false, "print the report as JSON instead of tables")
	f.StringVar(&jsonFile, "json-file", "", "also write the report as JSON to this file")
	return cmd
}

// parseRunRange parses "d" or "min-max" durations.
func parseRunRange(s string) (time.Duration, time.Duration, error) {
	lo, hi, ok := strings.Cut(s, "-")
	if !ok {
		hi = lo
	}
	a, err := time.ParseDuration(strings.TrimSpace(lo))
	if err != nil {
		return 0, 0, err
	}
	b, err := time.ParseDuration(strings.TrimSpace(hi))
	if err != nil {
		return 0, 0, err
	}
	if a < 0 || b < a {
		return 0, 0, fmt.Errorf("want 0 <= min <= max, got %s", s)
	}
	return a, b, nil
}

// newSimReplicaCmd is the child side of `gpusched sim`: one scheduler
// replica with a commit tap, pprof and /sim/stats. Not for direct use.
func newSimReplicaCmd() *cobra.Command {
	var (
		cfg       sim.ReplicaConfig
		endpoints string
	)
	var heap heapBudgetFlag
	cmd := &cobra.Command{
		Use:    "replica",
		Short:  "Run one scheduler replica for gpusched sim (internal)",
		Hidden: true,
		Args:   exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg.EtcdEndpoints = splitList([]string{endpoints})
			if len(cfg.EtcdEndpoints) == 0 {
				return usageError("--etcd-endpoints is required")
			}
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			stopGC, err := heap.start(ctx, zap.NewNop())
			if err != nil {
				return err
			}
			defer stopGC()
			return sim.ServeReplica(ctx, cfg, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&endpoints, "etcd-endpoints", "", "etcd client URLs")
	f.StringVar(&cfg.Listen, "listen", "127.0.0.1:0", "gRPC listen address")
	f.StringVar(&cfg.DebugListen, "debug-listen", "127.0.0.1:0", "pprof and /sim/stats listen address")
	f.StringVar(&cfg.Prefix, "prefix", "/gpusched", "etcd key prefix")
	f.StringVar(&cfg.Name, "name", "", "replica name")
	f.DurationVar(&cfg.SessionTTL, "session-ttl", 5*time.Second, "leader session TTL")
	f.DurationVar(&cfg.HeartbeatInterval, "heartbeat-interval", 2*time.Second, "agent heartbeat interval")
	f.DurationVar(&cfg.NodeLostAfter, "node-lost-after", 30*time.Second, "mark a node LOST after its agent is gone this long")
	f.StringVar(&cfg.LogLevel, "log-level", "warn", "log level")
	f.StringVar(&cfg.LoadCPUProfile, "load-cpuprofile", "", "CPU profile from start until the state is loaded")
	heap.register(cmd)
	return cmd
}

// schedulerMode reads --scheduler: true for a child process.
func schedulerMode(mode string) (bool, error) {
	switch mode {
	case "process":
		return true, nil
	case "inproc":
		return false, nil
	}
	return false, usageError("--scheduler must be process or inproc, got %q", mode)
}

// runSim runs one sim until a signal or its end and writes its report.
func runSim(cmd *cobra.Command, jsonFile string, asJSON bool, run func(context.Context) (simReport, error)) error {
	ctx, stop := signalContext(cmd.Context())
	defer stop()
	rep, err := run(ctx)
	if rep == nil {
		return err
	}
	return writeSimReport(cmd.OutOrStdout(), rep, err, jsonFile, asJSON)
}

// simReport is what a sim run reports: JSON-encodable, with a text form.
type simReport interface{ WriteText(io.Writer) }

// writeSimReport saves rep as JSON to jsonFile (if set) and prints it, as
// JSON or text. A run that failed still saves and, with --json, prints
// what it measured; runErr stays the error returned.
func writeSimReport(w io.Writer, rep simReport, runErr error, jsonFile string, asJSON bool) error {
	err := runErr
	if jsonFile != "" {
		b, merr := json.MarshalIndent(rep, "", "  ")
		if merr == nil {
			merr = os.WriteFile(jsonFile, append(b, '\n'), 0o644)
		}
		if merr != nil && err == nil {
			err = merr
		}
	}
	if runErr != nil && !asJSON {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if e := enc.Encode(rep); e != nil && err == nil {
			err = e
		}
		return err
	}
	rep.WriteText(w)
	return err
}
