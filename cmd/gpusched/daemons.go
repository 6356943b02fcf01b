package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/gpusched/gpusched/internal/devcluster"
	"github.com/gpusched/gpusched/internal/metrics"
	"github.com/gpusched/gpusched/nodeagent"
	"github.com/gpusched/gpusched/nodeagent/gpu"
	"github.com/gpusched/gpusched/scheduler"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/gateway"
	"github.com/gpusched/gpusched/scheduler/telemetry"
)

// devHTTPListen is where `gpusched dev` serves REST/JSON unless told
// otherwise; when it is taken, dev picks a free port instead.
const devHTTPListen = "127.0.0.1:8080"

// logFlags are shared by the daemon commands.
type logFlags struct{ level, format string }

func (l *logFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&l.level, "log-level", "info", "log level: debug, info, warn, error")
	cmd.Flags().StringVar(&l.format, "log-format", "console", "log format: console or json")
}

func (l *logFlags) logger() (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(l.level)
	if err != nil {
		return nil, usageError("--log-level: %v", err)
	}
	var cfg zap.Config
	switch l.format {
	case "json":
		cfg = zap.NewProductionConfig()
	case "console":
		cfg = zap.NewDevelopmentConfig()
		cfg.DisableStacktrace = true
	default:
		return nil, usageError("--log-format must be console or json, got %q", l.format)
	}
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.OutputPaths, cfg.ErrorOutputPaths = []string{"stderr"}, []string{"stderr"}
	return cfg.Build()
}

// metricsFlags serve Prometheus /metrics and, if asked, pprof; shared by
// dev, scheduler and agent.
type metricsFlags struct {
	listen string
	pprof  bool
}

func (m *metricsFlags) register(cmd *cobra.Command, what string) {
	cmd.Flags().StringVar(&m.listen, "metrics-listen", "", "serve Prometheus /metrics ("+what+") on this address, e.g. 0.0.0.0:9400 (default: none)")
	cmd.Flags().BoolVar(&m.pprof, "pprof", false, "also serve net/http/pprof under /debug/pprof/ on the --metrics-listen address")
}

// check refuses --pprof without a metrics address to serve it on.
func (m *metricsFlags) check() error {
	if m.pprof && m.listen == "" {
		return usageError("--pprof is served on the metrics endpoint: set --metrics-listen too")
	}
	return nil
}

// listenMetrics opens the metrics listener; nil without --metrics-listen.
func (m *metricsFlags) listenMetrics() (net.Listener, error) {
	if m.listen == "" {
		return nil, nil
	}
	lis, err := net.Listen("tcp", m.listen)
	if err != nil {
		return nil, fmt.Errorf("--metrics-listen: %w", err)
	}
	return lis, nil
}

// serveMetrics serves reg on lis in the background until ctx ends; wait
// returns once it stopped. A metrics endpoint that fails is logged: it
// never takes the daemon down. A nil lis serves nothing.
func (m *metricsFlags) serveMetrics(ctx context.Context, log *zap.Logger, lis net.Listener, reg prometheus.Gatherer) (wait func()) {
	if lis == nil {
		return func() {}
	}
	log.Info("metrics serving", zap.String("url", "http://"+lis.Addr().String()+metrics.Path), zap.Bool("pprof", m.pprof))
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := metrics.Serve(ctx, lis, metrics.ServerConfig{Gatherer: reg, Pprof: m.pprof, Logger: log.Named("metrics")}); err != nil {
			log.Error("metrics endpoint failed", zap.Error(err))
		}
	}()
	return func() { <-done }
}

// engineFlags tune the leader's loop; shared by dev and scheduler.
func engineFlags(cmd *cobra.Command, cfg *engine.Config) {
	cmd.Flags().DurationVar(&cfg.NodeLostAfter, "node-lost-after", 30*time.Second, "mark a node LOST after its agent is gone this long")
	cmd.Flags().DurationVar(&cfg.KillGrace, "kill-grace", 10*time.Second, "SIGTERM-to-SIGKILL grace when a job is cancelled or times out")
	cmd.Flags().DurationVar(&cfg.AgingStep, "aging-step", 5*time.Minute, "every this long a job waits adds 1 to its priority, so nothing starves")
}

// agentFlags tune the node agent; shared by dev and agent.
func agentFlags(cmd *cobra.Command, cfg *nodeagent.Config) {
	f := cmd.Flags()
	f.DurationVar(&cfg.TelemetryInterval, "telemetry-interval", time.Second, "how often GPUs are sampled and exclusivity is checked")
	f.StringVar(&cfg.ForeignProcessPolicy, "foreign-process-policy", nodeagent.ForeignKill, "what to do with a GPU process outside the lease: kill or report")
	f.DurationVar(&cfg.ForeignKillGrace, "foreign-kill-grace", 5*time.Second, "SIGTERM-to-SIGKILL grace for a foreign GPU process")
	f.StringVar(&cfg.CleanupHook, "cleanup-hook", "", "shell command run after each lease's cleanup (non-zero exit: node UNHEALTHY)")
	f.DurationVar(&cfg.CleanupTimeout, "cleanup-timeout", 60*time.Second, "bound on the cleanup after a lease")
	f.DurationVar(&cfg.HealthRecheckInterval, "health-recheck-interval", 30*time.Second, "how often an unhealthy node is checked again")
	f.Uint32Var(&cfg.MaxGPUTempC, "max-gpu-temp", 90, "hottest GPU temperature (C) a healthy node may have")
}

func newDevCmd() *cobra.Command {
	var (
		cfg  devcluster.Config
		logs logFlags
		mf   metricsFlags
	)
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a whole cluster in one process: embedded etcd, scheduler, simulated GPU nodes",
		Long: `Run a development cluster in one process: an embedded etcd, one scheduler
and --nodes node agents on simulated DGX machines (go-nvml's mock servers).
Commands you submit run for real on this machine. Prints the endpoint and an
export line for GPUSCHED_SERVER. The REST/JSON gateway serves on
--http-listen (default 127.0.0.1:8080, or a free port when that is taken;
--http-listen '' turns it off), with the OpenAPI document at /openapi.json.
--metrics-listen serves the scheduler's Prometheus /metrics (every
simulated GPU under dcgm-exporter's names); --pprof adds net/http/pprof there.
Stop with Ctrl-C: every command the agents started is stopped too.`,
		Example: `  gpusched dev
  gpusched dev --nodes 8 --gpu-model a100 --listen 127.0.0.1:7070
  gpusched dev --http-listen 127.0.0.1:8080   # then: curl http://127.0.0.1:8080/v1/jobs
  gpusched dev --data-dir ~/.gpusched-dev   # keep jobs and nodes across restarts
  gpusched dev --metrics-listen 127.0.0.1:9400 --pprof   # then: curl http://127.0.0.1:9400/metrics`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logs.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck // best effort on exit
			if err := mf.check(); err != nil {
				return err
			}
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			cfg.Logger = log
			cfg.MetricsListen, cfg.Pprof = mf.listen, mf.pprof
			// The default port is a convenience: fall back when it is taken.
			// An address given explicitly must be free.
			cfg.HTTPListenFallback = !cmd.Flags().Changed("http-listen")
			c, err := devcluster.Start(ctx, cfg)
			if errors.Is(err, devcluster.ErrConfig) || errors.Is(err, nodeagent.ErrConfig) || errors.Is(err, gpu.ErrNVMLUnavailable) {
				return &codedError{code: exitUsage, err: err}
			}
			if err != nil {
				return err
			}
			defer c.Close()
			out := cmd.OutOrStdout()
			what := "simulated " + strings.ToUpper(orDefault(cfg.GPUModel, "h100"))
			if cfg.GPUBackend != "" {
				what = cfg.GPUBackend
			}
			fmt.Fprintf(out, "gpusched dev cluster: %d %s nodes, data in %s\n", nodesOrDefault(cfg.Nodes), what, c.DataDir)
			fmt.Fprintf(out, "scheduler listening on %s\n", c.Endpoint)
			if h := c.HTTPAddr(); h != "" {
				fmt.Fprintf(out, "REST/JSON on http://%s (OpenAPI: http://%s%s)\n", h, h, gateway.OpenAPIPath)
			}
			if m := c.MetricsAddr(); m != "" {
				fmt.Fprintf(out, "metrics on http://%s%s\n", m, metrics.Path)
			}
			fmt.Fprintf(out, "\nexport GPUSCHED_SERVER=%s\n\n", c.Endpoint)
			if cfg.DataDir != "" {
				// Scripts (and tests) find the endpoints without parsing stdout.
				_ = os.WriteFile(filepath.Join(cfg.DataDir, "endpoint"), []byte(c.Endpoint+"\n"), 0o644)
				if h := c.HTTPAddr(); h != "" {
					_ = os.WriteFile(filepath.Join(cfg.DataDir, "http-endpoint"), []byte(h+"\n"), 0o644)
				}
			}
			select {
			case <-ctx.Done():
				fmt.Fprintln(cmd.ErrOrStderr(), "shutting down")
				return nil
			case err := <-c.Err():
				return err
			}
		},
	}
	f := cmd.Flags()
	f.IntVar(&cfg.Nodes, "nodes", 4, "number of simulated GPU nodes")
	f.StringVar(&cfg.GPUModel, "gpu-model", "h100", "GPU model of the simulated nodes: a100, h100, h200 or b200")
	f.StringVar(&cfg.Listen, "listen", "127.0.0.1:0", "scheduler gRPC address (port 0: pick a free port)")
	f.StringVar(&cfg.HTTPListen, "http-listen", devHTTPListen, "REST/JSON gateway address (port 0: pick a free port; empty: no gateway)")
	f.StringVar(&cfg.DataDir, "data-dir", "", "keep etcd data and agent state here across restarts (default: a temp dir, removed on exit)")
	f.StringVar(&cfg.GPUBackend, "gpu-backend", "", "GPU backend instead of --gpu-model: "+strings.Join(gpu.Backends(), ", ")+" (nvml needs --nodes 1)")
	engineFlags(cmd, &cfg.Engine)
	agentFlags(cmd, &cfg.Agent)
	mf.register(cmd, "the scheduler's and every simulated GPU's")
	logs.register(cmd)
	return cmd
}

func nodesOrDefault(n int) int {
	if n == 0 {
		return 4
	}
	return n
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func newSchedulerCmd() *cobra.Command {
	var (
		cfg        scheduler.Config
		endpoints  string
		listen     string
		httpListen string
		logs       logFlags
		mf         metricsFlags
		heap       heapBudgetFlag
	)
	cmd := &cobra.Command{
		Use:   "scheduler",
		Short: "Run a scheduler replica against an etcd cluster",
		Long: `Run one scheduler replica. Replicas elect a leader in etcd; the leader places
jobs and commands the node agents. Every write is fenced by the leader's
election revision. With --http-listen it also serves the REST/JSON gateway
(and its OpenAPI document at /openapi.json), which calls this replica's own
gRPC API over loopback. With --metrics-listen it serves Prometheus /metrics:
the replica's series and, on the leader, every GPU under dcgm-exporter's
names; --pprof adds net/http/pprof there. The gRPC server also answers the
health checking protocol (grpc.health.v1) and server reflection.`,
		Example: `  gpusched scheduler --etcd-endpoints http://10.0.0.1:2379,http://10.0.0.2:2379 --listen 0.0.0.0:7070
  gpusched scheduler --etcd-endpoints http://10.0.0.1:2379 --listen 0.0.0.0:7070 --http-listen 0.0.0.0:8080
  gpusched scheduler --etcd-endpoints http://10.0.0.1:2379 --listen 0.0.0.0:7070 --metrics-listen 0.0.0.0:9400`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logs.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck // best effort on exit
			eps := splitList([]string{endpoints})
			if len(eps) == 0 {
				return usageError("--etcd-endpoints is required")
			}
			if err := mf.check(); err != nil {
				return err
			}
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			stopGC, err := heap.start(ctx, log)
			if err != nil {
				return err
			}
			defer stopGC()
			// The client outlives ctx on purpose: on shutdown the replica still
			// resigns leadership so a successor takes over at once.
			cli, err := clientv3.New(clientv3.Config{Endpoints: eps, DialTimeout: 5 * time.Second, Logger: log.Named("etcd-client")})
			if err != nil {
				return fmt.Errorf("etcd: %w", err)
			}
			defer cli.Close()
			lis, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("listen: %w", err)
			}
			if cfg.Address == "" {
				cfg.Address = lis.Addr().String()
			}
			cfg.Etcd, cfg.Logger = cli, log
			var hlis net.Listener
			if httpListen != "" {
				if hlis, err = net.Listen("tcp", httpListen); err != nil {
					lis.Close()
					return fmt.Errorf("--http-listen: %w", err)
				}
			}
			mlis, err := mf.listenMetrics()
			if err != nil {
				lis.Close()
				if hlis != nil {
					hlis.Close()
				}
				return err
			}
			log.Info("scheduler serving", zap.String("listen", lis.Addr().String()), zap.Strings("etcd", eps))
			s := scheduler.New(cfg)
			mctx, mstop := context.WithCancel(ctx)
			waitMetrics := mf.serveMetrics(mctx, log, mlis, s.Metrics())
			defer waitMetrics()
			defer mstop()
			return serveScheduler(ctx, log, s, lis, hlis)
		},
	}
	f := cmd.Flags()
	f.StringVar(&endpoints, "etcd-endpoints", "", "etcd client URLs, comma-separated (required)")
	f.StringVar(&listen, "listen", "127.0.0.1:7070", "gRPC listen address")
	f.StringVar(&httpListen, "http-listen", "", "REST/JSON gateway listen address, e.g. 0.0.0.0:8080 (default: no gateway)")
	f.StringVar(&cfg.Name, "name", "", "replica name in the election (default: the advertised address)")
	f.StringVar(&cfg.Address, "advertise-addr", "", "address clients and other replicas use to reach this one (default: the listen address)")
	f.StringVar(&cfg.Prefix, "prefix", "/gpusched", "etcd key prefix")
	f.DurationVar(&cfg.SessionTTL, "session-ttl", 5*time.Second, "leader session TTL: how fast a dead leader is replaced")
	f.IntVar(&cfg.TelemetryHistory, "telemetry-history", telemetry.DefaultHistory, "telemetry batches kept per node (one per agent sampling round; ~1.8 KB each for 8 GPUs)")
	engineFlags(cmd, &cfg.Engine)
	mf.register(cmd, "the replica's and, on the leader, every GPU's")
	logs.register(cmd)
	heap.register(cmd)
	return cmd
}

// serveScheduler runs the replica on lis and, when hlis is not nil, the
// REST/JSON gateway on hlis, dialling the replica over loopback. Both stop
// when ctx ends or either fails.
func serveScheduler(ctx context.Context, log *zap.Logger, s *scheduler.Scheduler, lis, hlis net.Listener) error {
	if hlis == nil {
		return s.Serve(ctx, lis)
	}
	gw, err := gateway.New(gateway.Config{GRPCAddr: lis.Addr().String(), Logger: log.Named("gateway")})
	if err != nil {
		lis.Close()
		hlis.Close()
		return err
	}
	defer gw.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	gwErr := make(chan error, 1)
	go func() {
		err := gw.Serve(ctx, hlis)
		cancel() // a gateway that fails takes the replica down with it
		gwErr <- err
	}()
	log.Info("REST/JSON gateway serving", zap.String("url", "http://"+hlis.Addr().String()),
		zap.String("openapi", "http://"+hlis.Addr().String()+gateway.OpenAPIPath))
	err = s.Serve(ctx, lis)
	cancel()
	return errors.Join(err, <-gwErr)
}

func newAgentCmd() *cobra.Command {
	var (
		cfg     nodeagent.Config
		servers string
		backend string
		labels  []string
		logs    logFlags
		mf      metricsFlags
	)
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the node agent on a GPU machine",
		Long: `Run the node agent: read the GPUs through NVML, register with the scheduler
and run leased jobs. It talks only gRPC to the scheduler and keeps its state
and job logs under --data-dir. With --metrics-listen it serves its own
node's GPUs on Prometheus /metrics under dcgm-exporter's names (what the
scheduler's /metrics also exports for every node); --pprof adds
net/http/pprof there.`,
		Example: `  gpusched agent --scheduler 10.0.0.5:7070 --node-id gpu-017 --gpu-backend nvml --data-dir /var/lib/gpusched
  gpusched agent --scheduler 127.0.0.1:7070 --node-id sim-1 --gpu-backend mock-dgxh100 --data-dir /tmp/sim-1`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := logs.logger()
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck // best effort on exit
			cfg.Servers = splitList([]string{servers})
			if len(cfg.Servers) == 0 {
				return usageError("--scheduler is required")
			}
			if cfg.NodeID == "" {
				return usageError("--node-id is required")
			}
			if cfg.DataDir == "" {
				return usageError("--data-dir is required")
			}
			if err := mf.check(); err != nil {
				return err
			}
			cfg.Labels = map[string]string{}
			for _, kv := range splitList(labels) {
				k, v, ok := strings.Cut(kv, "=")
				if !ok || k == "" {
					return usageError("--labels wants k=v[,k=v...], got %q", kv)
				}
				cfg.Labels[k] = v
			}
			var b *gpu.Backend
			if strings.HasPrefix(backend, "mock-") {
				b, err = gpu.OpenMock(backend, gpu.MockOptions{NodeName: cfg.NodeID})
			} else {
				b, err = gpu.Open(backend)
			}
			if err != nil {
				return &codedError{code: exitUsage, err: err}
			}
			defer b.Close()
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			cfg.NVML, cfg.Mock, cfg.Logger = b.NVML, b.Mock, log
			a, err := nodeagent.New(cfg)
			if errors.Is(err, nodeagent.ErrConfig) {
				return &codedError{code: exitUsage, err: err}
			}
			if err != nil {
				return err
			}
			mlis, err := mf.listenMetrics()
			if err != nil {
				return err
			}
			inv := a.Inventory()
			log.Info("agent starting", zap.String("node", cfg.NodeID), zap.String("gpu_backend", backend),
				zap.String("gpu_model", inv.GPUModel), zap.Int("gpus", inv.GPUCount), zap.Strings("scheduler", cfg.Servers))
			mctx, mstop := context.WithCancel(ctx)
			waitMetrics := mf.serveMetrics(mctx, log, mlis, metrics.NewAgentRegistry(a, 0))
			defer waitMetrics()
			defer mstop()
			return a.Run(ctx)
		},
	}
	f := cmd.Flags()
	f.StringVar(&servers, "scheduler", "", "scheduler endpoint(s), host:port[,host:port...] (required)")
	f.StringVar(&cfg.NodeID, "node-id", "", "this node's unique name (required)")
	f.StringVar(&backend, "gpu-backend", gpu.BackendNVML, "GPU backend: "+strings.Join(gpu.Backends(), ", "))
	f.StringVar(&cfg.DataDir, "data-dir", "", "state and job logs live here (required)")
	f.StringSliceVar(&labels, "labels", nil, "node labels k=v[,k=v...] (rack, switch, zone, pool)")
	f.StringVar(&cfg.Address, "address", "", "address peers use to reach this node (default: hostname)")
	agentFlags(cmd, &cfg)
	mf.register(cmd, "this node's GPUs")
	logs.register(cmd)
	return cmd
}
