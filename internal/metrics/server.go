// Package metrics exports gpusched's Prometheus metrics: GPU series under
// dcgm-exporter's names and labels (read from the latest telemetry at
// scrape time), the scheduler's own series, and a small HTTP server for
// /metrics (and, when asked, net/http/pprof) shared by the scheduler, the
// dev cluster and the node agent.
//
// Every registry is private to the server that owns it: nothing here
// touches Prometheus' global default registry or http.DefaultServeMux.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// Paths the metrics server answers.
const (
	// Path serves the Prometheus text exposition.
	Path = "/metrics"
	// PprofPath prefixes the net/http/pprof handlers (ServerConfig.Pprof).
	PprofPath = "/debug/pprof/"
)

// Server defaults.
const (
	DefaultReadHeaderTimeout = 10 * time.Second
	DefaultShutdownTimeout   = 5 * time.Second
)

// ServerConfig configures a metrics HTTP server.
type ServerConfig struct {
	// Gatherer is what /metrics serves. Required.
	Gatherer prometheus.Gatherer
	// Pprof mounts net/http/pprof's handlers under /debug/pprof/.
	Pprof bool
	// Logger logs scrape errors and the server's failures. Default: none.
	Logger *zap.Logger
	// ReadHeaderTimeout bounds reading a request's headers. Default 10s.
	ReadHeaderTimeout time.Duration
	// ShutdownTimeout bounds the graceful shutdown once the context ends;
	// connections still open then are closed. Default 5s.
	ShutdownTimeout time.Duration
}

// NewRegistry returns a private registry holding the Go runtime and
// process collectors, which every gpusched metrics endpoint serves.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// Handler returns the server's routes: /metrics, and the pprof handlers
// under /debug/pprof/ when cfg.Pprof. They are registered on a mux of its
// own, never on http.DefaultServeMux.
func Handler(cfg ServerConfig) http.Handler {
	log := cfg.Logger
	if log == nil {
		log = zap.NewNop()
	}
	mux := http.NewServeMux()
	mux.Handle(Path, promhttp.HandlerFor(cfg.Gatherer, promhttp.HandlerOpts{
		ErrorLog:      zapErrorLog{log},
		ErrorHandling: promhttp.ContinueOnError,
	}))
	if cfg.Pprof {
		mux.HandleFunc(PprofPath, pprof.Index)
		mux.HandleFunc(PprofPath+"cmdline", pprof.Cmdline)
		mux.HandleFunc(PprofPath+"profile", pprof.Profile)
		mux.HandleFunc(PprofPath+"symbol", pprof.Symbol)
		mux.HandleFunc(PprofPath+"trace", pprof.Trace)
	}
	return mux
}

// zapErrorLog adapts a zap logger to promhttp's error log.
type zapErrorLog struct{ log *zap.Logger }

func (l zapErrorLog) Println(v ...any) {
	l.log.Warn("metrics scrape", zap.String("error", fmt.Sprint(v...)))
}

// Serve serves Handler(cfg) on lis until ctx ends, then shuts down
// gracefully within cfg.ShutdownTimeout. It closes lis. It returns nil
// when ctx ended, else the server's error.
func Serve(ctx context.Context, lis net.Listener, cfg ServerConfig) error {
	if cfg.Gatherer == nil {
		lis.Close()
		return errors.New("metrics: no gatherer")
	}
	if cfg.ReadHeaderTimeout <= 0 {
		cfg.ReadHeaderTimeout = DefaultReadHeaderTimeout
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = DefaultShutdownTimeout
	}
	srv := &http.Server{Handler: Handler(cfg), ReadHeaderTimeout: cfg.ReadHeaderTimeout}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(lis) }()
	select {
	case err := <-serveErr:
		return fmt.Errorf("metrics: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close() // a profile or a slow scrape still running: cut it
	}
	if err := <-serveErr; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}
