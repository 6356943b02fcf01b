package sim

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	runtimepprof "runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"

	"github.com/gpusched/gpusched/scheduler"
	"github.com/gpusched/gpusched/scheduler/engine"
)

// ReplicaConfig configures one scheduler replica run by the sim, in this
// process or as a child process (`gpusched sim replica`).
type ReplicaConfig struct {
	EtcdEndpoints []string
	Prefix        string
	// Listen is the gRPC address; "127.0.0.1:0" picks a port. A replica
	// started in place of a stopped one reuses its address.
	Listen string
	// DebugListen serves net/http/pprof and /sim/stats (child only).
	DebugListen       string
	Name              string
	SessionTTL        time.Duration
	HeartbeatInterval time.Duration
	NodeLostAfter     time.Duration
	// LoadCPUProfile (child only): profile the process from its start
	// until the engine has loaded its state, into this file.
	LoadCPUProfile string
	// LogLevel of the scheduler's log (stderr of a child, dropped in
	// process); default "warn". At "info" the engine writes a line per
	// grant and per ended job.
	LogLevel string
	// HeapBudget (child only) is its --heap-budget; "" keeps the
	// scheduler's default.
	HeapBudget string
}

// LoadInfo is what the engine logged when it finished rebuilding its
// state from etcd at the start of its term.
type LoadInfo struct {
	Took   Millis `json:"took_ms"`
	Jobs   int64  `json:"jobs"`
	Nodes  int64  `json:"nodes"`
	Leases int64  `json:"leases"`
	Token  int64  `json:"token"`
}

// ReplicaStats is a replica process's resource use and commit timings.
type ReplicaStats struct {
	PID          int     `json:"pid"`
	RSSBytes     uint64  `json:"rss_bytes"`
	PeakRSSBytes uint64  `json:"peak_rss_bytes"`
	GoTotalBytes uint64  `json:"go_total_bytes"`
	HeapBytes    uint64  `json:"heap_object_bytes"`
	Goroutines   uint64  `json:"goroutines"`
	GCCycles     uint64  `json:"gc_cycles"`
	CPUSeconds   float64 `json:"cpu_seconds"`
	// InProcess: the figures are of the whole sim process (agents, etcd
	// and load generator included), not of the scheduler alone.
	InProcess bool        `json:"in_process"`
	Commit    CommitStats `json:"commit"`
	Engine    EngineStats `json:"engine"`
}

// replicaCore is a scheduler replica with its commit tap: the part shared
// by the in-process replica and the child process.
type replicaCore struct {
	cfg    ReplicaConfig
	tap    *commitTap
	rec    *loopRecorder
	cli    *clientv3.Client
	sched  *scheduler.Scheduler
	lis    net.Listener
	loaded chan LoadInfo

	winMu    sync.Mutex
	winStart time.Time
	prof     cpuProfiler
}

// cpuProfiler holds one CPU profile of this process in memory between
// start and stop.
type cpuProfiler struct {
	mu  sync.Mutex
	buf *bytes.Buffer
}

func (p *cpuProfiler) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.buf != nil {
		return errors.New("sim: a CPU profile is already running")
	}
	buf := &bytes.Buffer{}
	if err := runtimepprof.StartCPUProfile(buf); err != nil {
		return err
	}
	p.buf = buf
	return nil
}

func (p *cpuProfiler) stop(w io.Writer) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.buf == nil {
		return errors.New("sim: no CPU profile is running")
	}
	runtimepprof.StopCPUProfile()
	_, err := p.buf.WriteTo(w)
	p.buf = nil
	return err
}

func newReplicaCore(cfg ReplicaConfig, errlog io.Writer) (*replicaCore, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = "/gpusched"
	}
	r := &replicaCore{cfg: cfg, tap: newCommitTap(cfg.Prefix), rec: &loopRecorder{}, loaded: make(chan LoadInfo, 1), winStart: time.Now()}
	log, err := replicaLogger(cfg.LogLevel, errlog, func(li LoadInfo) {
		select {
		case r.loaded <- li:
		default:
		}
	})
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: cfg.EtcdEndpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithChainUnaryInterceptor(r.tap.interceptor())}})
	if err != nil {
		return nil, fmt.Errorf("sim: etcd client: %w", err)
	}
	r.cli = cli
	lis, err := listenRetry(cfg.Listen)
	if err != nil {
		_ = cli.Close()
		return nil, err
	}
	r.lis = lis
	r.sched = scheduler.New(scheduler.Config{
		Etcd: cli, Prefix: cfg.Prefix, Name: cfg.Name, SessionTTL: cfg.SessionTTL, Logger: log,
		// The engine's timings go to the recorder (exact percentiles)
		// instead of the replica's Prometheus histograms: same call sites.
		Engine:      engine.Config{HeartbeatInterval: cfg.HeartbeatInterval, NodeLostAfter: cfg.NodeLostAfter, Metrics: r.rec},
		RPCObserver: r.rec,
	})
	return r, nil
}

// listenRetry listens on addr, retrying for a while when the address is
// still held by a replica that is shutting down.
func listenRetry(addr string) (net.Listener, error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		lis, err := net.Listen("tcp", addr)
		if err == nil || !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			if err != nil {
				return nil, fmt.Errorf("sim: listen %s: %w", addr, err)
			}
			return lis, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (r *replicaCore) serve(ctx context.Context) error {
	defer r.cli.Close()
	return r.sched.Serve(ctx, r.lis)
}

func (r *replicaCore) stats(reset bool) ReplicaStats {
	r.winMu.Lock()
	start := r.winStart
	if reset {
		r.winStart = time.Now()
	}
	r.winMu.Unlock()
	s := processStats(os.Getpid())
	s.Commit = r.tap.stats(start, reset)
	s.Engine = r.rec.stats(time.Since(start), reset)
	return s
}

// processStats reads this process's memory and CPU.
func processStats(pid int) ReplicaStats {
	s := ReplicaStats{PID: pid}
	s.RSSBytes, s.PeakRSSBytes = readRSS(pid)
	samples := []metrics.Sample{
		{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/sched/goroutines:goroutines"}, {Name: "/gc/cycles/total:gc-cycles"},
	}
	metrics.Read(samples)
	s.GoTotalBytes, s.HeapBytes = samples[0].Value.Uint64(), samples[1].Value.Uint64()
	s.Goroutines, s.GCCycles = samples[2].Value.Uint64(), samples[3].Value.Uint64()
	s.CPUSeconds = cpuSeconds(pid)
	return s
}

// readRSS returns VmRSS and VmHWM (peak) of a process, in bytes.
func readRSS(pid int) (rss, peak uint64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) < 1 {
			continue
		}
		n, _ := strconv.ParseUint(f[0], 10, 64)
		switch k {
		case "VmRSS":
			rss = n << 10
		case "VmHWM":
			peak = n << 10
		}
	}
	return rss, peak
}

// cpuSeconds is a process's user+system CPU time, from /proc/<pid>/stat.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces; fields count from its ")".
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 {
		s = s[i+1:]
	}
	f := strings.Fields(s)
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ is 100 on Linux
}

// replicaLogger logs at level (default warn) to w, and calls onLoaded with
// the engine's "leader state loaded" line whatever the level.
func replicaLogger(level string, w io.Writer, onLoaded func(LoadInfo)) (*zap.Logger, error) {
	if level == "" {
		level = "warn"
	}
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("sim: scheduler log level: %w", err)
	}
	if w == nil {
		w = io.Discard
	}
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	base := zapcore.NewCore(enc, zapcore.Lock(zapcore.AddSync(w)), lvl)
	return zap.New(&loadCapture{Core: base, onLoaded: onLoaded}), nil
}

// loadedMessage is what engine.Run logs once the term's state is loaded.
const loadedMessage = "leader state loaded"

// loadCapture passes entries at the core's level through, and always
// captures the engine's load line.
type loadCapture struct {
	zapcore.Core
	onLoaded func(LoadInfo)
}

func (c *loadCapture) Enabled(l zapcore.Level) bool { return l >= zapcore.InfoLevel }

func (c *loadCapture) With(fields []zapcore.Field) zapcore.Core {
	return &loadCapture{Core: c.Core.With(fields), onLoaded: c.onLoaded}
}

func (c *loadCapture) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if e.Message == loadedMessage {
		return ce.AddCore(e, c)
	}
	return c.Core.Check(e, ce)
}

func (c *loadCapture) Write(e zapcore.Entry, fields []zapcore.Field) error {
	if e.Message == loadedMessage {
		var li LoadInfo
		for _, f := range fields {
			switch f.Key {
			case "took":
				li.Took = ms(time.Duration(f.Integer))
			case "jobs":
				li.Jobs = f.Integer
			case "nodes":
				li.Nodes = f.Integer
			case "leases":
				li.Leases = f.Integer
			case "token":
				li.Token = f.Integer
			}
		}
		c.onLoaded(li)
		if !c.Core.Enabled(e.Level) {
			return nil
		}
	}
	return c.Core.Write(e, fields)
}

// childLine is one JSON line a child replica prints on stdout.
type childLine struct {
	Event string `json:"event"` // "serving" or "loaded"
	Addr  string `json:"addr,omitempty"`
	Debug string `json:"debug,omitempty"`
	PID   int    `json:"pid,omitempty"`
	*LoadInfo
}

// ServeReplica is the child side of the process mode: it runs one replica
// until ctx ends, serving pprof and /sim/stats on cfg.DebugListen, and
// prints JSON lines on out ("serving" with its addresses, "loaded" when
// the engine has rebuilt its state). The scheduler's log goes to errlog.
func ServeReplica(ctx context.Context, cfg ReplicaConfig, out, errlog io.Writer) error {
	r, err := newReplicaCore(cfg, errlog)
	if err != nil {
		return err
	}
	var outMu sync.Mutex
	emit := func(l childLine) {
		b, _ := json.Marshal(l)
		outMu.Lock()
		defer outMu.Unlock()
		_, _ = fmt.Fprintf(out, "%s\n", b)
	}
	if cfg.DebugListen == "" {
		cfg.DebugListen = "127.0.0.1:0"
	}
	dlis, err := net.Listen("tcp", cfg.DebugListen)
	if err != nil {
		_ = r.lis.Close()
		_ = r.cli.Close()
		return fmt.Errorf("sim: debug listen: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/sim/cpuprofile/start", func(w http.ResponseWriter, _ *http.Request) {
		if err := r.prof.start(); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
		}
	})
	mux.HandleFunc("/sim/cpuprofile/stop", func(w http.ResponseWriter, _ *http.Request) {
		if err := r.prof.stop(w); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
		}
	})
	mux.HandleFunc("/sim/stats", func(w http.ResponseWriter, req *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(r.stats(req.URL.Query().Get("reset") != ""))
	})
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = hs.Serve(dlis) }()
	defer hs.Close()
	if cfg.LoadCPUProfile != "" {
		if err := r.prof.start(); err != nil {
			return err
		}
	}
	go func() {
		select {
		case li := <-r.loaded:
			if cfg.LoadCPUProfile != "" {
				_ = writeFile(cfg.LoadCPUProfile, r.prof.stop)
			}
			emit(childLine{Event: "loaded", LoadInfo: &li})
		case <-ctx.Done():
		}
	}()
	emit(childLine{Event: "serving", Addr: r.lis.Addr().String(), Debug: dlis.Addr().String(), PID: os.Getpid()})
	return r.serve(ctx)
}

// replica is the sim's handle on one scheduler replica.
type replica interface {
	Addr() string
	PID() int
	InProcess() bool
	// Loaded delivers the engine's load report once.
	Loaded() <-chan LoadInfo
	Stats(reset bool) (ReplicaStats, error)
	// StartCPUProfile starts profiling the replica's process;
	// StopCPUProfile stops and writes the profile to w.
	StartCPUProfile() error
	StopCPUProfile(w io.Writer) error
	HeapProfile(w io.Writer) error
	// Stop shuts the replica down gracefully (it resigns at once).
	Stop() error
}

// inprocReplica runs the replica in this process.
type inprocReplica struct {
	core   *replicaCore
	cancel context.CancelFunc
	done   chan error
}

func startInproc(cfg ReplicaConfig) (*inprocReplica, error) {
	core, err := newReplicaCore(cfg, nil)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &inprocReplica{core: core, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- core.serve(ctx) }()
	return r, nil
}

func (r *inprocReplica) Addr() string            { return r.core.lis.Addr().String() }
func (r *inprocReplica) PID() int                { return os.Getpid() }
func (r *inprocReplica) InProcess() bool         { return true }
func (r *inprocReplica) Loaded() <-chan LoadInfo { return r.core.loaded }
func (r *inprocReplica) Stats(reset bool) (ReplicaStats, error) {
	s := r.core.stats(reset)
	s.InProcess = true
	return s, nil
}

func (r *inprocReplica) StartCPUProfile() error           { return r.core.prof.start() }
func (r *inprocReplica) StopCPUProfile(w io.Writer) error { return r.core.prof.stop(w) }

func (r *inprocReplica) HeapProfile(w io.Writer) error {
	runtime.GC()
	return runtimepprof.Lookup("heap").WriteTo(w, 0)
}

func (r *inprocReplica) Stop() error {
	r.cancel()
	select {
	case err := <-r.done:
		return err
	case <-time.After(30 * time.Second):
		return errors.New("sim: in-process replica did not stop within 30s")
	}
}

// childReplica is a `gpusched sim replica` child process.
type childReplica struct {
	cmd    *exec.Cmd
	addr   string
	debug  string
	loaded chan LoadInfo
	exited chan struct{}
	err    error // after exited
	http   *http.Client
}

// startChild starts exe as `exe sim replica ...` and waits until it serves.
func startChild(exe string, cfg ReplicaConfig, logPath string) (*childReplica, error) {
	args := []string{"sim", "replica",
		"--etcd-endpoints", strings.Join(cfg.EtcdEndpoints, ","),
		"--listen", cfg.Listen, "--prefix", cfg.Prefix, "--name", cfg.Name,
		"--session-ttl", cfg.SessionTTL.String(),
		"--heartbeat-interval", cfg.HeartbeatInterval.String(),
		"--node-lost-after", cfg.NodeLostAfter.String(),
		"--log-level", cfg.LogLevel,
	}
	if cfg.LoadCPUProfile != "" {
		args = append(args, "--load-cpuprofile", cfg.LoadCPUProfile)
	}
	if cfg.HeapBudget != "" {
		args = append(args, "--heap-budget", cfg.HeapBudget)
	}
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, args...)
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("sim: start replica: %w", err)
	}
	c := &childReplica{cmd: cmd, loaded: make(chan LoadInfo, 1), exited: make(chan struct{}),
		http: &http.Client{Timeout: 120 * time.Second}}
	serving := make(chan childLine, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var l childLine
			if json.Unmarshal(sc.Bytes(), &l) != nil {
				continue
			}
			switch l.Event {
			case "serving":
				serving <- l
			case "loaded":
				if l.LoadInfo != nil {
					select {
					case c.loaded <- *l.LoadInfo:
					default:
					}
				}
			}
		}
		c.err = cmd.Wait()
		logf.Close()
		close(c.exited)
	}()
	select {
	case l := <-serving:
		c.addr, c.debug = l.Addr, l.Debug
		return c, nil
	case <-c.exited:
		return nil, fmt.Errorf("sim: replica exited at start (%v); see %s", c.err, logPath)
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-c.exited
		return nil, fmt.Errorf("sim: replica did not start within 60s; see %s", logPath)
	}
}

func (c *childReplica) Addr() string            { return c.addr }
func (c *childReplica) PID() int                { return c.cmd.Process.Pid }
func (c *childReplica) InProcess() bool         { return false }
func (c *childReplica) Loaded() <-chan LoadInfo { return c.loaded }

func (c *childReplica) get(ctx context.Context, path string, w io.Writer) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.debug+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("sim: replica %s: %s: %s", path, resp.Status, b)
	}
	_, err = io.Copy(w, resp.Body)
	return err
}

func (c *childReplica) Stats(reset bool) (ReplicaStats, error) {
	var b strings.Builder
	path := "/sim/stats"
	if reset {
		path += "?reset=1"
	}
	if err := c.get(context.Background(), path, &b); err != nil {
		return ReplicaStats{}, err
	}
	var s ReplicaStats
	err := json.Unmarshal([]byte(b.String()), &s)
	return s, err
}

func (c *childReplica) StartCPUProfile() error {
	return c.get(context.Background(), "/sim/cpuprofile/start", io.Discard)
}

func (c *childReplica) StopCPUProfile(w io.Writer) error {
	return c.get(context.Background(), "/sim/cpuprofile/stop", w)
}

func (c *childReplica) HeapProfile(w io.Writer) error {
	return c.get(context.Background(), "/debug/pprof/heap?gc=1", w)
}

func (c *childReplica) Stop() error {
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(30 * time.Second):
		_ = c.cmd.Process.Kill()
		<-c.exited
		return errors.New("sim: replica did not stop within 30s after SIGTERM; killed")
	}
	var ee *exec.ExitError
	if c.err != nil && !errors.As(c.err, &ee) {
		return c.err
	}
	return nil
}
