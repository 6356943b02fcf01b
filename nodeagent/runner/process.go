package runner

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
)

// Process is a started command. Its methods are safe for concurrent use.
type Process struct {
	pid  int // also the process group ID: the command leads its own group
	done chan struct{}
	exit Exit // written once before done is closed
	// gone latches once the group is seen empty: it can never refill, and
	// not signalling it again avoids hitting a reused ID.
	gone atomic.Bool
}

// Start starts spec's command in its own process group with its output
// appended to spec.LogPath. It fails with ErrEmptyCommand, ErrStart or ErrLog.
func Start(spec Spec) (*Process, error) {
	if len(spec.Command) == 0 || spec.Command[0] == "" {
		return nil, ErrEmptyCommand
	}
	// Resolve before creating the log, so a typo leaves no empty log behind.
	path, err := lookPath(spec.Command[0], spec.Env)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrStart, err)
	}
	if spec.Dir != "" {
		if err := os.MkdirAll(spec.Dir, 0o755); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrStart, err)
		}
	}
	log, err := openLog(spec.LogPath)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrLog, err)
	}
	env := spec.Env
	if env == nil {
		env = []string{} // nil would make os/exec inherit the agent's env
	}
	cmd := &exec.Cmd{
		Path: path,
		Args: spec.Command,
		Env:  env,
		Dir:  spec.Dir,
		SysProcAttr: &syscall.SysProcAttr{
			Setpgid:   true,
			Pdeathsig: syscall.SIGKILL,
		},
	}
	if log != nil {
		// An *os.File is handed to the child as-is: no pipe, no copying
		// goroutine, so Wait cannot hang on a grandchild holding the output.
		cmd.Stdout, cmd.Stderr = log, log
	}

	p := &Process{done: make(chan struct{})}
	started := make(chan error, 1)
	go p.run(cmd, started)
	err = <-started
	if log != nil {
		log.Close() // the child has its own descriptor
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrStart, err)
	}
	return p, nil
}

// run starts and waits for cmd on one locked OS thread. Pdeathsig fires when
// the thread that forked the child exits, not the agent, so that thread must
// outlive the child: locking keeps the runtime from retiring or reusing it.
func (p *Process) run(cmd *exec.Cmd, started chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := cmd.Start(); err != nil {
		started <- err
		return
	}
	p.pid = cmd.Process.Pid
	started <- nil
	err := cmd.Wait()
	p.exit = exitFrom(cmd.ProcessState, err)
	close(p.done)
}

// PID returns the main process's ID, which is also its process group ID.
func (p *Process) PID() int { return p.pid }

// Done is closed once the main process has exited and been reaped. Its
// output needs no flushing: the command writes straight to the log file.
// Children it left behind may still be running; Stop kills them.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exit reports how the main process ended. It is the zero Exit until Done
// is closed.
func (p *Process) Exit() Exit {
	select {
	case <-p.done:
		return p.exit
	default:
		return Exit{}
	}
}

// KillGroup sends SIGKILL to the whole process group at once, without
// waiting; it is for agent shutdown.
func (p *Process) KillGroup() { p.signal(syscall.SIGKILL) }

// Stop sends SIGTERM to the process group and, if any member is left after
// grace, SIGKILL. It returns once the main process has exited and no live
// member of the group remains, or when ctx ends (SIGKILL is sent first if
// ctx ends within grace), with an error wrapping ErrStopIncomplete. It may be
// called at any time, twice or concurrently; after Done it still kills
// children the command left behind.
//
// ctx should carry a deadline: a process stuck in uninterruptible sleep
// (a wedged driver, say) survives SIGKILL.
func (p *Process) Stop(ctx context.Context, grace time.Duration) (Exit, error) {
	p.signal(syscall.SIGTERM)
	graceCtx, cancel := context.WithTimeout(ctx, grace)
	clean := p.waitGone(graceCtx)
	cancel()
	if !clean {
		p.signal(syscall.SIGKILL)
		clean = p.waitGone(ctx)
	}
	if clean {
		return p.exit, nil
	}
	select {
	case <-p.done:
		return p.exit, fmt.Errorf("%w: process group %d still has members: %w",
			ErrStopIncomplete, p.pid, ctx.Err())
	default:
		return Exit{Code: -1, Message: "still running"}, fmt.Errorf("%w: pid %d has not exited: %w",
			ErrStopIncomplete, p.pid, ctx.Err())
	}
}

// signal sends sig to the whole group unless it is known to be empty.
func (p *Process) signal(sig syscall.Signal) {
	if p.gone.Load() {
		return
	}
	if err := syscall.Kill(-p.pid, sig); err == syscall.ESRCH {
		p.gone.Store(true)
	}
}

// waitGone waits for the main process to be reaped and then polls until no
// live member of the group remains. It reports false if ctx ends first.
func (p *Process) waitGone(ctx context.Context) bool {
	select {
	case <-p.done:
	case <-ctx.Done():
		return false
	}
	// Members are not our children, so there is nothing to wait on but
	// polling; back off so a long grace does not burn CPU.
	delay := 5 * time.Millisecond
	for {
		p.reapGroup()
		if !p.groupAlive() {
			return true
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return !p.groupAlive()
		case <-t.C:
		}
		delay = min(2*delay, 100*time.Millisecond)
	}
}

func (p *Process) groupAlive() bool {
	if p.gone.Load() {
		return false
	}
	if !GroupAlive(p.pid) {
		p.gone.Store(true)
		return false
	}
	return true
}

// reapGroup reaps dead group members that are our own children, which
// orphans become when the agent is PID 1 or a child subreaper. Only called
// after Done: before that it could steal the main process's status from Wait.
func (p *Process) reapGroup() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-p.pid, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
	}
}
