// Package embedetcd starts a single-member etcd server inside the process,
// on loopback ports chosen by the OS. `gpusched dev` and the integration
// tests use it; production runs a real etcd cluster instead.
package embedetcd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// ErrStartTimeout: the server did not become ready in time.
var ErrStartTimeout = errors.New("embedetcd: server did not become ready")

// Config configures the embedded server.
type Config struct {
	// Dir holds etcd's data; it survives restarts. Required.
	Dir string
	// Host to listen on; default 127.0.0.1.
	Host string
	// NoFsync trades durability for speed (tests only).
	NoFsync bool
	Logger  *zap.Logger
	// StartTimeout bounds start-up; default 30s.
	StartTimeout time.Duration
}

// Server is a running embedded etcd.
type Server struct {
	etcd     *embed.Etcd
	Endpoint string
}

// Start starts etcd and waits until it serves.
func Start(cfg Config) (*Server, error) {
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("embedetcd: %w", err)
	}
	// A free port can be taken by another process between our probe and
	// etcd's bind: pick new ports and try again.
	for attempt := 1; ; attempt++ {
		srv, err := start(cfg)
		if err == nil || !addrInUse(err) || attempt == 5 {
			return srv, err
		}
	}
}

// addrInUse recognises a bind failure; etcd does not always wrap the
// syscall error, so its text is checked too.
func addrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")
}

func start(cfg Config) (*Server, error) {
	clientPort, err := freePort(cfg.Host)
	if err != nil {
		return nil, err
	}
	peerPort, err := freePort(cfg.Host)
	if err != nil {
		return nil, err
	}
	ec := embed.NewConfig()
	ec.Name = "gpusched-dev"
	ec.Dir = cfg.Dir
	cu := url.URL{Scheme: "http", Host: net.JoinHostPort(cfg.Host, fmt.Sprint(clientPort))}
	pu := url.URL{Scheme: "http", Host: net.JoinHostPort(cfg.Host, fmt.Sprint(peerPort))}
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	ec.UnsafeNoFsync = cfg.NoFsync
	// Keep an hour of history: job watch cursors stay valid that long, and
	// the database does not grow without bound.
	ec.AutoCompactionMode, ec.AutoCompactionRetention = CompactionMode, CompactionRetention
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(cfg.Logger.Named("etcd"))
	// A restart on the same data dir must keep the data: a member that
	// already has a WAL rejoins rather than bootstrapping anew.
	ec.ClusterState = embed.ClusterStateFlagNew
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("embedetcd: start: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(cfg.StartTimeout):
		e.Close()
		return nil, ErrStartTimeout
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedetcd: %w", err)
	}
	return &Server{etcd: e, Endpoint: cu.String()}, nil
}

// Client returns a new client of the server; the caller closes it.
func (s *Server) Client(ctx context.Context) (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{
		Endpoints:   []string{s.Endpoint},
		DialTimeout: 5 * time.Second,
		Context:     ctx,
		Logger:      zap.NewNop(),
	})
}

// Close stops the server.
func (s *Server) Close() {
	s.etcd.Close()
}

// freePort asks the OS for a free TCP port on host. There is a small window
// between closing and etcd's bind; in dev and tests that is acceptable,
// and a collision fails loudly at start rather than silently.
func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("embedetcd: find free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// History retention of every etcd gpusched runs (embedded, or `gpusched
// etcd`): periodic compaction keeping an hour, so a job watch can resume
// from a cursor up to an hour old.
const (
	CompactionMode      = "periodic"
	CompactionRetention = "1h"
)
