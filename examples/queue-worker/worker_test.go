package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/gpusched/gpusched/client"
	"github.com/gpusched/gpusched/internal/devcluster"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// waitTimeout bounds every wait. It is generous on purpose: a loaded 2-core
// CI machine must never turn a correct run into a failure. Nothing in this
// test asserts on timing.
const waitTimeout = 3 * time.Minute

const (
	testStream   = "gpusched:jobs"
	testGroup    = "gpusched-bridge"
	testConsumer = "w1"
	testJobSet   = "queue-worker-test"
)

// TestKillAndRestart runs the worker binary against a real redis-server and
// a real dev cluster, SIGKILLs it twice mid-stream and once more puts the
// consumer in the state a crash right after XREADGROUP (and right after a
// Submit) leaves, and checks that every message got exactly one job, one
// result, and was acked, and every bad message went to the dead letters.
func TestKillAndRestart(t *testing.T) {
	redisAddr := startRedis(t)
	worker := buildWorker(t)
	cluster := startCluster(t)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr})
	t.Cleanup(func() { rdb.Close() })
	gs, err := client.New(ctx, client.Config{Endpoints: []string{cluster.Endpoint}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gs.Close() })

	var good, bad []string
	push := func(n int) {
		t.Helper()
		for range n {
			good = append(good, xadd(t, rdb, "command", `["sh","-c","sleep 0.2"]`, "nodes", "1"))
		}
	}
	// Batch 1: 20 jobs and two bad messages, one the worker rejects (not
	// JSON), one the scheduler rejects (unknown GPU model).
	push(10)
	bad = append(bad, xadd(t, rdb, "command", `sleep 1`))
	push(5)
	bad = append(bad, xadd(t, rdb, "command", `["true"]`, "gpu_model", "Z9000"))
	push(5)
	results := func() int64 { return xlen(t, rdb, testStream+":results") }

	// Run 1: kill as soon as a few messages are acked.
	var runs []*proc
	t.Cleanup(func() {
		for i, p := range runs {
			t.Logf("worker run %d output:\n%s", i+1, p.out.String())
		}
	})
	w := startWorker(t, worker, redisAddr, cluster.Endpoint)
	runs = append(runs, w)
	waitFor(t, "5 results", func() bool { return results() >= 5 }, w)
	w.kill()
	t.Logf("killed worker 1 with %d results", results())

	// While it is down, let every job it made end: the next run must ack
	// them from its list, with no watch event to tell it.
	waitFor(t, "every submitted job to end", func() bool {
		jobs := listJobs(t, gs)
		for _, j := range jobs {
			if !client.Terminal(j.GetState()) {
				return false
			}
		}
		return len(jobs) > 0
	})

	// Batch 2: 20 more, of which this test takes 5 as the worker's own
	// consumer (the state a crash right after XREADGROUP leaves) and makes
	// the job for 2 of those the way the worker does (a crash right after
	// Submit, before anything was recorded).
	push(20)
	res, err := rdb.XReadGroup(ctx, &redis.XReadGroupArgs{
		Group: testGroup, Consumer: testConsumer, Streams: []string{testStream, ">"}, Count: 5, Block: -1,
	}).Result()
	if err != nil || len(res) != 1 || len(res[0].Messages) != 5 {
		t.Fatalf("XREADGROUP: %v, %v", res, err)
	}
	// (Run 1 may have died before reading all of batch 1, so these 5 may
	// be from either batch; only good ones get a job here.)
	submitted := 0
	for _, m := range res[0].Messages {
		if submitted == 2 || !slices.Contains(good, m.ID) {
			continue
		}
		spec, err := parseMessage(m, testJobSet)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := gs.Submit(ctx, spec, client.WithIdempotencyKey(idempotencyKey(testStream, m.ID))); err != nil {
			t.Fatal(err)
		}
		submitted++
	}

	// Run 2: kill mid-flight, restart at once (run 3).
	w = startWorker(t, worker, redisAddr, cluster.Endpoint)
	runs = append(runs, w)
	waitFor(t, "25 results", func() bool { return results() >= 25 }, w)
	w.kill()
	t.Logf("killed worker 2 with %d results", results())
	w = startWorker(t, worker, redisAddr, cluster.Endpoint)
	runs = append(runs, w)

	waitFor(t, "every message settled", func() bool {
		pending, err := rdb.XPending(ctx, testStream, testGroup).Result()
		if err != nil {
			t.Fatal(err)
		}
		return pending.Count == 0 && results() == int64(len(good)) && xlen(t, rdb, testStream+":dead") == int64(len(bad))
	}, w)

	// Graceful shutdown.
	if err := w.stop(syscall.SIGTERM); err != nil {
		t.Errorf("worker 3 after SIGTERM: %v\n%s", err, w.out.String())
	}

	// Exactly one job per good message, none for bad ones, all ended.
	byMsg := map[string][]*pb.Job{}
	for _, j := range listJobs(t, gs) {
		id := j.GetSpec().GetLabels()[MessageIDLabel]
		byMsg[id] = append(byMsg[id], j)
		if !client.Terminal(j.GetState()) {
			t.Errorf("job %s (message %s) is %s, want ended", j.GetId(), id, j.GetState())
		} else if j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
			t.Logf("job %s (message %s) ended %s: %s", j.GetId(), id, j.GetState(), j.GetReason())
		}
	}
	for _, id := range good {
		if n := len(byMsg[id]); n != 1 {
			t.Errorf("message %s has %d jobs, want 1", id, n)
		}
	}
	if len(byMsg) != len(good) {
		t.Errorf("job set has jobs for %d messages, want %d", len(byMsg), len(good))
	}

	// Exactly one result per good message, naming its job.
	entries, err := rdb.XRange(ctx, testStream+":results", "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, e := range entries {
		id, _ := e.Values["message_id"].(string)
		seen[id]++
		if jobs := byMsg[id]; len(jobs) == 1 && e.Values["job_id"] != jobs[0].GetId() {
			t.Errorf("result for message %s names job %v, want %s", id, e.Values["job_id"], jobs[0].GetId())
		}
		if st, _ := e.Values["state"].(string); st == "" {
			t.Errorf("result for message %s has no state: %v", id, e.Values)
		}
	}
	for _, id := range good {
		if seen[id] != 1 {
			t.Errorf("message %s has %d results, want 1", id, seen[id])
		}
	}
	dead, err := rdb.XRange(ctx, testStream+":dead", "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	var deadIDs []string
	for _, e := range dead {
		id, _ := e.Values["message_id"].(string)
		deadIDs = append(deadIDs, id)
	}
	slices.Sort(deadIDs)
	bad = slices.Sorted(slices.Values(bad))
	if !slices.Equal(deadIDs, bad) {
		t.Errorf("dead letters are messages %v, want %v", deadIDs, bad)
	}
}

func TestParseMessage(t *testing.T) {
	msg := func(kv ...string) redis.XMessage {
		m := redis.XMessage{ID: "1732662000000-7", Values: map[string]any{}}
		for i := 0; i+1 < len(kv); i += 2 {
			m.Values[kv[i]] = kv[i+1]
		}
		return m
	}
	spec, err := parseMessage(msg("command", `["sh","-c","echo hi"]`, "nodes", "2", "gpu_model", "H100",
		"tenant", "vision", "queue", "batch", "name", "sweep"), "set-1")
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprintf("%v %v %v %v %v %v %v %v", spec.GetCommand(), spec.GetNodes(), spec.GetGpuModel(), spec.GetTenant(), spec.GetQueue(),
		spec.GetName(), spec.GetJobSet(), spec.GetLabels()); got != "[sh -c echo hi] 2 H100 vision batch sweep set-1 map[redis-message-id:1732662000000-7]" {
		t.Errorf("spec = %s", got)
	}
	spec, err = parseMessage(msg("command", `["true"]`), "s")
	if err != nil || spec.GetNodes() != 1 || spec.GetName() != "redis-1732662000000-7" {
		t.Errorf("defaults: %v, %v", spec, err)
	}
	for _, m := range []redis.XMessage{
		{ID: "1-0"}, // deleted from the stream
		msg("nodes", "1"),
		msg("command", "sleep 1"),
		msg("command", "[]"),
		msg("command", `[1, 2]`),
		msg("command", `["true"]`, "nodes", "0"),
		msg("command", `["true"]`, "nodes", "two"),
	} {
		if _, err := parseMessage(m, "s"); err == nil {
			t.Errorf("parseMessage(%v) = nil error, want one", m.Values)
		}
	}
	if k := idempotencyKey("gpusched:jobs", "1-0"); k != "gpusched:jobs/1-0" {
		t.Errorf("idempotencyKey = %q", k)
	}
	long := string(bytes.Repeat([]byte("s"), 300))
	if k := idempotencyKey(long, "1-0"); len(k) > 256 {
		t.Errorf("idempotencyKey of a long stream is %d characters", len(k))
	}
}

// startRedis runs a throwaway redis-server on a free port, without
// persistence, stopped when the test ends.
func startRedis(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if _, serr := os.Stat("/usr/bin/redis-server"); serr == nil {
			bin, err = "/usr/bin/redis-server", nil
		}
	}
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skip("redis-server is not installed (apt-get install redis-server); CI runs this test")
		}
		t.Fatalf("CI is set but redis-server is not on PATH: %v", err)
	}
	dir := t.TempDir()
	for attempt := 0; ; attempt++ {
		port := freePort(t)
		p := startProc(t, "redis-server", bin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--dir", dir)
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		rdb := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
		deadline := time.Now().Add(waitTimeout)
		for time.Now().Before(deadline) && !p.exited() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err := rdb.Ping(ctx).Err()
			cancel()
			if err == nil {
				rdb.Close()
				return addr
			}
			time.Sleep(50 * time.Millisecond)
		}
		rdb.Close()
		if attempt == 4 || !p.exited() {
			t.Fatalf("redis-server did not start:\n%s", p.out.String())
		}
		// Someone took the port between freePort and the bind: try another.
		t.Logf("redis-server exited (port %d taken?); trying another port:\n%s", port, p.out.String())
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func startCluster(t *testing.T) *devcluster.Cluster {
	t.Helper()
	for attempt := 0; ; attempt++ {
		c, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: 4, DataDir: t.TempDir(), Listen: "127.0.0.1:0"})
		if err == nil {
			t.Cleanup(c.Close)
			return c
		}
		// The embedded etcd picks its ports before it binds them, so
		// another process may take one in between: try again.
		inUse := errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")
		if attempt == 4 || !inUse {
			t.Fatal(err)
		}
		t.Logf("starting the dev cluster: %v; trying again", err)
	}
}

func buildWorker(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "queue-worker")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func startWorker(t *testing.T, bin, redisAddr, server string) *proc {
	t.Helper()
	return startProc(t, "queue-worker", bin, "--redis", redisAddr, "--server", server,
		"--stream", testStream, "--group", testGroup, "--consumer", testConsumer,
		"--job-set", testJobSet, "--batch", "4", "--block", "200ms")
}

// xadd appends a message and returns its ID.
func xadd(t *testing.T, rdb *redis.Client, kv ...string) string {
	t.Helper()
	vals := make([]any, len(kv))
	for i, s := range kv {
		vals[i] = s
	}
	id, err := rdb.XAdd(context.Background(), &redis.XAddArgs{Stream: testStream, Values: vals}).Result()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func xlen(t *testing.T, rdb *redis.Client, stream string) int64 {
	t.Helper()
	n, err := rdb.XLen(context.Background(), stream).Result()
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// listJobs returns every job of the test's job set, all pages.
func listJobs(t *testing.T, gs *client.Client) []*pb.Job {
	t.Helper()
	var jobs []*pb.Job
	token := ""
	for {
		resp, err := gs.List(context.Background(), &pb.ListJobsRequest{
			Selector: &pb.JobSelector{JobSet: testJobSet}, PageSize: 500, PageToken: token,
		})
		if err != nil {
			t.Fatal(err)
		}
		jobs = append(jobs, resp.GetJobs()...)
		if token = resp.GetNextPageToken(); token == "" {
			return jobs
		}
	}
}

// waitFor polls cond until it holds; a watched process that exits first
// fails the test.
func waitFor(t *testing.T, what string, cond func() bool, watch ...*proc) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		for _, p := range watch {
			if p.exited() {
				t.Fatalf("waiting for %s: %s exited: %v\n%s", what, p.name, p.err, p.out.String())
			}
		}
		if time.Now().After(deadline) {
			for _, p := range watch {
				t.Logf("%s output:\n%s", p.name, p.out.String())
			}
			t.Fatalf("timed out after %s waiting for %s", waitTimeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// proc is a child process, killed when the test ends.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *lockedBuffer
	done chan struct{}
	err  error
}

func startProc(t *testing.T, name, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(bin, args...), out: &lockedBuffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if err := p.stop(syscall.SIGTERM); err != nil && !p.killed() {
			t.Logf("%s: %v", name, err)
		}
	})
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) killed() bool {
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return true
		}
	}
	return false
}

// kill sends SIGKILL and waits for the process to be gone.
func (p *proc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// stop sends sig, then SIGKILL if the process has not exited within a
// while, and returns how it exited.
func (p *proc) stop(sig syscall.Signal) error {
	if p.exited() {
		return p.err
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("%s did not exit within 30s of %s; killed", p.name, sig)
	}
	return p.err
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
