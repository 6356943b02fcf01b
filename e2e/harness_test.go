package e2e

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// binary is the gpusched binary built once for the package.
var binary string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	flag.Parse()
	if testing.Short() || os.Getenv("GPUSCHED_E2E_SKIP") != "" {
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "gpusched-e2e-bin-")
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
	return m.Run()
}

func needBinary(t *testing.T) {
	t.Helper()
	if binary == "" {
		t.Skip("end-to-end tests are skipped with -short")
	}
}

// waitTimeout bounds every wait in these tests. It is generous: a loaded
// 2-core CI machine must never turn a correct run into a failure.
const waitTimeout = 60 * time.Second

// proc is a background gpusched process in its own process group.
type proc struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	out    *lockedBuffer
	done   chan struct{}
	waitEr error
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

// start runs gpusched with args in the background. The process is stopped
// (SIGINT, then SIGKILL) when the test ends, if it still runs.
func start(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, out: &lockedBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(binary, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.waitEr = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("--- output of %s ---\n%s", name, p.out.String())
		}
	})
	return p
}

// stop sends SIGINT and waits for a clean exit; it fails the test if the
// process needs SIGKILL or leaves any process of its group behind.
func (p *proc) stop() {
	p.t.Helper()
	select {
	case <-p.done:
		return
	default:
	}
	pgid := p.cmd.Process.Pid
	began := time.Now()
	defer func() { p.t.Logf("stopping %s took %s", p.name, time.Since(began).Round(time.Millisecond)) }()
	_ = p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(waitTimeout):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
		p.t.Errorf("%s did not exit within %s of SIGINT", p.name, waitTimeout)
	}
	if p.waitEr != nil {
		p.t.Errorf("%s exited with %v after SIGINT", p.name, p.waitEr)
	}
	// Commands run by agents live in process groups of their own: look for
	// any process whose parent chain led to us via the environment marker.
	assertNoOrphans(p.t, p.name)
}

// assertNoOrphans fails if a command started by these tests still runs.
// Every command the tests submit carries the marker in its argv.
func assertNoOrphans(t *testing.T, who string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		left := findMarked()
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("after %s stopped, processes remain: %v", who, left)
			for _, pid := range left {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// marker is put into every long-running test command so leftovers can be
// found (and no unrelated process is ever touched).
var marker = fmt.Sprintf("gpusched-e2e-%d", os.Getpid())

func findMarked() []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte(marker)) {
			continue
		}
		stat, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && len(stat) > i+2 && stat[i+2] == 'Z' {
			continue // a zombie is dead; its parent reaps it
		}
		pids = append(pids, pid)
	}
	return pids
}

// result of one CLI invocation.
type result struct {
	stdout, stderr string
	code           int
}

// cli runs gpusched against server and returns what it printed.
func cli(t *testing.T, server string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = append(os.Environ(), "GPUSCHED_SERVER="+server)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		t.Fatalf("gpusched %s: %v", strings.Join(args, " "), err)
	}
	return r
}

// mustCLI runs gpusched and fails the test unless it exits 0.
func mustCLI(t *testing.T, server string, args ...string) string {
	t.Helper()
	r := cli(t, server, args...)
	if r.code != 0 {
		t.Fatalf("gpusched %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// eventually polls cond until it holds or waitTimeout passes.
func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last seen:\n%s", what, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
