// Package devcluster runs a whole gpusched cluster in one process: an
// embedded etcd, one scheduler replica and N node agents on simulated DGX
// nodes (go-nvml's mock servers). It backs `gpusched dev` and the tests that
// want the real stack without separate processes.
package devcluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/gpusched/gpusched/internal/embedetcd"
	"github.com/gpusched/gpusched/internal/gpumodel"
	"github.com/gpusched/gpusched/internal/metrics"
	"github.com/gpusched/gpusched/nodeagent"
	"github.com/gpusched/gpusched/nodeagent/gpu"
	"github.com/gpusched/gpusched/scheduler"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/gateway"
)

// ErrConfig: the cluster's configuration is unusable.
var ErrConfig = errors.New("devcluster: invalid config")

// Simulated node models `gpusched dev --gpu-model` accepts.
var devModels = map[string]string{
	"A100": gpu.BackendMockDGXA100,
	"H100": gpu.BackendMockDGXH100,
	"H200": gpu.BackendMockDGXH200,
	"B200": gpu.BackendMockDGXB200,
}

// Config configures a dev cluster.
type Config struct {
	// Nodes is how many simulated GPU nodes to run. Default 4.
	Nodes int
	// GPUModel of every node: a100, h100, h200 or b200. Default h100.
	GPUModel string
	// GPUBackend overrides GPUModel: "nvml" runs one node on this
	// machine's real GPUs (Nodes must be 1), "mock-dgxh100" etc. a model.
	GPUBackend string
	// Agent tunes every agent (telemetry interval, foreign-process policy,
	// cleanup hook, ...); NodeID, Servers, NVML, Mock, DataDir, Address,
	// Labels and Logger are set per node.
	Agent nodeagent.Config
	// Listen is the scheduler's gRPC address. Default 127.0.0.1:0 (a free port).
	Listen string
	// HTTPListen, when set, serves the REST/JSON gateway (scheduler/gateway)
	// on this address; port 0 picks a free port. Empty: no gateway.
	HTTPListen string
	// HTTPListenFallback: when HTTPListen is taken, serve the gateway on a
	// free port of the same host instead of failing.
	HTTPListenFallback bool
	// MetricsListen, when set, serves the scheduler's Prometheus /metrics
	// (internal/metrics) on this address; port 0 picks a free port.
	// Empty: no metrics endpoint.
	MetricsListen string
	// Pprof mounts net/http/pprof on the metrics endpoint (needs
	// MetricsListen).
	Pprof bool
	// DataDir keeps etcd's data and the agents' state and logs across
	// restarts. Empty means a temporary directory removed on Close.
	DataDir string
	Logger  *zap.Logger
	// Engine tunes the scheduler (kill grace, node-lost timeout, ...).
	Engine engine.Config
}

// Cluster is a running dev cluster.
type Cluster struct {
	// Endpoint is the scheduler's gRPC address (host:port).
	Endpoint string
	DataDir  string

	httpAddr    string
	metricsAddr string
	cancel      context.CancelFunc
	etcd        *embedetcd.Server
	wg          sync.WaitGroup
	errs        chan error
	tempDir     bool
	backends    []*gpu.Backend
}

// Start brings the cluster up and returns once the scheduler listens.
// Agents register in the background within moments.
func Start(ctx context.Context, cfg Config) (_ *Cluster, err error) {
	if cfg.Nodes == 0 {
		cfg.Nodes = 4
	}
	if cfg.Nodes < 0 || cfg.Nodes > 1000 {
		return nil, fmt.Errorf("%w: --nodes must be between 1 and 1000, got %d", ErrConfig, cfg.Nodes)
	}
	if cfg.GPUModel == "" {
		cfg.GPUModel = "h100"
	}
	model, perr := gpumodel.Parse(cfg.GPUModel)
	backend, ok := devModels[model]
	if perr != nil || !ok {
		return nil, fmt.Errorf("%w: --gpu-model must be one of a100, h100, h200, b200; got %q", ErrConfig, cfg.GPUModel)
	}
	if cfg.GPUBackend != "" {
		if !slices.Contains(gpu.Backends(), cfg.GPUBackend) {
			return nil, fmt.Errorf("%w: --gpu-backend must be one of %s; got %q", ErrConfig, strings.Join(gpu.Backends(), ", "), cfg.GPUBackend)
		}
		if cfg.GPUBackend == gpu.BackendNVML && cfg.Nodes != 1 {
			return nil, fmt.Errorf("%w: --gpu-backend nvml runs one node on this machine's GPUs: use --nodes 1", ErrConfig)
		}
		backend = cfg.GPUBackend
	}
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if cfg.Pprof && cfg.MetricsListen == "" {
		return nil, fmt.Errorf("%w: pprof is served on the metrics endpoint: set a metrics address too", ErrConfig)
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	c := &Cluster{DataDir: cfg.DataDir, errs: make(chan error, 3+cfg.Nodes)}
	if c.DataDir == "" {
		if c.DataDir, err = os.MkdirTemp("", "gpusched-dev-"); err != nil {
			return nil, err
		}
		c.tempDir = true
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	c.etcd, err = embedetcd.Start(embedetcd.Config{Dir: filepath.Join(c.DataDir, "etcd"), Logger: cfg.Logger})
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("devcluster: listen on %s: %w", cfg.Listen, err)
	}
	c.Endpoint = lis.Addr().String()
	runCtx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel

	cli, err := c.etcd.Client(runCtx)
	if err != nil {
		lis.Close()
		return nil, fmt.Errorf("devcluster: etcd client: %w", err)
	}
	sched := scheduler.New(scheduler.Config{
		Etcd: cli, Name: c.Endpoint, Logger: cfg.Logger.Named("scheduler"), Engine: cfg.Engine,
	})
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer cli.Close()
		if err := sched.Serve(runCtx, lis); err != nil {
			c.errs <- fmt.Errorf("scheduler: %w", err)
		}
	}()

	if cfg.HTTPListen != "" {
		if err := c.startGateway(runCtx, cfg); err != nil {
			return nil, err
		}
	}
	if cfg.MetricsListen != "" {
		if err := c.startMetrics(runCtx, cfg, sched); err != nil {
			return nil, err
		}
	}

	width := len(fmt.Sprint(cfg.Nodes))
	if width < 2 {
		width = 2
	}
	for i := 1; i <= cfg.Nodes; i++ {
		name := fmt.Sprintf("gpu-%0*d", width, i)
		var b *gpu.Backend
		if backend == gpu.BackendNVML {
			b, err = gpu.Open(backend)
		} else {
			b, err = gpu.OpenMock(backend, gpu.MockOptions{NodeName: name})
		}
		if err != nil {
			return nil, err
		}
		c.backends = append(c.backends, b)
		acfg := cfg.Agent
		acfg.NodeID, acfg.Servers, acfg.NVML, acfg.Mock = name, []string{c.Endpoint}, b.NVML, b.Mock
		acfg.DataDir, acfg.Address = filepath.Join(c.DataDir, "agents", name), "127.0.0.1"
		acfg.Labels, acfg.Logger = map[string]string{"pool": "dev"}, cfg.Logger.Named("agent")
		if acfg.StopGrace == 0 {
			acfg.StopGrace = 2 * time.Second
		}
		a, err := nodeagent.New(acfg)
		if err != nil {
			return nil, err
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			if err := a.Run(runCtx); err != nil {
				c.errs <- fmt.Errorf("agent %s: %w", name, err)
			}
		}()
	}
	return c, nil
}

// startGateway serves the REST/JSON gateway in front of the scheduler: it
// dials the scheduler's gRPC endpoint like any client, so REST calls pass
// the same interceptors.
func (c *Cluster) startGateway(ctx context.Context, cfg Config) error {
	lis, err := net.Listen("tcp", cfg.HTTPListen)
	if err != nil && cfg.HTTPListenFallback && errors.Is(err, syscall.EADDRINUSE) {
		host, _, _ := net.SplitHostPort(cfg.HTTPListen)
		cfg.Logger.Warn("REST/JSON gateway: address in use, taking a free port", zap.String("http_listen", cfg.HTTPListen))
		lis, err = net.Listen("tcp", net.JoinHostPort(host, "0"))
	}
	if err != nil {
		return fmt.Errorf("devcluster: REST/JSON gateway: listen on %s: %w", cfg.HTTPListen, err)
	}
	gw, err := gateway.New(gateway.Config{GRPCAddr: c.Endpoint, Logger: cfg.Logger.Named("gateway")})
	if err != nil {
		lis.Close()
		return err
	}
	c.httpAddr = lis.Addr().String()
	cfg.Logger.Info("REST/JSON gateway serving", zap.String("url", "http://"+c.httpAddr),
		zap.String("openapi", "http://"+c.httpAddr+gateway.OpenAPIPath))
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer gw.Close()
		if err := gw.Serve(ctx, lis); err != nil {
			c.errs <- fmt.Errorf("REST/JSON gateway: %w", err)
		}
	}()
	return nil
}

// startMetrics serves the scheduler's /metrics (and pprof, if asked).
func (c *Cluster) startMetrics(ctx context.Context, cfg Config, sched *scheduler.Scheduler) error {
	lis, err := net.Listen("tcp", cfg.MetricsListen)
	if err != nil {
		return fmt.Errorf("devcluster: metrics: listen on %s: %w", cfg.MetricsListen, err)
	}
	c.metricsAddr = lis.Addr().String()
	cfg.Logger.Info("metrics serving", zap.String("url", "http://"+c.metricsAddr+metrics.Path), zap.Bool("pprof", cfg.Pprof))
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		err := metrics.Serve(ctx, lis, metrics.ServerConfig{Gatherer: sched.Metrics(), Pprof: cfg.Pprof, Logger: cfg.Logger.Named("metrics")})
		if err != nil {
			c.errs <- err
		}
	}()
	return nil
}

// MetricsAddr is the metrics endpoint's address (host:port), or "" when
// Config.MetricsListen was empty.
func (c *Cluster) MetricsAddr() string { return c.metricsAddr }

// HTTPAddr is the REST/JSON gateway's address (host:port), or "" when
// Config.HTTPListen was empty.
func (c *Cluster) HTTPAddr() string { return c.httpAddr }

// Err returns a channel that yields the first component failure.
func (c *Cluster) Err() <-chan error { return c.errs }

// Close stops agents (and every command they run), the REST/JSON gateway,
// the scheduler and etcd, and removes a temporary data dir.
func (c *Cluster) Close() {
	if c.cancel != nil {
		c.cancel()
	}
	c.wg.Wait()
	for _, b := range c.backends {
		_ = b.Close()
	}
	if c.etcd != nil {
		c.etcd.Close()
	}
	if c.tempDir && strings.Contains(c.DataDir, "gpusched-dev-") {
		_ = os.RemoveAll(c.DataDir)
	}
}
