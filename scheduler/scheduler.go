package scheduler

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/gpusched/gpusched/internal/metrics"
	"github.com/gpusched/gpusched/scheduler/api"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
	"github.com/gpusched/gpusched/scheduler/telemetry"
)

// Config configures a scheduler replica.
type Config struct {
	// Etcd is the client for the state store; the caller owns it.
	Etcd *clientv3.Client
	// Prefix is the etcd key prefix for all records. Default "/gpusched".
	Prefix string
	// Name identifies this replica in the election. Default: Address.
	Name string
	// Address is where clients and other replicas reach this replica's
	// gRPC API (followers forward leader-only calls there). Default: the
	// listener's address.
	Address string
	// SessionTTL is the etcd lease TTL behind leadership: how long a dead
	// leader holds on before another replica takes over. Default 5s.
	SessionTTL time.Duration
	Logger     *zap.Logger
	// Engine tunes each leadership term; Store, Fence and Logger are set
	// by the scheduler, and Metrics defaults to the replica's (Metrics).
	Engine engine.Config
	// TelemetryHistory is how many telemetry batches (sampling rounds) the
	// leader keeps per node for GetTelemetry and stream snapshots; default
	// telemetry.DefaultHistory (5 minutes at 1 Hz). A batch of 8 GPUs
	// takes about 1.8 KB of memory, so at 10,000 nodes the default needs
	// about 5 GiB: large clusters want a shorter history.
	TelemetryHistory int
	// MetricsStaleAfter: GPUs whose newest sample is older are left out of
	// the replica's metrics. Default metrics.DefaultStaleAfter.
	MetricsStaleAfter time.Duration
	// RPCObserver also sees every RPC, after the replica's own metrics
	// (a benchmark's exact timings, say). Nil: none.
	RPCObserver api.RPCObserver
}

// Scheduler is one replica: it serves the API and leads when elected.
type Scheduler struct {
	cfg     Config
	log     *zap.Logger
	store   *store.Store
	current atomic.Pointer[engine.Engine]
	// elected is set while this replica holds the election (its term
	// runs, loading or leading).
	elected atomic.Bool
	// leaderSeen is who leads, kept by followLeader from an etcd watch;
	// nil while it has no view.
	leaderSeen atomic.Pointer[leaderView]
	peers      peerConns
	started    time.Time
	// telemetry outlives terms: a watcher keeps its stream when leaders
	// change on another replica (it is forwarded), and history is per leader.
	telemetry *telemetry.Hub
	metrics   *metrics.Scheduler
}

// New returns a replica; call Serve to run it.
func New(cfg Config) *Scheduler {
	if cfg.Prefix == "" {
		cfg.Prefix = "/gpusched"
	}
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	s := &Scheduler{cfg: cfg, log: cfg.Logger, store: store.New(cfg.Etcd, cfg.Prefix), started: time.Now(),
		telemetry: telemetry.New(telemetry.Options{History: cfg.TelemetryHistory})}
	s.metrics = metrics.NewScheduler(metrics.SchedulerConfig{Leader: s.Leader, Telemetry: s.telemetry, StaleAfter: cfg.MetricsStaleAfter})
	return s
}

// Metrics is the replica's private Prometheus registry: the GPU series
// (dcgm-exporter's names, from the telemetry hub), the scheduler's series
// and the Go and process collectors. Serve it with metrics.Serve.
func (s *Scheduler) Metrics() *prometheus.Registry { return s.metrics.Registry() }

// Name is the replica's name in the election.
func (s *Scheduler) Name() string { return s.cfg.Name }

// Leader returns the engine of the current term, if this replica leads and
// has finished loading its state.
func (s *Scheduler) Leader() (*engine.Engine, error) {
	if e := s.current.Load(); e != nil {
		return e, nil
	}
	if s.elected.Load() {
		return nil, fmt.Errorf("%s leads but is still loading its state: %w", s.cfg.Name, model.ErrNotLeader)
	}
	return nil, fmt.Errorf("%s: %w", s.cfg.Name, model.ErrNotLeader)
}

// Serve serves the gRPC API on lis and campaigns for leadership until ctx
// ends; then it stops gracefully (in-flight RPCs finish, streams are cut).
func (s *Scheduler) Serve(ctx context.Context, lis net.Listener) error {
	if s.cfg.Address == "" {
		s.cfg.Address = lis.Addr().String()
	}
	if s.cfg.Name == "" {
		s.cfg.Name = s.cfg.Address
	}
	defer s.peers.close()
	srv := grpc.NewServer(api.ServerOptions(s.log, s.metrics, s.cfg.RPCObserver)...)
	api.Register(srv, api.Backend{Leader: s.Leader, LeaderConn: s.leaderConn, LeaderAddr: s.agentLeaderAddr, Status: s.Status, Telemetry: s.telemetry, Store: s.store})
	hs := registerHealthAndReflection(srv)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	followDone := make(chan struct{})
	go func() {
		defer close(followDone)
		s.followLeader(ctx)
	}()
	defer func() { cancel(); <-followDone }()
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(lis) }()
	campaignDone := make(chan struct{})
	go func() {
		defer close(campaignDone)
		s.campaign(ctx)
	}()
	var err error
	select {
	case <-ctx.Done():
	case err = <-serveErr:
		cancel()
	}
	<-campaignDone // the engine is stopped: agent streams are closed
	hs.Shutdown()  // health checks answer NOT_SERVING while in-flight RPCs finish
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		srv.Stop()
	}
	return err
}

// campaign runs terms of leadership until ctx ends.
func (s *Scheduler) campaign(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := s.term(ctx)
		if ctx.Err() != nil {
			return
		}
		s.log.Warn("leadership term ended", zap.Error(err), zap.Duration("retry_in", backoff))
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// term wins an election, runs one engine, and steps down.
func (s *Scheduler) term(ctx context.Context) error {
	ttl := max(1, int(s.cfg.SessionTTL/time.Second))
	sess, err := concurrency.NewSession(s.cfg.Etcd, concurrency.WithTTL(ttl), concurrency.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("scheduler: etcd session: %w", err)
	}
	defer func() {
		// sess.Close revokes with the session's context, which is already
		// done on shutdown: revoke here so our election key and replica
		// record vanish at once instead of after the TTL.
		rctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, _ = s.cfg.Etcd.Revoke(rctx, sess.Lease())
		_ = sess.Close()
	}()
	if err := s.register(ctx, sess); err != nil {
		return err
	}
	el := concurrency.NewElection(sess, s.leaderPrefix())
	if err := el.Campaign(ctx, s.cfg.Name); err != nil {
		return fmt.Errorf("scheduler: campaign: %w", err)
	}
	s.elected.Store(true)
	defer s.elected.Store(false) // after Resign below
	termCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-sess.Done(): // session expired: stop all work at once
			cancel()
		case <-termCtx.Done():
		}
	}()
	ecfg := s.cfg.Engine
	ecfg.Store, ecfg.Logger = s.store, s.log
	ecfg.Telemetry, ecfg.LeaseUsage = s.telemetry.Publish, s.telemetry.TakeLeaseUsage
	ecfg.Fence = store.Fence{Key: el.Key(), Revision: el.Rev()}
	if ecfg.Metrics == nil {
		ecfg.Metrics = s.metrics
	}
	eng := engine.New(ecfg)
	s.log.Info("elected leader", zap.String("replica", s.cfg.Name), zap.Int64("token", el.Rev()))
	published := make(chan struct{})
	go func() {
		defer close(published)
		select {
		case <-eng.Loaded():
			s.current.Store(eng)
		case <-termCtx.Done():
		}
	}()
	runErr := eng.Run(termCtx)
	// Unpublish only after the publisher is done, or a term that ends right
	// after loading could leave its stopped engine published.
	cancel()
	<-published
	s.current.CompareAndSwap(eng, nil)
	// Step down at once so another replica need not wait out the TTL.
	rctx, rcancel := context.WithTimeout(context.Background(), time.Second)
	defer rcancel()
	if err := el.Resign(rctx); err != nil {
		s.log.Debug("resign", zap.Error(err))
	}
	switch {
	case runErr != nil:
		return runErr
	case ctx.Err() != nil:
		return nil
	default:
		return fmt.Errorf("scheduler: etcd session expired: %w", model.ErrStopped)
	}
}

// registerHealthAndReflection adds the gRPC health checking protocol
// (grpc.health.v1: SERVING overall and for every service registered so
// far) and server reflection (what grpcurl uses) to srv. Any replica
// serves every service, leader or not (followers forward), so the status
// is SERVING for as long as the replica serves; the caller sets it to
// NOT_SERVING with Shutdown before stopping.
func registerHealthAndReflection(srv *grpc.Server) *health.Server {
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	reflection.Register(srv)
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	for name := range srv.GetServiceInfo() {
		hs.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	return hs
}
