package localcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Process is one process of a cluster: an etcd member, a scheduler replica
// or an agent. It runs in its own process group, and signals go to the
// whole group. Its methods are safe for concurrent use; Kill, Stop and
// Restart are serialised.
type Process struct {
	c       *Cluster
	name    string
	kind    string
	addr    string // etcd client URL or scheduler host:port; empty for agents
	args    []string
	logPath string

	op sync.Mutex // serialises Kill, Stop, Restart

	mu      sync.Mutex
	pid     int
	done    chan struct{} // closed once our child exited; nil if not our child
	exitErr error         // how our child exited, once done is closed
}

// Name returns the process's name, e.g. "scheduler-2".
func (p *Process) Name() string { return p.name }

// Kind returns KindEtcd, KindScheduler or KindAgent.
func (p *Process) Kind() string { return p.kind }

// Addr returns where the process serves: an etcd member's client URL or a
// scheduler's host:port. It is empty for agents.
func (p *Process) Addr() string { return p.addr }

// Args returns the command line after the binary.
func (p *Process) Args() []string { return append([]string(nil), p.args...) }

// LogPath returns the file that receives the process's stdout and stderr.
// Every start appends to it, after a header line.
func (p *Process) LogPath() string { return p.logPath }

// PID returns the process ID of the latest start (also its process group
// ID), or 0 if it was never started.
func (p *Process) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// Running reports whether the process runs (a paused process runs).
func (p *Process) Running() bool {
	p.mu.Lock()
	pid, done := p.pid, p.done
	p.mu.Unlock()
	switch {
	case pid == 0:
		return false
	case done != nil:
		select {
		case <-done:
			return false
		default:
			return true
		}
	default: // not our child: found through cluster.json
		return p.isOurs(pid)
	}
}

// isOurs reports whether pid is alive and runs this process's command line,
// so that a recycled PID is never signalled.
func (p *Process) isOurs(pid int) bool {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false // gone (a zombie's cmdline is empty, too)
	}
	want := strings.Join(append([]string{p.c.binary}, p.args...), "\x00") + "\x00"
	return bytes.Equal(cmdline, []byte(want))
}

// start starts the process; the caller made sure it does not run.
func (p *Process) start() error {
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("localcluster: %s: %w", p.name, err)
	}
	defer logf.Close() // the child has its own descriptor
	fmt.Fprintf(logf, "--- localcluster: %s starting at %s: %s %s\n", p.name,
		time.Now().Format(time.RFC3339Nano), p.c.binary, strings.Join(p.args, " "))
	cmd := exec.Command(p.c.binary, p.args...)
	cmd.Dir = p.c.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group: terminal signals to the launcher do not reach
	// it, it outlives the launcher, and Kill reaches all of it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("localcluster: start %s: %w", p.name, err)
	}
	done := make(chan struct{})
	p.mu.Lock()
	p.pid, p.done, p.exitErr = cmd.Process.Pid, done, nil
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.exitErr = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

// signal sends sig to the process group if the process runs.
func (p *Process) signal(sig syscall.Signal) error {
	if !p.Running() {
		return nil
	}
	pid := p.PID()
	if err := syscall.Kill(-pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("localcluster: %s to %s (pgid %d): %w", sig, p.name, pid, err)
	}
	return nil
}

// waitExit waits up to d for the process to exit and reports whether it did.
func (p *Process) waitExit(d time.Duration) bool {
	p.mu.Lock()
	done := p.done
	p.mu.Unlock()
	if done != nil {
		select {
		case <-done:
			return true
		case <-time.After(d):
			return false
		}
	}
	deadline := time.Now().Add(d)
	for p.Running() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// Kill sends SIGKILL to the process group and waits until the process is
// gone. Killing a process that does not run is not an error.
func (p *Process) Kill() error {
	p.op.Lock()
	defer p.op.Unlock()
	return p.kill()
}

func (p *Process) kill() error {
	if err := p.signal(syscall.SIGKILL); err != nil {
		return err
	}
	if !p.waitExit(stopGrace) {
		return fmt.Errorf("localcluster: %s (pid %d) survived SIGKILL", p.name, p.PID())
	}
	return nil
}

// Stop sends SIGTERM to the process group (and SIGCONT, in case it is
// paused), waits up to 10s and then sends SIGKILL. It returns once the
// process is gone; the error says if it needed SIGKILL or exited with an
// error. Stopping a process that does not run is not an error.
func (p *Process) Stop() error {
	p.op.Lock()
	defer p.op.Unlock()
	return p.stop()
}

func (p *Process) stop() error {
	if !p.Running() {
		return nil
	}
	if err := p.signal(syscall.SIGTERM); err != nil {
		return err
	}
	_ = p.signal(syscall.SIGCONT)
	if !p.waitExit(stopGrace) {
		if err := p.kill(); err != nil {
			return err
		}
		return fmt.Errorf("localcluster: %s did not exit within %s of SIGTERM; killed", p.name, stopGrace)
	}
	p.mu.Lock()
	err := p.exitErr
	p.mu.Unlock()
	if err != nil {
		return fmt.Errorf("localcluster: %s exited after SIGTERM: %w (log: %s)", p.name, err, p.logPath)
	}
	return nil
}

// Pause stops the process group with SIGSTOP: the process keeps its
// sockets but answers nothing, like a hung machine.
func (p *Process) Pause() error { return p.signal(syscall.SIGSTOP) }

// Resume continues a paused process group with SIGCONT.
func (p *Process) Resume() error { return p.signal(syscall.SIGCONT) }

// Restart starts the process again with the same command line, so the same
// ports and data dir. A running process is stopped first (see Stop).
// Restart does not wait for the process to serve; call WaitReady for that.
func (p *Process) Restart() error {
	p.op.Lock()
	defer p.op.Unlock()
	if err := p.stop(); err != nil {
		return err
	}
	if err := p.start(); err != nil {
		return err
	}
	return p.c.saveState()
}

// WaitReady waits until the process serves: an etcd member answers a
// linearizable read, a scheduler accepts TCP connections on its address,
// and an agent runs. It fails at once if the process exits, and after the
// cluster's StartTimeout (or when ctx ends).
func (p *Process) WaitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, p.c.timeout)
	defer cancel()
	var (
		check func(context.Context) error
		cli   *clientv3.Client
	)
	switch p.kind {
	case KindEtcd:
		var err error
		cli, err = clientv3.New(clientv3.Config{Endpoints: []string{p.addr}, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			return fmt.Errorf("localcluster: %s: %w", p.name, err)
		}
		defer cli.Close()
		check = func(ctx context.Context) error {
			_, err := cli.Get(ctx, "/localcluster-health") // linearizable: needs a quorum
			return err
		}
	case KindScheduler:
		check = func(ctx context.Context) error {
			var d net.Dialer
			conn, err := d.DialContext(ctx, "tcp", hostPort(p.addr))
			if err == nil {
				conn.Close()
			}
			return err
		}
	default:
		check = func(context.Context) error { return nil }
	}
	var last error
	for {
		if !p.Running() {
			return p.exitedError()
		}
		cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
		last = check(cctx)
		ccancel()
		if last == nil {
			if !p.Running() { // an agent may fail right after it started
				return p.exitedError()
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("localcluster: %s not ready: %v (last check: %v)\n%s", p.name, ctx.Err(), last, p.logTail())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// exitedError describes an unexpected exit, with the end of the log.
func (p *Process) exitedError() error {
	p.mu.Lock()
	exitErr := p.exitErr
	p.mu.Unlock()
	tail := p.logTail()
	err := fmt.Errorf("%w: %s (%v); end of %s:\n%s", ErrExited, p.name, exitErr, p.logPath, tail)
	if strings.Contains(tail, "address already in use") {
		err = fmt.Errorf("%w: %w", errPortTaken, err)
	}
	return err
}

// logTail returns the last lines of the log.
func (p *Process) logTail() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return strings.Join(lines, "\n")
}
