// Package localcluster runs the production shape of gpusched on one machine,
// on loopback: etcd members (`gpusched etcd`), scheduler replicas
// (`gpusched scheduler`) and node agents on simulated GPUs (`gpusched agent`),
// each a real OS process of a given gpusched binary. It backs
// scripts/cluster.sh, the failover benchmark and tests that kill, pause and
// restart single processes.
//
// Every process runs in its own process group, with its output in
// <Dir>/logs/<name>.log. The processes do not depend on the process that
// started them: they keep running if it exits, and [Attach] finds them again
// through <Dir>/cluster.json.
//
// Processes are named etcd-1..N, scheduler-1..N and agent-1..N; agent i runs
// node node-i.
package localcluster

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
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Errors returned by this package.
var (
	// ErrConfig: the configuration is unusable.
	ErrConfig = errors.New("localcluster: invalid config")
	// ErrRunning: Dir already holds a cluster with running processes.
	ErrRunning = errors.New("localcluster: a cluster is already running in this directory")
	// ErrNoCluster: Dir holds no cluster state (cluster.json).
	ErrNoCluster = errors.New("localcluster: no cluster in this directory")
	// ErrNoLeader: no scheduler replica holds the election.
	ErrNoLeader = errors.New("localcluster: no leader elected")
	// ErrExited: a process exited while it was expected to run.
	ErrExited = errors.New("localcluster: process exited")
)

// Process kinds, as in [ProcessState.Kind].
const (
	KindEtcd      = "etcd"
	KindScheduler = "scheduler"
	KindAgent     = "agent"
)

// Defaults of [Config].
const (
	DefaultEtcd         = 3
	DefaultSchedulers   = 3
	DefaultAgents       = 4
	DefaultGPUBackend   = "mock-dgxh100"
	DefaultPrefix       = "/gpusched"
	DefaultStartTimeout = 60 * time.Second
)

// StateFile is the name of the state file in [Config.Dir].
const StateFile = "cluster.json"

// stopGrace is how long Stop waits after SIGTERM before it sends SIGKILL.
const stopGrace = 10 * time.Second

// Config describes a local cluster.
type Config struct {
	// Binary is the path of the gpusched binary every process runs. Required.
	Binary string
	// Dir holds everything: etcd/<member> data, agents/<node> data,
	// logs/<process>.log and cluster.json. Required. Start removes what an
	// earlier, stopped cluster left in these places.
	Dir string
	// Etcd is the number of etcd members. Default 3.
	Etcd int
	// Schedulers is the number of scheduler replicas. Default 3; negative
	// means none.
	Schedulers int
	// Agents is the number of node agents. Default 4; negative means none.
	Agents int
	// GPUBackend of every agent. Default "mock-dgxh100".
	GPUBackend string
	// SessionTTL, NodeLostAfter and KillGrace are passed to the schedulers
	// as --session-ttl, --node-lost-after and --kill-grace when set.
	SessionTTL    time.Duration
	NodeLostAfter time.Duration
	KillGrace     time.Duration
	// Prefix is the schedulers' etcd key prefix (--prefix). Default
	// "/gpusched".
	Prefix string
	// EtcdNoFsync runs etcd with --unsafe-no-fsync: faster, and safe against
	// killed processes, though not against a machine crash.
	EtcdNoFsync bool
	// ExtraSchedulerArgs and ExtraAgentArgs are appended to every scheduler's
	// and agent's command line.
	ExtraSchedulerArgs []string
	ExtraAgentArgs     []string
	// StartTimeout bounds each wait of Start and WaitReady. Default 60s.
	StartTimeout time.Duration
}

// Cluster is a running local cluster. Its methods are safe for concurrent use.
type Cluster struct {
	binary    string
	dir       string
	prefix    string
	timeout   time.Duration
	etcdEps   []string
	schedAddr []string
	procs     []*Process // etcd members, then schedulers, then agents

	stateMu sync.Mutex // serialises writes of cluster.json
}

// Start starts a new cluster and returns once every etcd member answers a
// linearizable read and every scheduler replica listens. Agents are started
// last and register with the leader in the background. ctx bounds only the
// start-up: the processes run until Close (or Stop on each), even after the
// calling process exits. If Start fails, it leaves no process behind.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	if err := normalize(&cfg); err != nil {
		return nil, err
	}
	if st, err := ReadState(cfg.Dir); err == nil {
		old, err := fromState(st, cfg.Dir)
		if err != nil {
			return nil, err
		}
		for _, p := range old.procs {
			if p.Running() {
				return nil, fmt.Errorf("%w: %s (pid %d); stop it first", ErrRunning, p.name, p.PID())
			}
		}
	} else if !errors.Is(err, ErrNoCluster) {
		return nil, err
	}
	var err error
	for attempt := 1; ; attempt++ {
		if err := wipe(cfg.Dir); err != nil {
			return nil, err
		}
		var c *Cluster
		c, err = start(ctx, cfg)
		if err == nil {
			return c, nil
		}
		// A port picked as free may have been taken before our process
		// bound it: try again with new ports.
		if attempt == 3 || !errors.Is(err, errPortTaken) || ctx.Err() != nil {
			return nil, err
		}
	}
}

// errPortTaken: a process failed to bind its port.
var errPortTaken = errors.New("port already in use")

func normalize(cfg *Config) error {
	if cfg.Binary == "" {
		return fmt.Errorf("%w: Binary is required", ErrConfig)
	}
	if cfg.Dir == "" {
		return fmt.Errorf("%w: Dir is required", ErrConfig)
	}
	var err error
	if cfg.Binary, err = filepath.Abs(cfg.Binary); err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	if fi, err := os.Stat(cfg.Binary); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%w: Binary %s is not an executable file", ErrConfig, cfg.Binary)
	}
	if cfg.Dir, err = filepath.Abs(cfg.Dir); err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	if cfg.Etcd == 0 {
		cfg.Etcd = DefaultEtcd
	}
	if cfg.Etcd < 0 || cfg.Etcd > 9 {
		return fmt.Errorf("%w: Etcd must be between 1 and 9, got %d", ErrConfig, cfg.Etcd)
	}
	switch {
	case cfg.Schedulers == 0:
		cfg.Schedulers = DefaultSchedulers
	case cfg.Schedulers < 0:
		cfg.Schedulers = 0
	}
	switch {
	case cfg.Agents == 0:
		cfg.Agents = DefaultAgents
	case cfg.Agents < 0:
		cfg.Agents = 0
	}
	if cfg.GPUBackend == "" {
		cfg.GPUBackend = DefaultGPUBackend
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = DefaultStartTimeout
	}
	return nil
}

// wipe removes what an earlier cluster left in dir: only the paths this
// package creates.
func wipe(dir string) error {
	for _, sub := range []string{"etcd", "agents", "logs", StateFile} {
		if err := os.RemoveAll(filepath.Join(dir, sub)); err != nil {
			return fmt.Errorf("localcluster: %w", err)
		}
	}
	for _, sub := range []string{"etcd", "agents", "logs"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			return fmt.Errorf("localcluster: %w", err)
		}
	}
	return nil
}

// start makes one attempt at starting the cluster.
func start(ctx context.Context, cfg Config) (_ *Cluster, err error) {
	ports, err := freePorts(2*cfg.Etcd + cfg.Schedulers)
	if err != nil {
		return nil, err
	}
	c := &Cluster{binary: cfg.Binary, dir: cfg.Dir, prefix: cfg.Prefix, timeout: cfg.StartTimeout}
	defer func() {
		if err != nil {
			if cerr := c.Close(); cerr != nil {
				err = fmt.Errorf("%w (and on cleanup: %v)", err, cerr)
			}
		}
	}()

	// etcd members.
	token := fmt.Sprintf("gpusched-local-%d-%d", os.Getpid(), time.Now().UnixNano())
	var initial []string
	for i := range cfg.Etcd {
		peer := fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1])
		initial = append(initial, fmt.Sprintf("etcd-%d=%s", i+1, peer))
	}
	for i := range cfg.Etcd {
		name := fmt.Sprintf("etcd-%d", i+1)
		client := fmt.Sprintf("http://127.0.0.1:%d", ports[2*i])
		args := []string{"etcd", "--name", name, "--data-dir", filepath.Join(cfg.Dir, "etcd", name),
			"--listen-client-urls", client, "--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1]),
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", token}
		if cfg.EtcdNoFsync {
			args = append(args, "--unsafe-no-fsync")
		}
		c.etcdEps = append(c.etcdEps, client)
		c.add(name, KindEtcd, client, args)
	}
	// Scheduler replicas.
	for i := range cfg.Schedulers {
		addr := fmt.Sprintf("127.0.0.1:%d", ports[2*cfg.Etcd+i])
		c.schedAddr = append(c.schedAddr, addr)
	}
	for i, addr := range c.schedAddr {
		name := fmt.Sprintf("scheduler-%d", i+1)
		args := []string{"scheduler", "--etcd-endpoints", strings.Join(c.etcdEps, ","), "--listen", addr, "--name", name}
		if cfg.Prefix != DefaultPrefix {
			args = append(args, "--prefix", cfg.Prefix)
		}
		for _, d := range []struct {
			flag string
			v    time.Duration
		}{{"--session-ttl", cfg.SessionTTL}, {"--node-lost-after", cfg.NodeLostAfter}, {"--kill-grace", cfg.KillGrace}} {
			if d.v > 0 {
				args = append(args, d.flag, d.v.String())
			}
		}
		args = append(args, cfg.ExtraSchedulerArgs...)
		c.add(name, KindScheduler, addr, args)
	}
	// Agents.
	for i := range cfg.Agents {
		node := fmt.Sprintf("node-%d", i+1)
		args := []string{"agent", "--scheduler", strings.Join(c.schedAddr, ","), "--node-id", node,
			"--gpu-backend", cfg.GPUBackend, "--data-dir", filepath.Join(cfg.Dir, "agents", node), "--address", "127.0.0.1"}
		args = append(args, cfg.ExtraAgentArgs...)
		c.add(fmt.Sprintf("agent-%d", i+1), KindAgent, "", args)
	}

	// Start tier by tier; record the state after each tier so that even a
	// launcher that dies half-way leaves its processes findable.
	for _, kind := range []string{KindEtcd, KindScheduler, KindAgent} {
		tier := c.kind(kind)
		for _, p := range tier {
			if err := p.start(); err != nil {
				return nil, err
			}
		}
		if err := c.saveState(); err != nil {
			return nil, err
		}
		for _, p := range tier {
			if err := p.WaitReady(ctx); err != nil {
				return nil, err
			}
		}
	}
	return c, nil
}

// add registers a process that is not started yet.
func (c *Cluster) add(name, kind, addr string, args []string) *Process {
	p := &Process{
		c: c, name: name, kind: kind, addr: addr, args: args,
		logPath: filepath.Join(c.dir, "logs", name+".log"),
	}
	c.procs = append(c.procs, p)
	return p
}

func (c *Cluster) kind(kind string) []*Process {
	var out []*Process
	for _, p := range c.procs {
		if p.kind == kind {
			out = append(out, p)
		}
	}
	return out
}

// Dir returns the cluster's directory (absolute).
func (c *Cluster) Dir() string { return c.dir }

// Binary returns the absolute path of the gpusched binary the cluster runs.
func (c *Cluster) Binary() string { return c.binary }

// EtcdEndpoints returns the etcd members' client URLs (http://127.0.0.1:port),
// in member order.
func (c *Cluster) EtcdEndpoints() []string { return slices.Clone(c.etcdEps) }

// SchedulerAddrs returns the scheduler replicas' gRPC addresses (host:port),
// in replica order.
func (c *Cluster) SchedulerAddrs() []string { return slices.Clone(c.schedAddr) }

// Servers returns the scheduler addresses comma-joined, the form --server
// and GPUSCHED_SERVER take.
func (c *Cluster) Servers() string { return strings.Join(c.schedAddr, ",") }

// Processes returns every process: etcd members, then schedulers, then agents.
func (c *Cluster) Processes() []*Process { return slices.Clone(c.procs) }

// Process returns the process with the given name ("etcd-1",
// "scheduler-2", "agent-3"), or nil if there is none.
func (c *Cluster) Process(name string) *Process {
	for _, p := range c.procs {
		if p.name == name {
			return p
		}
	}
	return nil
}

// Etcd returns a client of all etcd members; the caller closes it. ctx
// becomes the client's context (clientv3.Config.Context).
func (c *Cluster) Etcd(ctx context.Context) (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{
		Endpoints:   c.EtcdEndpoints(),
		DialTimeout: 5 * time.Second,
		Context:     ctx,
		Logger:      zap.NewNop(),
	})
}

// Leader reads the scheduler election from etcd and returns the leading
// replica's name (e.g. "scheduler-2") and its fencing token (the create
// revision of its election key). A leader that died keeps its key until its
// session TTL runs out, so right after a kill this still names it.
func (c *Cluster) Leader(ctx context.Context) (name string, token int64, err error) {
	cli, err := c.Etcd(ctx)
	if err != nil {
		return "", 0, err
	}
	defer cli.Close()
	resp, err := cli.Get(ctx, c.prefix+"/leader/", clientv3.WithPrefix(),
		clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend), clientv3.WithLimit(1))
	if err != nil {
		return "", 0, fmt.Errorf("localcluster: read the election: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return "", 0, ErrNoLeader
	}
	return string(resp.Kvs[0].Value), resp.Kvs[0].CreateRevision, nil
}

// Close stops every process: agents first, then schedulers, then etcd
// members (the etcd leader last); within a tier all at once. Each gets SIGTERM and, 10s later,
// SIGKILL. Close returns once no process of the cluster runs; the error
// lists processes that needed SIGKILL or exited with an error. It may be
// called more than once.
func (c *Cluster) Close() error {
	var errs []error
	stopAll := func(procs []*Process) {
		errc := make(chan error, len(procs))
		for _, p := range procs {
			go func() { errc <- p.Stop() }()
		}
		for range procs {
			errs = append(errs, <-errc)
		}
	}
	stopAll(c.kind(KindAgent))
	stopAll(c.kind(KindScheduler))
	// etcd's leader hands leadership over when it stops, and waits up to
	// 7s for a follower that is stopping too. Stopped last, it finds no
	// follower left and stops at once.
	followers, leader := c.etcdLeaderLast()
	stopAll(followers)
	stopAll(leader)
	return errors.Join(errs...)
}

// etcdLeaderLast splits the etcd members into followers and the leader,
// as far as it can tell in a moment.
func (c *Cluster) etcdLeaderLast() (followers, leader []*Process) {
	members := c.kind(KindEtcd)
	var running []string
	for _, p := range members {
		if p.Running() {
			running = append(running, p.addr)
		}
	}
	if len(running) < 2 {
		return members, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	cli, err := clientv3.New(clientv3.Config{Endpoints: running, DialTimeout: time.Second, Logger: zap.NewNop()})
	if err != nil {
		return members, nil
	}
	defer cli.Close()
	for _, p := range members {
		if !slices.Contains(running, p.addr) {
			continue
		}
		st, err := cli.Status(ctx, p.addr)
		if err == nil && st.Leader != 0 && st.Leader == st.Header.GetMemberId() {
			for _, q := range members {
				if q != p {
					followers = append(followers, q)
				}
			}
			return followers, []*Process{p}
		}
	}
	return members, nil
}

// freePorts returns n distinct loopback ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	var (
		ports []int
		lis   []net.Listener
	)
	defer func() {
		for _, l := range lis {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("localcluster: find a free port: %w", err)
		}
		lis = append(lis, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// hostPort returns the host:port of an http:// URL or a host:port.
func hostPort(addr string) string {
	if _, rest, ok := strings.Cut(addr, "://"); ok {
		return rest
	}
	return addr
}
