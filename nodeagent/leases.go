package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
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
	a.mu.Unlock()
	log.Info("command started", zap.Int("pid", proc.PID()))
	a.notify(&pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseStarted{LeaseStarted: &pb.LeaseStarted{LeaseId: id, Pid: int32(proc.PID())}}})

	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		<-proc.Done()
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
		clean, why := a.cleanup(id, grace)
		a.mu.Lock()
		delete(a.state.Leases, id)
		delete(a.procs, id)
		a.saveLocked()
		a.mu.Unlock()
		a.log.Info("lease released", zap.String("lease_id", id), zap.Bool("clean", clean), zap.String("reason", r.GetReason()))
		a.notify(&pb.ConnectRequest{Msg: &pb.ConnectRequest_LeaseReleased{LeaseReleased: &pb.LeaseReleased{LeaseId: id, Clean: clean, Message: why}}})
	}()
}

// cleanup stops the process group, checks that no GPU process is left and
// wipes the lease's scratch space. Logs are kept for `gpusched logs`.
func (a *Agent) cleanup(id string, grace time.Duration) (bool, string) {
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
			return false, err.Error()
		}
	}
	if err := os.RemoveAll(a.scratch(id)); err != nil {
		return false, "wiping scratch: " + err.Error()
	}
	if otherHolds {
		// id never held the node (it was refused): the GPUs' processes
		// belong to the lease that does.
		return true, ""
	}
	procs, err := gpu.ListGPUProcesses(a.cfg.NVML)
	if err != nil {
		return false, "listing GPU processes: " + err.Error()
	}
	for idx, pids := range procs {
		if len(pids) > 0 {
			return false, fmt.Sprintf("GPU %d still has processes %v", idx, pids)
		}
	}
	return true, ""
}

// sendLogs relays a lease's output file in chunks.
func (a *Agent) sendLogs(ctx context.Context, req *pb.FetchLogs) {
	// Log chunks wait for room on the stream (unlike notify): a dropped
	// chunk would silently corrupt the output.
	send := func(c *pb.LogChunk) {
		a.mu.Lock()
		s := a.session
		a.mu.Unlock()
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

// stopAll stops every running command when the agent shuts down.
func (a *Agent) stopAll() {
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
