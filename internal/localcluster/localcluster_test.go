package localcluster

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
)

// binary is the gpusched binary, built once unless -short.
var binary string

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	flag.Parse()
	if !testing.Short() {
		dir, err := os.MkdirTemp("", "localcluster-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		binary = filepath.Join(dir, "gpusched")
		build := exec.Command("go", "build", "-o", binary, "github.com/gpusched/gpusched/cmd/gpusched")
		build.Env = append(os.Environ(), "CGO_CFLAGS=-Wno-deprecated-declarations")
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building gpusched: %v\n%s", err, out)
			return 1
		}
	}
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			return 1
		}
	}
	return code
}

func needBinary(t *testing.T) {
	t.Helper()
	if binary == "" {
		t.Skip("needs the gpusched binary; skipped with -short")
	}
}

// waitTimeout bounds every wait; generous, so a loaded machine never fails
// a correct run.
const waitTimeout = 60 * time.Second

// eventually polls cond until it returns nil or waitTimeout passes.
func eventually(t *testing.T, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last error: %v", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startCluster starts a cluster that is closed (and checked to leave no
// process) when the test ends.
func startCluster(t *testing.T, cfg Config) *Cluster {
	t.Helper()
	cfg.Binary = binary
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	cfg.EtcdNoFsync = true
	ctx, cancel := context.WithTimeout(context.Background(), 2*waitTimeout)
	defer cancel()
	c, err := Start(ctx, cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if t.Failed() {
			for _, p := range c.Processes() {
				b, _ := os.ReadFile(p.LogPath())
				t.Logf("--- %s ---\n%s", p.LogPath(), b)
			}
		}
	})
	return c
}

// assertGone fails unless every pid is gone (ESRCH), polling.
func assertGone(t *testing.T, pids map[string]int) {
	t.Helper()
	for name, pid := range pids {
		eventually(t, name+" to be gone", func() error {
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				return fmt.Errorf("%s (pid %d): kill 0 = %v", name, pid, err)
			}
			return nil
		})
	}
}

func pidsOf(c *Cluster) map[string]int {
	pids := map[string]int{}
	for _, p := range c.Processes() {
		pids[p.Name()] = p.PID()
	}
	return pids
}

func TestClusterSurvivesAnEtcdMemberAndCloseLeavesNothing(t *testing.T) {
	needBinary(t)
	c := startCluster(t, Config{Etcd: 3, Schedulers: 1, Agents: 1, SessionTTL: 2 * time.Second})

	var names []string
	for _, p := range c.Processes() {
		names = append(names, p.Name())
		if !p.Running() || p.PID() == 0 {
			t.Errorf("%s does not run after Start", p.Name())
		}
		if _, err := os.Stat(p.LogPath()); err != nil {
			t.Errorf("%s: no log: %v", p.Name(), err)
		}
	}
	if want := []string{"etcd-1", "etcd-2", "etcd-3", "scheduler-1", "agent-1"}; !slices.Equal(names, want) {
		t.Errorf("processes = %v, want %v", names, want)
	}
	if got := len(c.EtcdEndpoints()); got != 3 {
		t.Errorf("%d etcd endpoints", got)
	}
	if got := c.SchedulerAddrs(); len(got) != 1 || c.Servers() != got[0] {
		t.Errorf("scheduler addrs %v, servers %q", got, c.Servers())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 4*waitTimeout)
	defer cancel()
	cli, err := c.Etcd(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	members, err := cli.MemberList(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(members.Members) != 3 {
		t.Fatalf("etcd has %d members, want 3: %v", len(members.Members), members.Members)
	}

	// The one scheduler wins the election.
	eventually(t, "scheduler-1 to lead", func() error {
		name, token, err := c.Leader(ctx)
		if err == nil && (name != "scheduler-1" || token <= 0) {
			err = fmt.Errorf("leader %q, token %d", name, token)
		}
		return err
	})

	// cluster.json lets another invocation find every process.
	attached, err := Attach(c.Dir())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range attached.Processes() {
		if !p.Running() || p.PID() != c.Process(p.Name()).PID() {
			t.Errorf("attached %s: running=%v pid=%d, want pid %d", p.Name(), p.Running(), p.PID(), c.Process(p.Name()).PID())
		}
	}
	if attached.Servers() != c.Servers() || !slices.Equal(attached.EtcdEndpoints(), c.EtcdEndpoints()) {
		t.Errorf("attached cluster has servers %q etcd %v", attached.Servers(), attached.EtcdEndpoints())
	}
	if _, err := Start(ctx, Config{Binary: binary, Dir: c.Dir()}); !errors.Is(err, ErrRunning) {
		t.Errorf("a second Start in the same dir: %v, want ErrRunning", err)
	}

	// Two of three members keep a quorum.
	victim := c.Process("etcd-1")
	if err := victim.Kill(); err != nil {
		t.Fatal(err)
	}
	if victim.Running() {
		t.Fatal("etcd-1 runs after Kill")
	}
	eventually(t, "a Put with etcd-1 dead", func() error {
		pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
		defer pcancel()
		_, err := cli.Put(pctx, "/localcluster-test/k", "v")
		return err
	})
	// Restarted on the same data dir, it rejoins.
	oldPID := victim.PID()
	if err := victim.Restart(); err != nil {
		t.Fatal(err)
	}
	if victim.PID() == oldPID {
		t.Errorf("Restart kept pid %d", oldPID)
	}
	if err := victim.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	one, err := clientv3.New(clientv3.Config{Endpoints: []string{victim.Addr()}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	eventually(t, "the restarted member to see the Put", func() error {
		gctx, gcancel := context.WithTimeout(ctx, 5*time.Second)
		defer gcancel()
		resp, err := one.Get(gctx, "/localcluster-test/k")
		if err == nil && (len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v") {
			err = fmt.Errorf("got %v", resp.Kvs)
		}
		return err
	})
	st, err := ReadState(c.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if st.Processes[0].PID != victim.PID() {
		t.Errorf("cluster.json records pid %d for etcd-1, want %d", st.Processes[0].PID, victim.PID())
	}

	// Pause and Resume: a paused scheduler still runs.
	sched := c.Process("scheduler-1")
	if err := sched.Pause(); err != nil {
		t.Fatal(err)
	}
	if !sched.Running() {
		t.Error("paused scheduler does not run")
	}
	if err := sched.Resume(); err != nil {
		t.Fatal(err)
	}

	pids := pidsOf(c)
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	assertGone(t, pids)
	for _, p := range c.Processes() {
		if p.Running() {
			t.Errorf("%s runs after Close", p.Name())
		}
	}
	for _, p := range attached.Processes() {
		if p.Running() {
			t.Errorf("attached %s runs after Close", p.Name())
		}
	}
}

// TestAttachedClusterStops is what `scripts/localcluster down` does: stop a
// cluster through cluster.json.
func TestAttachedClusterStops(t *testing.T) {
	needBinary(t)
	c := startCluster(t, Config{Etcd: 1, Schedulers: -1, Agents: -1})
	if n := len(c.Processes()); n != 1 {
		t.Fatalf("%d processes, want 1 etcd member", n)
	}
	pids := pidsOf(c)
	attached, err := Attach(c.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if err := attached.Close(); err != nil {
		t.Errorf("Close of the attached cluster: %v", err)
	}
	assertGone(t, pids)
	eventually(t, "the starting cluster to see its process gone", func() error {
		if c.Process("etcd-1").Running() {
			return errors.New("etcd-1 runs")
		}
		return nil
	})
	// A new cluster can start in the same dir, on fresh data.
	c2 := startCluster(t, Config{Dir: c.Dir(), Etcd: 1, Schedulers: -1, Agents: -1})
	if c2.Process("etcd-1").PID() == pids["etcd-1"] {
		t.Error("the new cluster reports the old pid")
	}
}

func TestProcessExitIsReported(t *testing.T) {
	needBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*waitTimeout)
	defer cancel()
	// A scheduler with a bad flag exits at once: Start must say so, with
	// the log, and leave nothing running.
	dir := t.TempDir()
	_, err := Start(ctx, Config{Binary: binary, Dir: dir, Etcd: 1, Schedulers: 1, Agents: 1,
		ExtraSchedulerArgs: []string{"--no-such-flag"}, EtcdNoFsync: true})
	if !errors.Is(err, ErrExited) || !strings.Contains(err.Error(), "scheduler-1") || !strings.Contains(err.Error(), "no-such-flag") {
		t.Fatalf("Start with a failing agent: %v", err)
	}
	attached, err := Attach(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range attached.Processes() {
		if p.Running() {
			t.Errorf("%s runs after a failed Start", p.Name())
		}
	}
}

func TestConfigErrors(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"no binary", Config{Dir: t.TempDir()}},
		{"no dir", Config{Binary: "/bin/true"}},
		{"binary missing", Config{Binary: filepath.Join(t.TempDir(), "nope"), Dir: t.TempDir()}},
		{"too many etcd", Config{Binary: "/bin/true", Dir: t.TempDir(), Etcd: 10}},
	} {
		if _, err := Start(ctx, tc.cfg); !errors.Is(err, ErrConfig) {
			t.Errorf("%s: %v, want ErrConfig", tc.name, err)
		}
	}
	if _, err := Attach(t.TempDir()); !errors.Is(err, ErrNoCluster) {
		t.Errorf("Attach of an empty dir: %v, want ErrNoCluster", err)
	}
}

func TestStateRoundTripAndRecycledPIDs(t *testing.T) {
	dir := t.TempDir()
	st := State{
		Binary: "/no/such/gpusched", Prefix: "/p", StartTimeout: Duration(7 * time.Second),
		EtcdEndpoints: []string{"http://127.0.0.1:1"}, SchedulerAddrs: []string{"127.0.0.1:2", "127.0.0.1:3"},
		Servers: "127.0.0.1:2,127.0.0.1:3",
		Processes: []ProcessState{
			// Our own pid runs, but not this command line: never "ours".
			{Name: "etcd-1", Kind: KindEtcd, PID: os.Getpid(), Args: []string{"etcd"}, Addr: "http://127.0.0.1:1", Log: "/x.log"},
			{Name: "scheduler-1", Kind: KindScheduler, Args: []string{"scheduler"}, Addr: "127.0.0.1:2"},
		},
	}
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"start_timeout":"7s"`) {
		t.Errorf("durations are not strings: %s", b)
	}
	if err := os.WriteFile(filepath.Join(dir, StateFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := Attach(dir)
	if err != nil {
		t.Fatal(err)
	}
	if c.Servers() != st.Servers || c.Process("etcd-1").LogPath() != "/x.log" || c.Process("nope") != nil {
		t.Errorf("attached: servers %q, log %q", c.Servers(), c.Process("etcd-1").LogPath())
	}
	for _, p := range c.Processes() {
		if p.Running() {
			t.Errorf("%s (pid %d) taken to run", p.Name(), p.PID())
		}
	}
	// Close signals nothing that is not ours (this test process survives).
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if got := c.State(); got.StartTimeout != st.StartTimeout || got.Prefix != "/p" || len(got.Processes) != 2 {
		t.Errorf("State() = %+v", got)
	}
}

func TestFreePortsAreDistinct(t *testing.T) {
	ports, err := freePorts(20)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for _, p := range ports {
		if seen[p] || p == 0 {
			t.Fatalf("ports %v", ports)
		}
		seen[p] = true
	}
}
