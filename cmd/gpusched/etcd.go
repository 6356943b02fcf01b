package main

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/gpusched/gpusched/internal/embedetcd"
)

// etcdFlags are the flags of `gpusched etcd`, named as etcd names them.
type etcdFlags struct {
	name                     string
	dataDir                  string
	listenClientURLs         string
	advertiseClientURLs      string
	listenPeerURLs           string
	initialAdvertisePeerURLs string
	initialCluster           string
	initialClusterState      string
	initialClusterToken      string
	heartbeatMs              uint
	electionMs               uint
	unsafeNoFsync            bool
	logLevel                 string

	// level of etcd's logger, set by config; raised on shutdown.
	level zap.AtomicLevel
}

func newEtcdCmd() *cobra.Command {
	var f etcdFlags
	cmd := &cobra.Command{
		Use:   "etcd",
		Short: "Run one etcd member (for local clusters and tests)",
		Long: `Run one member of an etcd cluster in this process, with etcd's own server
code. It exists so that a local cluster (scripts/cluster.sh, the chaos tests,
the failover benchmark) can run 3 etcd members as separate processes from the
one gpusched binary. Production runs a real etcd cluster instead.

The flags mean what etcd's flags of the same name mean. A member that already
has data in --data-dir rejoins its cluster and ignores --initial-cluster.
Stop it with SIGINT or SIGTERM.`,
		Example: `  # a 3-member cluster on loopback, one member per shell
  gpusched etcd --name e1 --data-dir /tmp/e1 \
    --listen-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-cluster e1=http://127.0.0.1:2380,e2=http://127.0.0.1:2382,e3=http://127.0.0.1:2384
  gpusched etcd --name e2 --data-dir /tmp/e2 \
    --listen-client-urls http://127.0.0.1:2381 --listen-peer-urls http://127.0.0.1:2382 \
    --initial-cluster e1=http://127.0.0.1:2380,e2=http://127.0.0.1:2382,e3=http://127.0.0.1:2384
  gpusched etcd --name e3 --data-dir /tmp/e3 \
    --listen-client-urls http://127.0.0.1:2383 --listen-peer-urls http://127.0.0.1:2384 \
    --initial-cluster e1=http://127.0.0.1:2380,e2=http://127.0.0.1:2382,e3=http://127.0.0.1:2384`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			ec, err := f.config()
			if err != nil {
				return err
			}
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			e, err := embed.StartEtcd(ec)
			if err != nil {
				return fmt.Errorf("etcd: %w", err)
			}
			defer func() {
				// A member that stops logs a burst of warnings and errors about
				// its closed listeners and lost peers; at the default level
				// they are noise, so only --log-level info or debug shows them.
				if f.level.Level() >= zapcore.WarnLevel {
					f.level.SetLevel(zapcore.FatalLevel)
				}
				e.Close() // graceful: hands leadership over, closes listeners
				fmt.Fprintf(cmd.ErrOrStderr(), "etcd member %s stopped\n", ec.Name)
			}()
			select {
			case <-e.Server.ReadyNotify():
				fmt.Fprintf(cmd.ErrOrStderr(), "etcd member %s ready: clients %s, peers %s\n",
					ec.Name, urlList(ec.AdvertiseClientUrls), urlList(ec.AdvertisePeerUrls))
			case err := <-e.Err():
				return fmt.Errorf("etcd: %w", err)
			case <-e.Server.StopNotify():
				return errors.New("etcd: server stopped before it was ready")
			case <-ctx.Done():
				return nil
			}
			select {
			case <-ctx.Done():
				return nil
			case err := <-e.Err():
				return fmt.Errorf("etcd: %w", err)
			case <-e.Server.StopNotify():
				// Removed from the cluster, or a fatal error inside the server.
				return errors.New("etcd: server stopped (see the log above)")
			}
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.name, "name", "default", "human-readable name of this member")
	fl.StringVar(&f.dataDir, "data-dir", "", "path to the data directory (required)")
	fl.StringVar(&f.listenClientURLs, "listen-client-urls", "http://127.0.0.1:2379", "URLs to listen on for client traffic, comma-separated")
	fl.StringVar(&f.advertiseClientURLs, "advertise-client-urls", "", "client URLs to advertise to the cluster (default: --listen-client-urls)")
	fl.StringVar(&f.listenPeerURLs, "listen-peer-urls", "http://127.0.0.1:2380", "URLs to listen on for peer traffic, comma-separated")
	fl.StringVar(&f.initialAdvertisePeerURLs, "initial-advertise-peer-urls", "", "peer URLs to advertise to the cluster (default: --listen-peer-urls)")
	fl.StringVar(&f.initialCluster, "initial-cluster", "", "initial cluster configuration, name=peerURL,... (default: this member alone)")
	fl.StringVar(&f.initialClusterState, "initial-cluster-state", embed.ClusterStateFlagNew, "initial cluster state: new or existing")
	fl.StringVar(&f.initialClusterToken, "initial-cluster-token", "etcd-cluster", "initial cluster token, unique per cluster")
	fl.UintVar(&f.heartbeatMs, "heartbeat-interval", 100, "time (in milliseconds) of a heartbeat interval")
	fl.UintVar(&f.electionMs, "election-timeout", 1000, "time (in milliseconds) for an election to time out")
	fl.BoolVar(&f.unsafeNoFsync, "unsafe-no-fsync", false, "disable fsync: unsafe, may lose data on a machine crash (tests only)")
	fl.StringVar(&f.logLevel, "log-level", "warn", "etcd's log level: debug, info, warn, error")
	return cmd
}

// config validates the flags and turns them into an embed.Config.
func (f *etcdFlags) config() (*embed.Config, error) {
	if f.dataDir == "" {
		return nil, usageError("--data-dir is required")
	}
	if f.name == "" {
		return nil, usageError("--name must not be empty")
	}
	if s := f.initialClusterState; s != embed.ClusterStateFlagNew && s != embed.ClusterStateFlagExisting {
		return nil, usageError("--initial-cluster-state must be new or existing, got %q", s)
	}
	if f.heartbeatMs == 0 || f.electionMs < 5*f.heartbeatMs {
		return nil, usageError("--election-timeout (%dms) must be at least 5 times --heartbeat-interval (%dms)", f.electionMs, f.heartbeatMs)
	}
	lvl, err := zapcore.ParseLevel(f.logLevel)
	if err != nil {
		return nil, usageError("--log-level: %v", err)
	}
	ec := embed.NewConfig()
	ec.Name, ec.Dir = f.name, f.dataDir
	if ec.ListenClientUrls, err = parseURLs("--listen-client-urls", f.listenClientURLs); err != nil {
		return nil, err
	}
	ec.AdvertiseClientUrls = ec.ListenClientUrls
	if f.advertiseClientURLs != "" {
		if ec.AdvertiseClientUrls, err = parseURLs("--advertise-client-urls", f.advertiseClientURLs); err != nil {
			return nil, err
		}
	}
	if ec.ListenPeerUrls, err = parseURLs("--listen-peer-urls", f.listenPeerURLs); err != nil {
		return nil, err
	}
	ec.AdvertisePeerUrls = ec.ListenPeerUrls
	if f.initialAdvertisePeerURLs != "" {
		if ec.AdvertisePeerUrls, err = parseURLs("--initial-advertise-peer-urls", f.initialAdvertisePeerURLs); err != nil {
			return nil, err
		}
	}
	ec.InitialCluster = f.initialCluster
	if ec.InitialCluster == "" {
		ec.InitialCluster = ec.InitialClusterFromName(ec.Name)
	}
	if err := checkInitialCluster(ec.InitialCluster, ec.Name); err != nil {
		return nil, err
	}
	ec.ClusterState = f.initialClusterState
	ec.InitialClusterToken = f.initialClusterToken
	ec.TickMs, ec.ElectionMs = f.heartbeatMs, f.electionMs
	ec.UnsafeNoFsync = f.unsafeNoFsync
	ec.AutoCompactionMode, ec.AutoCompactionRetention = embedetcd.CompactionMode, embedetcd.CompactionRetention
	// etcd's logs go to stderr through our own zap logger, quiet by default.
	zc := zap.NewProductionConfig()
	zc.Encoding = "console"
	zc.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	zc.DisableStacktrace = true
	zc.Sampling = nil
	f.level = zap.NewAtomicLevelAt(lvl)
	zc.Level = f.level
	zc.OutputPaths, zc.ErrorOutputPaths = []string{"stderr"}, []string{"stderr"}
	lg, err := zc.Build()
	if err != nil {
		return nil, fmt.Errorf("etcd: logger: %w", err)
	}
	ec.LogLevel = lvl.String()
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(lg.Named("etcd").With(zap.String("member", f.name)))
	return ec, nil
}

// parseURLs parses a comma-separated URL list of flag.
func parseURLs(flag, list string) ([]url.URL, error) {
	var urls []url.URL
	for _, s := range splitList([]string{list}) {
		u, err := url.Parse(s)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https" && u.Scheme != "unix" && u.Scheme != "unixs") || u.Host == "" {
			return nil, usageError("%s: %q is not a URL like http://127.0.0.1:2379", flag, s)
		}
		urls = append(urls, *u)
	}
	if len(urls) == 0 {
		return nil, usageError("%s must not be empty", flag)
	}
	return urls, nil
}

// checkInitialCluster checks the name=URL,... syntax and that name is in it,
// so a typo fails with one line rather than deep inside etcd.
func checkInitialCluster(ic, name string) error {
	found := false
	for _, kv := range splitList([]string{ic}) {
		n, u, ok := strings.Cut(kv, "=")
		if !ok || n == "" || u == "" {
			return usageError("--initial-cluster wants name=URL[,name=URL...], got %q", kv)
		}
		if _, err := parseURLs("--initial-cluster", u); err != nil {
			return err
		}
		found = found || n == name
	}
	if !found {
		return usageError("--initial-cluster %q does not name this member (--name %q)", ic, name)
	}
	return nil
}

func urlList(us []url.URL) string {
	s := make([]string, len(us))
	for i, u := range us {
		s[i] = u.String()
	}
	return strings.Join(s, ",")
}
