package runner

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// wait is generous: the verdicts never depend on speed, and CI machines are slow.
const wait = 10 * time.Second

// shSpec runs script under sh in a fresh directory, logging to a fresh file.
func shSpec(t *testing.T, script string) Spec {
	t.Helper()
	tmp := t.TempDir()
	return Spec{
		Command: []string{"sh", "-c", script},
		Env:     []string{"PATH=" + os.Getenv("PATH")},
		Dir:     filepath.Join(tmp, "work"),
		LogPath: filepath.Join(tmp, "logs", "out.log"),
	}
}

// start starts spec and makes sure nothing of it outlives the test.
func start(t *testing.T, spec Spec) *Process {
	t.Helper()
	p, err := Start(spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		p.KillGroup()
		select {
		case <-p.Done():
		case <-time.After(wait):
			t.Errorf("pid %d not reaped after KillGroup", p.PID())
		}
	})
	return p
}

func waitDone(t *testing.T, p *Process) Exit {
	t.Helper()
	select {
	case <-p.Done():
		return p.Exit()
	case <-time.After(wait):
		t.Fatalf("pid %d did not exit within %v", p.PID(), wait)
		return Exit{}
	}
}

func stop(t *testing.T, p *Process, grace time.Duration) Exit {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	e, err := p.Stop(ctx, grace)
	if err != nil {
		t.Fatalf("Stop: %v", err)
	}
	return e
}

// waitFor polls cond until it holds or the wait runs out.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func readLog(t *testing.T, spec Spec) string {
	t.Helper()
	b, err := os.ReadFile(spec.LogPath)
	if err != nil {
		t.Fatalf("read log: %v", err)
	}
	return string(b)
}

// readPID waits for the script to write a PID (and newline) to path.
func readPID(t *testing.T, path string) int {
	t.Helper()
	var pid int
	waitFor(t, "pid file", func() bool {
		b, err := os.ReadFile(path)
		if err != nil || !strings.HasSuffix(string(b), "\n") {
			return false
		}
		pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err == nil
	})
	return pid
}

// waitProcessGone waits for pid to vanish; an orphan is gone only once init
// reaps it, which some inits do lazily.
func waitProcessGone(t *testing.T, pid int) {
	t.Helper()
	waitFor(t, "pid "+strconv.Itoa(pid)+" to be gone", func() bool {
		return syscall.Kill(pid, 0) == syscall.ESRCH
	})
}

func TestExitCodesAndLog(t *testing.T) {
	cases := []struct {
		name   string
		script string
		want   Exit
	}{
		{"a command that exits 0 reports code 0", "echo to-stdout; echo to-stderr >&2",
			Exit{Code: 0, Message: "exit status 0"}},
		{"a command that exits 3 reports code 3", "echo to-stdout; echo to-stderr >&2; exit 3",
			Exit{Code: 3, Message: "exit status 3"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			spec := shSpec(t, c.script)
			p := start(t, spec)
			if got := waitDone(t, p); got != c.want {
				t.Errorf("Exit = %+v, want %+v", got, c.want)
			}
			log := readLog(t, spec)
			for _, want := range []string{"to-stdout\n", "to-stderr\n"} {
				if !strings.Contains(log, want) {
					t.Errorf("log %q lacks %q", log, want)
				}
			}
		})
	}
}

func TestLogIsAppended(t *testing.T) {
	t.Parallel()
	spec := shSpec(t, "echo second")
	if err := os.MkdirAll(filepath.Dir(spec.LogPath), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(spec.LogPath, []byte("first\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitDone(t, start(t, spec))
	if got := readLog(t, spec); got != "first\nsecond\n" {
		t.Errorf("log = %q, want %q", got, "first\nsecond\n")
	}
}

// Not parallel: it sets an agent environment variable that must not leak.
func TestEnvAndDirArePassed(t *testing.T) {
	t.Setenv("RUNNER_TEST_AGENT_ONLY", "leaked")
	spec := shSpec(t, `echo "foo=$FOO"; echo "agent=$RUNNER_TEST_AGENT_ONLY"; pwd`)
	spec.Env = append(spec.Env, "FOO=bar")
	waitDone(t, start(t, spec))

	dir, err := filepath.EvalSymlinks(spec.Dir)
	if err != nil {
		t.Fatalf("working dir was not created: %v", err)
	}
	want := "foo=bar\nagent=\n" + dir + "\n"
	if got := readLog(t, spec); got != want {
		t.Errorf("log = %q, want %q", got, want)
	}
}

func TestStartFailures(t *testing.T) {
	notExec := filepath.Join(t.TempDir(), "not-executable")
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name    string
		command []string
		want    error
	}{
		{"an empty command fails with ErrEmptyCommand", nil, ErrEmptyCommand},
		{"an empty program name fails with ErrEmptyCommand", []string{""}, ErrEmptyCommand},
		{"a command not found fails with ErrStart", []string{"runner-test-no-such-command"}, ErrStart},
		{"a file that is not executable fails with ErrStart", []string{notExec}, ErrStart},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			spec := shSpec(t, "")
			spec.Command = c.command
			p, err := Start(spec)
			if !errors.Is(err, c.want) {
				t.Fatalf("Start error = %v, want %v", err, c.want)
			}
			if p != nil {
				t.Errorf("Start returned a process with error %v", err)
			}
			t.Logf("error: %v", err)
		})
	}
}

func TestNotFoundKeepsOSMessageAndLeavesNoLog(t *testing.T) {
	t.Parallel()
	spec := shSpec(t, "")
	spec.Command = []string{"runner-test-no-such-command"}
	_, err := Start(spec)
	if !errors.Is(err, exec.ErrNotFound) {
		t.Errorf("error %v does not wrap exec.ErrNotFound", err)
	}
	if _, statErr := os.Stat(spec.LogPath); !errors.Is(statErr, os.ErrNotExist) {
		t.Errorf("log file exists after a failed start: %v", statErr)
	}
}

func TestCommandIsLookedUpInSpecPath(t *testing.T) {
	t.Parallel()
	bin := t.TempDir()
	script := filepath.Join(bin, "runner-test-hello")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho hello\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	spec := shSpec(t, "")
	spec.Command = []string{"runner-test-hello"}
	spec.Env = []string{"PATH=" + bin + ":" + os.Getenv("PATH")}
	if got := waitDone(t, start(t, spec)); got.Code != 0 {
		t.Fatalf("Exit = %+v", got)
	}
	if got := readLog(t, spec); got != "hello\n" {
		t.Errorf("log = %q", got)
	}
}

func TestStop(t *testing.T) {
	cases := []struct {
		name  string
		ready string // printed once the script is in place to receive signals
		body  string
		grace time.Duration
		want  string
	}{
		// A long grace: the verdict must not depend on how fast sh dies.
		{"a sleeping process is ended by SIGTERM", "", "sleep 60", wait, "SIGTERM"},
		// A short grace: SIGKILL is the only way out, however slow the machine.
		{"a process that ignores SIGTERM is ended by SIGKILL after grace",
			"ready", `trap "" TERM; echo ready; sleep 60`, 200 * time.Millisecond, "SIGKILL"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			spec := shSpec(t, c.body)
			p := start(t, spec)
			if c.ready != "" {
				waitFor(t, "ready", func() bool {
					b, _ := os.ReadFile(spec.LogPath)
					return strings.Contains(string(b), c.ready)
				})
			}
			got := stop(t, p, c.grace)
			want := Exit{Code: -1, Signal: c.want, Message: "killed by " + c.want}
			if got != want {
				t.Errorf("Stop = %+v, want %+v", got, want)
			}
			if p.Exit() != got {
				t.Errorf("Exit() = %+v, Stop returned %+v", p.Exit(), got)
			}
			if GroupAlive(p.PID()) {
				t.Errorf("group %d alive after Stop", p.PID())
			}
		})
	}
}

func TestStopKillsGrandchildren(t *testing.T) {
	cases := []struct {
		name      string
		script    string
		afterDone bool
	}{
		{"a background grandchild is gone after Stop",
			`sleep 60 & echo $! > "$PIDFILE"; wait`, false},
		{"a grandchild left behind after a normal exit is killed by Stop after Done",
			`sleep 60 & echo $! > "$PIDFILE"`, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			spec := shSpec(t, c.script)
			pidfile := filepath.Join(t.TempDir(), "pid")
			spec.Env = append(spec.Env, "PIDFILE="+pidfile)
			p := start(t, spec)
			grandchild := readPID(t, pidfile)
			t.Cleanup(func() { syscall.Kill(grandchild, syscall.SIGKILL) })
			if c.afterDone {
				if got := waitDone(t, p); got.Code != 0 {
					t.Fatalf("Exit = %+v, want code 0", got)
				}
				if err := syscall.Kill(grandchild, 0); err != nil {
					t.Fatalf("grandchild %d should outlive its parent until Stop: %v", grandchild, err)
				}
			}
			got := stop(t, p, 200*time.Millisecond)
			if c.afterDone && got.Code != 0 {
				t.Errorf("Stop after Done = %+v, want the original code 0", got)
			}
			waitProcessGone(t, grandchild)
		})
	}
}

func TestStopTwiceAndConcurrentlyIsSafe(t *testing.T) {
	t.Parallel()
	p := start(t, shSpec(t, "sleep 60"))
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()

	const n = 4
	exits := make([]Exit, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { exits[i], errs[i] = p.Stop(ctx, wait) })
	}
	wg.Wait()
	again, err := p.Stop(ctx, wait)
	exits, errs = append(exits, again), append(errs, err)
	p.KillGroup() // after the fact: a no-op, not a panic

	for i := range exits {
		if errs[i] != nil || exits[i].Signal != "SIGTERM" {
			t.Errorf("Stop #%d = %+v, %v; want SIGTERM, nil", i, exits[i], errs[i])
		}
	}
}

func TestStopWithEndedContextStillEscalates(t *testing.T) {
	t.Parallel()
	spec := shSpec(t, `trap "" TERM; echo ready; sleep 60`)
	p := start(t, spec)
	waitFor(t, "ready", func() bool {
		b, _ := os.ReadFile(spec.LogPath)
		return strings.Contains(string(b), "ready")
	})
	// The context is already over: Stop must not wait out the grace, yet
	// must still send SIGKILL. Whether the group is gone by the time it
	// looks is a race, so either answer is fine.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.Stop(ctx, time.Hour); err != nil && !errors.Is(err, ErrStopIncomplete) {
		t.Errorf("Stop error = %v, want nil or ErrStopIncomplete", err)
	}
	if got := waitDone(t, p); got.Signal != "SIGKILL" {
		t.Errorf("Exit = %+v, want SIGKILL", got)
	}
}

func TestGroupAlive(t *testing.T) {
	t.Parallel()
	if GroupAlive(0) || GroupAlive(-1) {
		t.Error("GroupAlive must be false for non-positive IDs")
	}
	p := start(t, shSpec(t, "sleep 60"))
	if !GroupAlive(p.PID()) {
		t.Errorf("GroupAlive(%d) = false for a running command", p.PID())
	}
	p.KillGroup()
	waitDone(t, p)
	waitFor(t, "group gone", func() bool { return !GroupAlive(p.PID()) })
}
