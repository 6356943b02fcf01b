// Command bench-failover measures scheduler failover on a local cluster of
// real processes (3 etcd members, 3 scheduler replicas, 2 agents by
// default). Each trial SIGKILLs the leading replica, submits a 1-node job
// `true` through the Go SDK at once (retrying while no replica leads), and
// reads the job's schedule_time:
//
//	failover = schedule_time - t0, with t0 taken just before the SIGKILL
//
// Both times come from the same machine's clock. The killed replica is then
// restarted, and the next trial begins once every node is READY again. The
// result is a Markdown snippet for docs/benchmarks.md.
//
//	go run ./scripts/bench-failover --trials 20 [--binary bin/gpusched] [--session-ttl 2s]
//
// It is a benchmark, not a test: nothing asserts on the durations.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/gpusched/gpusched/client"
	"github.com/gpusched/gpusched/internal/localcluster"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

type options struct {
	trials       int
	binary       string
	dir          string
	keep         bool
	etcd         int
	schedulers   int
	agents       int
	sessionTTL   time.Duration
	etcdNoFsync  bool
	timeout      time.Duration
	trialTimeout time.Duration
}

func main() {
	var o options
	flag.IntVar(&o.trials, "trials", 20, "number of failovers to measure")
	flag.StringVar(&o.binary, "binary", "", "gpusched binary (default: build ./cmd/gpusched into a temp dir)")
	flag.StringVar(&o.dir, "dir", "", "cluster directory (default: a temp dir, removed at the end)")
	flag.BoolVar(&o.keep, "keep", false, "keep the cluster directory (data and logs) at the end")
	flag.IntVar(&o.etcd, "etcd", 3, "etcd members")
	flag.IntVar(&o.schedulers, "schedulers", 3, "scheduler replicas (at least 2)")
	flag.IntVar(&o.agents, "agents", 2, "node agents")
	flag.DurationVar(&o.sessionTTL, "session-ttl", 2*time.Second, "schedulers' --session-ttl")
	flag.BoolVar(&o.etcdNoFsync, "etcd-no-fsync", false, "run etcd with --unsafe-no-fsync")
	flag.DurationVar(&o.timeout, "timeout", 15*time.Minute, "give up on the whole run after this long")
	flag.DurationVar(&o.trialTimeout, "trial-timeout", 60*time.Second, "give up on one trial after this long")
	flag.Parse()
	if flag.NArg() > 0 || o.trials < 1 || o.schedulers < 2 || o.etcd < 1 || o.agents < 1 {
		fmt.Fprintln(os.Stderr, "bench-failover: want --trials >= 1, --schedulers >= 2, --etcd >= 1, --agents >= 1 and no arguments")
		flag.Usage()
		os.Exit(2)
	}
	if err := run(o, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "bench-failover:", err)
		os.Exit(1)
	}
}

// logf reports progress on stderr; stdout gets only the Markdown.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, time.Now().Format("15:04:05.000")+" "+format+"\n", args...)
}

// trial is one measured failover.
type trial struct {
	killed, elected string
	oldToken        int64
	newToken        int64
	accepted        time.Duration // t0 → Submit returned
	failover        time.Duration // t0 → schedule_time
	submitTries     int
}

func run(o options, out io.Writer) (err error) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()

	tmp, err := os.MkdirTemp("", "bench-failover-")
	if err != nil {
		return err
	}
	defer func() {
		if o.keep {
			logf("kept %s", tmp)
			return
		}
		os.RemoveAll(tmp)
	}()
	if o.binary == "" {
		o.binary = filepath.Join(tmp, "gpusched")
		logf("building %s", o.binary)
		build := exec.CommandContext(ctx, "go", "build", "-o", o.binary, "./cmd/gpusched")
		build.Env = append(os.Environ(), "CGO_CFLAGS=-Wno-deprecated-declarations")
		if b, err := build.CombinedOutput(); err != nil {
			return fmt.Errorf("go build ./cmd/gpusched (run from the repository root): %v\n%s", err, b)
		}
	}
	if o.dir == "" {
		o.dir = filepath.Join(tmp, "cluster")
	}

	logf("starting %d etcd members, %d schedulers, %d agents (session TTL %s) in %s", o.etcd, o.schedulers, o.agents, o.sessionTTL, o.dir)
	c, err := localcluster.Start(ctx, localcluster.Config{
		Binary: o.binary, Dir: o.dir, Etcd: o.etcd, Schedulers: o.schedulers, Agents: o.agents,
		SessionTTL: o.sessionTTL, EtcdNoFsync: o.etcdNoFsync,
	})
	if err != nil {
		return err
	}
	// Always stop the cluster, on errors, timeouts and Ctrl-C alike.
	defer func() {
		logf("stopping the cluster")
		if cerr := c.Close(); cerr != nil {
			logf("close: %v", cerr)
		}
		if err != nil {
			logf("logs were in %s/logs (use --keep to keep them)", c.Dir())
		}
	}()

	cli, err := client.New(ctx, client.Config{Endpoints: c.SchedulerAddrs(), CallTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer cli.Close()
	lf, err := newLeaderFinder(c)
	if err != nil {
		return err
	}
	defer lf.close()

	// Warm up: the cluster places and runs a job before the first kill.
	if err := steady(ctx, o, c, cli, lf); err != nil {
		return fmt.Errorf("cluster did not come up: %w", err)
	}
	if _, err := runJob(ctx, o, cli); err != nil {
		return fmt.Errorf("warm-up job: %w", err)
	}

	var results []trial
	defer func() {
		if len(results) > 0 {
			report(out, o, lf.via, results, err)
		}
	}()
	for i := 1; i <= o.trials; i++ {
		if err := steady(ctx, o, c, cli, lf); err != nil {
			return fmt.Errorf("trial %d: cluster not steady: %w", i, err)
		}
		r, err := failover(ctx, o, c, cli, lf)
		if err != nil {
			return fmt.Errorf("trial %d: %w", i, err)
		}
		results = append(results, r)
		logf("trial %2d/%d: killed %s (token %d) → %s (token %d): accepted %s, scheduled %s",
			i, o.trials, r.killed, r.oldToken, r.elected, r.newToken, ms(r.accepted), ms(r.failover))
		// Bring the killed replica back before the next trial.
		p := c.Process(r.killed)
		if err := p.Restart(); err != nil {
			return fmt.Errorf("trial %d: restart %s: %w", i, r.killed, err)
		}
		if err := p.WaitReady(ctx); err != nil {
			return fmt.Errorf("trial %d: %w", i, err)
		}
	}
	return nil
}

// steady waits until every replica runs, a leader is known and every node
// is READY and connected to it.
func steady(ctx context.Context, o options, c *localcluster.Cluster, cli *client.Client, lf *leaderFinder) error {
	ctx, cancel := context.WithTimeout(ctx, o.trialTimeout)
	defer cancel()
	var last string
	for {
		last = func() string {
			for _, p := range c.Processes() {
				if !p.Running() {
					return p.Name() + " does not run"
				}
			}
			if _, _, err := lf.leader(ctx); err != nil {
				return "leader: " + err.Error()
			}
			nodes, err := cli.Nodes(ctx)
			if err != nil {
				return "nodes: " + err.Error()
			}
			ready := 0
			for _, n := range nodes {
				if n.GetState() == pb.NodeState_NODE_STATE_READY && n.GetConnected() {
					ready++
				}
			}
			if ready < o.agents {
				return fmt.Sprintf("%d of %d nodes READY", ready, o.agents)
			}
			return ""
		}()
		if last == "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w; last: %s", ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// failover runs one trial: kill the leader, submit, read schedule_time.
func failover(ctx context.Context, o options, c *localcluster.Cluster, cli *client.Client, lf *leaderFinder) (trial, error) {
	ctx, cancel := context.WithTimeout(ctx, o.trialTimeout)
	defer cancel()
	var r trial
	var err error
	if r.killed, r.oldToken, err = lf.leader(ctx); err != nil {
		return r, err
	}
	p := c.Process(r.killed)
	if p == nil {
		return r, fmt.Errorf("the leader %q is no process of the cluster", r.killed)
	}
	t0 := time.Now()
	if err := p.Kill(); err != nil {
		return r, err
	}
	job, tries, err := submit(ctx, cli)
	if err != nil {
		return r, fmt.Errorf("submit after killing %s: %w", r.killed, err)
	}
	r.accepted, r.submitTries = time.Since(t0), tries
	for job.GetScheduleTime() == nil {
		select {
		case <-ctx.Done():
			return r, fmt.Errorf("job %s not scheduled: %w (state %s, %s)", job.GetId(), ctx.Err(), job.GetState(), job.GetReason())
		case <-time.After(50 * time.Millisecond):
		}
		j, err := cli.Get(ctx, job.GetId())
		switch {
		case err == nil:
			job = j
		case !retryable(ctx, err):
			return r, fmt.Errorf("get job %s: %w", job.GetId(), err)
		}
	}
	r.failover = job.GetScheduleTime().AsTime().Sub(t0)
	if r.elected, r.newToken, err = lf.leader(ctx); err != nil {
		return r, err
	}
	// Let the job finish, so the next trial starts on idle nodes.
	if j, err := cli.Wait(ctx, job.GetId()); err != nil {
		return r, fmt.Errorf("wait for job %s: %w", job.GetId(), err)
	} else if j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		return r, fmt.Errorf("job %s ended %s: %s", j.GetId(), j.GetState(), j.GetReason())
	}
	return r, nil
}

var trueJob = &pb.JobSpec{Nodes: 1, Command: []string{"true"}}

// submit submits the `true` job, retrying every 50ms while no replica can
// take it.
func submit(ctx context.Context, cli *client.Client) (*pb.Job, int, error) {
	for tries := 1; ; tries++ {
		job, err := cli.Submit(ctx, trueJob)
		if err == nil {
			return job, tries, nil
		}
		if !retryable(ctx, err) {
			return nil, tries, err
		}
		select {
		case <-ctx.Done():
			return nil, tries, fmt.Errorf("%w after %d tries; last error: %v", ctx.Err(), tries, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// retryable: no replica leads right now, or one call timed out while the
// trial still has time.
func retryable(ctx context.Context, err error) bool {
	return ctx.Err() == nil && (errors.Is(err, client.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) ||
		status.Code(err) == codes.DeadlineExceeded)
}

// runJob submits the `true` job and waits until it succeeds.
func runJob(ctx context.Context, o options, cli *client.Client) (*pb.Job, error) {
	ctx, cancel := context.WithTimeout(ctx, o.trialTimeout)
	defer cancel()
	job, _, err := submit(ctx, cli)
	if err != nil {
		return nil, err
	}
	j, err := cli.Wait(ctx, job.GetId())
	if err == nil && j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		err = fmt.Errorf("job %s ended %s: %s", j.GetId(), j.GetState(), j.GetReason())
	}
	return j, err
}

// leaderFinder finds the leading replica through ClusterService.GetStatus,
// or, where a replica does not implement it, through the election key in
// etcd.
type leaderFinder struct {
	c     *localcluster.Cluster
	conns []*grpc.ClientConn
	via   string // how the leader was last found
}

func newLeaderFinder(c *localcluster.Cluster) (*leaderFinder, error) {
	lf := &leaderFinder{c: c}
	for _, addr := range c.SchedulerAddrs() {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			lf.close()
			return nil, err
		}
		lf.conns = append(lf.conns, conn)
	}
	return lf, nil
}

func (lf *leaderFinder) close() {
	for _, conn := range lf.conns {
		conn.Close()
	}
}

// leader returns the leader's name and fencing token.
func (lf *leaderFinder) leader(ctx context.Context) (string, int64, error) {
	var errs []error
	for i, conn := range lf.conns {
		if !lf.c.Process(fmt.Sprintf("scheduler-%d", i+1)).Running() {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := pb.NewClusterServiceClient(conn).GetStatus(cctx, &pb.GetStatusRequest{})
		cancel()
		switch {
		case status.Code(err) == codes.Unimplemented:
			name, token, err := lf.c.Leader(ctx)
			if err == nil {
				lf.via = "the election key in etcd (ClusterService.GetStatus is not implemented by this build)"
			}
			return name, token, err
		case err != nil:
			errs = append(errs, err)
		case resp.GetLeader() == "":
			errs = append(errs, fmt.Errorf("%s: no leader elected", resp.GetAnsweredBy()))
		default:
			lf.via = "ClusterService.GetStatus"
			return resp.GetLeader(), resp.GetFencingToken(), nil
		}
	}
	if len(errs) == 0 {
		errs = append(errs, errors.New("no scheduler runs"))
	}
	return "", 0, errors.Join(errs...)
}

// report prints the Markdown snippet.
func report(w io.Writer, o options, via string, rs []trial, runErr error) {
	fail := make([]time.Duration, len(rs))
	acc := make([]time.Duration, len(rs))
	for i, r := range rs {
		fail[i], acc[i] = r.failover, r.accepted
	}
	fmt.Fprintf(w, "## Scheduler failover\n\n")
	fmt.Fprintf(w, "Machine: %s.\n\n", machine())
	fmt.Fprintf(w, "%d etcd members, %d scheduler replicas and %d agents run as separate processes\n", o.etcd, o.schedulers, o.agents)
	fmt.Fprintf(w, "on loopback; session TTL %s. Each trial SIGKILLs the leading replica\n", o.sessionTTL)
	fmt.Fprintf(w, "(t0 just before the kill), submits a 1-node job `true` through the SDK at once,\n")
	fmt.Fprintf(w, "retrying every 50 ms while no replica leads, and takes the job's\n")
	fmt.Fprintf(w, "`schedule_time`. Failover is `schedule_time - t0` (one clock). The leader\n")
	fmt.Fprintf(w, "was found through %s.\n\n", orDefault(via, "ClusterService.GetStatus"))
	fmt.Fprintf(w, "```\n%s\n", commandLine())
	fmt.Fprintf(w, "%-6s %-12s %-12s %8s %8s %12s %12s\n", "trial", "killed", "new leader", "token", "→ token", "accepted", "scheduled")
	for i, r := range rs {
		fmt.Fprintf(w, "%-6d %-12s %-12s %8d %8d %12s %12s\n", i+1, r.killed, r.elected, r.oldToken, r.newToken, ms(r.accepted), ms(r.failover))
	}
	fmt.Fprintf(w, "\n%-10s %10s %10s %10s %10s %10s   (n=%d)\n", "", "p50", "p90", "p99", "max", "min", len(rs))
	fmt.Fprintf(w, "%-10s %10s %10s %10s %10s %10s\n", "scheduled", ms(pct(fail, 50)), ms(pct(fail, 90)), ms(pct(fail, 99)), ms(slices.Max(fail)), ms(slices.Min(fail)))
	fmt.Fprintf(w, "%-10s %10s %10s %10s %10s %10s\n", "accepted", ms(pct(acc, 50)), ms(pct(acc, 90)), ms(pct(acc, 99)), ms(slices.Max(acc)), ms(slices.Min(acc)))
	fmt.Fprintf(w, "```\n")
	if runErr != nil {
		fmt.Fprintf(w, "\n**Incomplete:** %d of %d trials ran; the run stopped: %v\n", len(rs), o.trials, runErr)
	}
	if len(rs) < 100 {
		fmt.Fprintf(w, "\nWith %d trials, p99 is the nearest-rank value, about the maximum.\n", len(rs))
	}
}

// pct is the nearest-rank percentile.
func pct(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// machine describes the machine: CPUs, model, memory, OS and Go version.
func machine() string {
	parts := []string{fmt.Sprintf("%d CPUs (nproc)", runtime.NumCPU())}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				parts = append(parts, strings.TrimSpace(v))
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		if _, err := fmt.Sscanf(string(b), "MemTotal: %d kB", &kb); err == nil {
			parts = append(parts, fmt.Sprintf("%d GiB", (kb+512*1024)>>20))
		}
	}
	goVersion := runtime.Version() // the toolchain that built this program
	if b, err := exec.Command("go", "env", "GOVERSION").Output(); err == nil && len(b) > 0 {
		goVersion = strings.TrimSpace(string(b))
	}
	parts = append(parts, runtime.GOOS+"/"+runtime.GOARCH, "Go "+strings.TrimPrefix(goVersion, "go"))
	return strings.Join(parts, ", ")
}

// commandLine is how this program was run, as a go run line.
func commandLine() string {
	args := []string{"go run ./scripts/bench-failover"}
	for _, a := range os.Args[1:] {
		if strings.ContainsAny(a, " \t'\"$") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		args = append(args, a)
	}
	return strings.Join(args, " ")
}
