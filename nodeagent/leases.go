package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/gpusched/gpusched/nodeagent/gpu"
	"github.com/gpusched/gpusched/nodeagent/runner"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// logChunkSize bounds one LogChunk message.
const logChunkSize = 64 << 10

// leaseDir holds a lease's output.log and scratch/ directory.
func (a *Agent) leaseDir(id string) string { return filepath.Join(a.cfg.DataDir, "leases", id) }
func (a *Agent) logPath(id string) string  { return filepath.Join(a.leaseDir(id), "output.log") }
func (a *Agent) scratch(id string) string  { return filepath.Join(a.leaseDir(id), "scratch") }

// recoverLeases runs at start-up: commands of a previous agent process
// cannot be supervised any more, so they are killed and recorded as ended;
// the scheduler learns of it from the next hello.
func (a *Agent) recoverLeases() {
	for _, l := range a.state.Leases {
		if l.Started && !l.Exited {
			if l.PGID > 0 {
				_ = syscall.Kill(-l.PGID, syscall.SIGKILL)
			}
			l.Exited, l.Code, l.Message = true, -1, "agent restarted while the command was running"
		}
	}
	if err := a.state.save(a.cfg.DataDir); err != nil {
		a.log.Error("saving state", zap.Error(err))
	}
}

// leaseEnv is the command's environment: the agent's own, the job's, and
// what gpusched sets for every lease (these win).
func (a *Agent) leaseEnv(s *pb.StartLease) []string {
	env := os.Environ()
	for k, v := range s.GetEnv() {
		env = append(env, k+"="+v)
	}
	return append(env,
		"GPUSCHED_JOB_ID="+s.GetJobId(),
		"GPUSCHED_LEASE_ID="+s.GetLeaseId(),
		"GPUSCHED_NODE_ID="+a.cfg.NodeID,
		"GPUSCHED_NODE_RANK="+strconv.Itoa(int(s.GetRank())),
		"GPUSCHED_NUM_NODES="+strconv.Itoa(len(s.GetNodes())),
		"GPUSCHED_NODES="+strings.Join(s.GetNodes(), ","),
		"GPUSCHED_MASTER_ADDR="+s.GetMasterAddr(),
		"GPUSCHED_SCRATCH_DIR="+a.scratch(s.GetLeaseId()),
		"CUDA_VISIBLE_DEVICES="+a.inventory.VisibleDevices(),
	)
}

// validLeaseID accepts IDs that are safe as one path segment under the
// data dir; the scheduler's "<job>.<attempt>" always is.
func validLeaseID(id string) bool {
	return id != "" && !strings.ContainsAny(id, `/\`) && !strings.HasPrefix(id, ".")
}

// startLease runs the node's part of a lease.
func (a *Agent) startLease(s *pb.StartLease) {
	id := s.GetLeaseId()
	log := a.log.With(zap.String("lease_id", id), zap.String("job_id", s.GetJobId()))
	if !validLeaseID(id) {
		log.Error("refusing StartLease with an invalid lease id")
		return
	}
	a.mu.Lock()
	if _, dup := a.state.Leases[id]; dup {
		a.mu.Unlock()
		return // a re-sent command; the scheduler learns progress from the hello
	}
	l := &heldLease{ID: id, JobID: s.GetJobId(), Rank: int(s.GetRank())}
	var busy string
	for other := range a.state.Leases {
		busy = other
	}
	if busy != "" {
		// Exclusivity is the scheduler's promise; the agent double-checks.
		// The refused lease is reported but never held: held, it would
		// keep the node refusing leases after busy's release and could be
		// named as the holder in the next refusal.
		a.exitLocked(l, runner.Exit{Code: -1, Message: "node still holds lease " + busy})
		a.mu.Unlock()
		log.Error("refusing second lease", zap.String("held", busy))
		return
	}
	a.mu.Unlock()

	// Only this goroutine (the stream's reader) starts leases, so the node
	// is still free once the check is done.
	if fresh, all := a.preLeaseProblems(); len(all) > 0 {
		why := "pre-lease check failed: " + strings.Join(all, "; ")
		log.Warn("pre-lease check failed", zap.Strings("problems", all))
		// The event and the verdict go first, so the scheduler knows why
		// before it sees the exit.
		a.event(&pb.NodeEvent{
			Kind: pb.NodeEventKind_NODE_EVENT_KIND_PRE_LEASE_CHECK_FAILED, Gpu: gpu.NodeProblem,
			LeaseId: id, Action: "refused", Message: why,
		})
		a.markUnhealthy(fresh)
		a.mu.Lock()
		a.state.Leases[id] = l
		a.exitLocked(l, runner.Exit{Code: -1, Message: why})
		a.mu.Unlock()
		return
	}

	a.mu.Lock()
	a.state.Leases[id] = l
	proc, err := runner.Start(runner.Spec{
		Command: s.GetCommand(), Env: a.leaseEnv(s), Dir: a.scratch(id), LogPath: a.logPath(id),
	})
	if err != nil {
		code := 127
		if errors.Is(err, runner.ErrLog) {
			code = -1
		}
		a.exitLocked(l, runner.Exit{Code: code, Message: err.Error()})
		a.mu.Unlock()
		log.Warn("command did not start", zap.Error(err))
		return
	}
	l.Started, l.PGID = true, proc.PID()
	a.procs[id] = proc
	a.saveLocked()
	// On a simulated node the command "uses" every GPU while it runs, as a
	// training job would: the mock's load follows it.
	a.sim.add(-1, uint32(proc.PID()))
	a.mu.Unlock()
	log.Info("command started", zap.Int("pid", proc.PID()))
	a.notify(&pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseStarted{LeaseStarted: &pb.LeaseStarted{LeaseId: id, Pid: int32(proc.PID())}}})

	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		<-proc.Done()
		a.sim.remove(uint32(proc.PID()))
		x := proc.Exit()
		a.mu.Lock()
		if a.shuttingDown {
			x.Message = "stopped because the node agent shut down"
		}
		a.exitLocked(l, x)
		a.mu.Unlock()
		log.Info("command exited", zap.Int("exit_code", x.Code), zap.String("signal", x.Signal))
	}()
}

// exitLocked records an exit durably and reports it. Called with a.mu held.
func (a *Agent) exitLocked(l *heldLease, x runner.Exit) {
	if l.Exited {
		return
	}
	l.Exited, l.Code, l.Signal, l.Message = true, x.Code, x.Signal, x.Message
	a.saveLocked()
	msg := &pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseExited{LeaseExited: &pb.LeaseExited{
		LeaseId: l.ID, ExitCode: int32(x.Code), Signal: x.Signal, Message: x.Message,
	}}}
	if s := a.session; s != nil {
		select {
		case s.out <- msg:
		default:
		}
	}
}

func (a *Agent) saveLocked() {
	if err := a.state.save(a.cfg.DataDir); err != nil {
		a.log.Error("saving state", zap.Error(err))
	}
}

// releaseLease stops the lease's command if it still runs, cleans up, and
// reports the node clean (or not). It runs in the background so the stream
// keeps serving while a command takes its grace period to exit.
func (a *Agent) releaseLease(r *pb.ReleaseLease) {
	id := r.GetLeaseId()
	if !validLeaseID(id) {
		a.log.Error("refusing ReleaseLease with an invalid lease id", zap.String("lease_id", id))
		return
	}
	grace := a.cfg.StopGrace
	if g := r.GetGrace(); g != nil && g.CheckValid() == nil {
		grace = g.AsDuration()
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		clean, why, aborted := a.cleanup(id, grace)
		if aborted {
			// The agent is shutting down: the lease stays held, so the
			// next agent re-reports it and the scheduler releases it again.
			a.log.Info("cleanup interrupted by shutdown", zap.String("lease_id", id))
			return
		}
		if !clean {
			a.event(&pb.NodeEvent{
				Kind: pb.NodeEventKind_NODE_EVENT_KIND_CLEANUP_FAILED, Gpu: gpu.NodeProblem,
				LeaseId: id, Action: "reported unhealthy", Message: "cleanup after lease " + id + " failed: " + why,
			})
			a.markUnhealthy([]string{"node: cleanup after lease " + id + " failed: " + why})
		}
		a.mu.Lock()
		delete(a.state.Leases, id)
		delete(a.procs, id)
		a.saveLocked()
		a.mu.Unlock()
		a.log.Info("lease released", zap.String("lease_id", id), zap.Bool("clean", clean), zap.String("reason", r.GetReason()))
		a.notify(&pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseReleased{LeaseReleased: &pb.LeaseReleased{LeaseId: id, Clean: clean, Message: why}}})
	}()
}

// cleanup stops the process group, waits (at most CleanupTimeout) until
// NVML shows no GPU process and every GPU's memory back at its idle
// baseline, runs the cleanup hook, and wipes the lease's scratch space.
// Logs are kept for `gpusched logs`. aborted: the agent shut down first.
func (a *Agent) cleanup(id string, grace time.Duration) (clean bool, why string, aborted bool) {
	a.mu.Lock()
	proc := a.procs[id]
	_, held := a.state.Leases[id]
	otherHolds := !held && len(a.state.Leases) > 0
	a.mu.Unlock()
	if proc != nil {
		ctx, cancel := context.WithTimeout(context.Background(), grace+30*time.Second)
		_, err := proc.Stop(ctx, grace)
		cancel()
		if err != nil {
			return false, err.Error(), false
		}
	}
	wipe := func() string {
		if err := os.RemoveAll(a.scratch(id)); err != nil {
			return "wiping scratch: " + err.Error()
		}
		return ""
	}
	if otherHolds {
		// id never held the node (it was refused): the GPUs' processes
		// belong to the lease that does.
		if w := wipe(); w != "" {
			return false, w, false
		}
		return true, "", false
	}
	deadline := time.Now().Add(a.cfg.CleanupTimeout)
	why, aborted = a.waitGPUsIdle(deadline)
	if aborted {
		return false, "", true
	}
	if why == "" && held && a.cfg.CleanupHook != "" {
		if err := a.runHook(id, deadline); err != nil {
			why = "cleanup hook: " + err.Error()
			a.health.mu.Lock()
			a.health.hookFailed = id
			a.health.mu.Unlock()
		}
	}
	if w := wipe(); w != "" {
		why = strings.Join(slices.DeleteFunc([]string{why, w}, func(s string) bool { return s == "" }), "; ")
	}
	return why == "", why, false
}

// waitGPUsIdle polls until no GPU has a process and every GPU's memory is
// back at its idle baseline, or until deadline; it returns what was still
// wrong then ("" once idle), or aborted when the agent shuts down.
func (a *Agent) waitGPUsIdle(deadline time.Time) (why string, aborted bool) {
	start := time.Now()
	delay := 20 * time.Millisecond
	for {
		why = strings.Join(a.gpuLeftovers(), "; ")
		if why == "" {
			return "", false
		}
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Sprintf("after %v: %s", time.Since(start).Round(time.Millisecond), why), false
		}
		t := time.NewTimer(min(delay, left))
		select {
		case <-a.quit:
			t.Stop()
			return "", true
		case <-t.C:
		}
		delay = min(2*delay, 250*time.Millisecond)
	}
}

// gpuLeftovers is what keeps the GPUs from being idle: processes, and
// memory above the idle baseline.
func (a *Agent) gpuLeftovers() []string {
	a.sim.dropDead()
	procs, err := gpu.ListGPUProcesses(a.cfg.NVML)
	if err != nil {
		return []string{"listing GPU processes: " + err.Error()}
	}
	var out []string
	for g := range len(procs) {
		if pids := procs[g]; len(pids) > 0 {
			out = append(out, fmt.Sprintf("GPU %d still has processes %v", g, pids))
		}
	}
	if len(out) > 0 {
		return out // memory follows the processes; no need to read it yet
	}
	samples, err := gpu.ReadTelemetry(a.cfg.NVML)
	if err != nil {
		return []string{"reading GPU memory: " + err.Error()}
	}
	return a.fb.over(samples)
}

// hookOutputLimit bounds the hook output kept for the failure message.
const hookOutputLimit = 2048

// runHook runs the cleanup hook for lease under sh -c, in its own process
// group (killed as a whole when it overruns deadline or the agent shuts
// down, and once it is done, so nothing it started lingers).
func (a *Agent) runHook(lease string, deadline time.Time) error {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	go func() {
		select {
		case <-a.quit:
			cancel()
		case <-ctx.Done():
		}
	}()
	cmd := exec.CommandContext(ctx, "sh", "-c", a.cfg.CleanupHook)
	cmd.Env = append(os.Environ(), "GPUSCHED_LEASE_ID="+lease, "GPUSCHED_NODE_ID="+a.cfg.NodeID)
	cmd.Dir = a.cfg.DataDir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	var out tailBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if cmd.Process != nil {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		err = fmt.Errorf("did not finish in time: %w", err)
	}
	if tail := strings.TrimSpace(string(out.b)); tail != "" {
		err = fmt.Errorf("%w: %s", err, tail)
	}
	a.log.Warn("cleanup hook failed", zap.String("lease_id", lease), zap.Error(err))
	return err
}

// tailBuffer keeps the last hookOutputLimit bytes written to it.
type tailBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > hookOutputLimit {
		t.b = t.b[len(t.b)-hookOutputLimit:]
	}
	return len(p), nil
}

// sendLogs relays a lease's output file in chunks.
func (a *Agent) sendLogs(ctx context.Context, req *pb.FetchLogs) {
	// Log chunks wait for room on the stream (unlike notify): a dropped
	// chunk would silently corrupt the output.
	send := func(c *pb.LogChunk) {
		s := a.currentSession()
		if s == nil {
			return
		}
		select {
		case s.logSlots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		select {
		case s.out <- &pb.ConnectRequest{Msg: &pb.ConnectRequest_LogChunk{LogChunk: c}}:
		case <-ctx.Done():
		}
	}
	rid := req.GetRequestId()
	if !validLeaseID(req.GetLeaseId()) {
		send(&pb.LogChunk{RequestId: rid, Eof: true, Error: "invalid lease id"})
		return
	}
	f, err := os.Open(a.logPath(req.GetLeaseId()))
	switch {
	case errors.Is(err, os.ErrNotExist):
		if _, derr := os.Stat(a.leaseDir(req.GetLeaseId())); derr == nil || a.holds(req.GetLeaseId()) {
			send(&pb.LogChunk{RequestId: rid, Eof: true}) // ran, printed nothing
		} else {
			send(&pb.LogChunk{RequestId: rid, Eof: true, Error: "no logs for lease " + req.GetLeaseId() + " on this node"})
		}
		return
	case err != nil:
		send(&pb.LogChunk{RequestId: rid, Eof: true, Error: err.Error()})
		return
	}
	defer f.Close()
	if off := req.GetOffset(); off > 0 {
		if _, err := f.Seek(int64(min(off, math.MaxInt64)), io.SeekStart); err != nil {
			send(&pb.LogChunk{RequestId: rid, Eof: true, Error: err.Error()})
			return
		}
	}
	buf := make([]byte, logChunkSize)
	for ctx.Err() == nil {
		n, err := f.Read(buf)
		if n > 0 {
			send(&pb.LogChunk{RequestId: rid, Data: append([]byte(nil), buf[:n]...)})
		}
		if errors.Is(err, io.EOF) {
			send(&pb.LogChunk{RequestId: rid, Eof: true})
			return
		}
		if err != nil {
			send(&pb.LogChunk{RequestId: rid, Eof: true, Error: err.Error()})
			return
		}
	}
}

func (a *Agent) holds(id string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.state.Leases[id]
	return ok
}

// closeQuit tells waiting cleanups and hooks that the agent shuts down.
func (a *Agent) closeQuit() { a.quitOnce.Do(func() { close(a.quit) }) }

// stopAll stops every running command when the agent shuts down.
func (a *Agent) stopAll() {
	a.closeQuit()
	a.mu.Lock()
	a.shuttingDown = true
	procs := make([]*runner.Process, 0, len(a.procs))
	for _, p := range a.procs {
		procs = append(procs, p)
	}
	a.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), a.cfg.StopGrace+10*time.Second)
	defer cancel()
	var stopping sync.WaitGroup
	for _, p := range procs {
		stopping.Go(func() {
			if _, err := p.Stop(ctx, a.cfg.StopGrace); err != nil {
				a.log.Error("stopping command on shutdown", zap.Int("pid", p.PID()), zap.Error(err))
			}
		})
	}
	stopping.Wait()
	a.wg.Wait()
}
