package nodeagent

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"go.uber.org/zap"

	"github.com/gpusched/gpusched/nodeagent/gpu"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Exclusivity: every TelemetryInterval the agent compares NVML's list of
// GPU processes (compute and graphics, every GPU) with the processes of the
// lease holding the node. Anything else is foreign; an idle node must have
// no GPU process at all.
//
// How a process is known to belong to the lease. The runner starts the
// lease's command as the leader of a new process group, so its PID is the
// group's ID (heldLease.PGID). A GPU process belongs to the lease if
//
//  1. it is in that process group (its pgrp, from /proc/<pid>/stat, is the
//     lease's PGID), which covers everything the command forks, even after
//     the command itself has exited and its children were re-parented; or
//  2. while the command's main process is alive, it descends from it:
//     walking the parent chain (ppid in /proc/<pid>/stat) up from the
//     process reaches the main process. This covers children that left
//     the group (setsid, setpgid: some launchers do) without leaving the
//     tree.
//
// Not covered: a process that left both, by leaving the group and being
// re-parented to init (a double fork after setsid). It is treated as
// foreign; cgroups (a per-lease cgroup holding every descendant, whatever it
// does) will close that gap. The agent must run in the host PID namespace:
// NVML reports host PIDs, and a PID the agent cannot see in /proc is taken
// for a process that has already exited.
//
// A foreign process is reported once (NodeEvent FOREIGN_PROCESS) and, under
// the kill policy, sent SIGTERM and, if still alive after ForeignKillGrace,
// SIGKILL; the monitor never waits for it. Only that PID is signalled,
// never its process group, which may be anyone's.

// holder is the lease holding the node, as exclusivity and telemetry see it.
type holder struct {
	id, job string
	// pgid is the lease's process group (its command's PID); 0 when the
	// command never started.
	pgid int
	// mainAlive: the command's main process still runs (ancestry counts).
	mainAlive bool
}

// holder returns the lease holding the node; the zero holder when idle. The
// agent holds at most one lease (startLease refuses a second).
func (a *Agent) holder() holder {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, l := range a.state.Leases {
		h := holder{id: l.ID, job: l.JobID}
		if l.Started {
			h.pgid = l.PGID
		}
		if p := a.procs[l.ID]; p != nil {
			select {
			case <-p.Done():
			default:
				h.mainAlive = true
			}
		}
		return h
	}
	return holder{}
}

// maxAncestry bounds the parent walk; real trees are far shallower.
const maxAncestry = 64

// owns reports whether the process pid, whose stat is st, belongs to the
// lease (see the rule above).
func (h holder) owns(pid int, st procStat) bool {
	if h.pgid <= 1 {
		return false
	}
	if pid == h.pgid || st.pgrp == h.pgid {
		return true
	}
	if !h.mainAlive {
		return false
	}
	for ppid, n := st.ppid, 0; ppid > 1 && n < maxAncestry; n++ {
		if ppid == h.pgid {
			return true
		}
		p, err := readStat(ppid)
		if err != nil {
			return false
		}
		ppid = p.ppid
	}
	return false
}

// procStat is what the agent reads from /proc/<pid>/stat.
type procStat struct {
	comm  string
	state byte
	ppid  int
	pgrp  int
	// start is the start time in clock ticks since boot: with the PID it
	// identifies a process, so a reused PID is never mistaken for it.
	start uint64
}

// dead reports a zombie: it runs nothing and holds no GPU memory, it only
// waits for its parent to reap it.
func (s procStat) dead() bool { return s.state == 'Z' || s.state == 'X' }

// errNoProcess: /proc has no such process (it exited and was reaped).
var errNoProcess = errors.New("no such process")

// readStat reads and parses /proc/<pid>/stat.
func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
			return procStat{}, errNoProcess
		}
		return procStat{}, err
	}
	// "pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
	// majflt cmajflt utime stime cutime cstime priority nice threads
	// itrealvalue starttime ...": comm may hold spaces and parentheses,
	// so split after the last ')'.
	open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return procStat{}, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	f := bytes.Fields(b[end+1:])
	if len(f) < 20 || len(f[0]) == 0 {
		return procStat{}, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	st := procStat{comm: string(b[open+1 : end]), state: f[0][0]}
	st.ppid, _ = strconv.Atoi(string(f[1]))
	st.pgrp, _ = strconv.Atoi(string(f[2]))
	st.start, _ = strconv.ParseUint(string(f[19]), 10, 64)
	return st, nil
}

// foreignProc is a foreign process already reported.
type foreignProc struct {
	start uint64
	// termAt is when SIGTERM was sent (kill policy); zero when only
	// reported.
	termAt time.Time
	killed bool // SIGKILL sent
}

// excl is exclusivity's memory between rounds (monitor goroutine only).
type excl struct {
	seen map[uint32]*foreignProc
}

// checkExclusivity runs one round over NVML's process lists.
func (a *Agent) checkExclusivity(ex *excl, h holder, procs map[int][]uint32, now time.Time) {
	var onGPUs map[uint32][]int // pid -> GPU indices, only when needed
	for g := range len(procs) {
		for _, pid := range procs[g] {
			if onGPUs == nil {
				onGPUs = map[uint32][]int{}
			}
			onGPUs[pid] = append(onGPUs[pid], g)
		}
	}
	for pid, gpus := range onGPUs {
		st, err := readStat(int(pid))
		switch {
		case errors.Is(err, errNoProcess) || (err == nil && st.dead()):
			// Gone: the driver drops it by itself; the simulated one is
			// told to, as a real one would.
			a.sim.remove(pid)
			continue
		case err != nil:
			a.log.Warn("reading a GPU process", zap.Uint32("pid", pid), zap.Error(err))
			continue
		case h.owns(int(pid), st):
			continue
		}
		if f := ex.seen[pid]; f != nil && f.start == st.start {
			continue // reported already
		}
		ex.seen[pid] = a.foreign(h, pid, st, gpus, now)
	}
	// Follow up: SIGKILL what outlived its grace; forget what is gone (or
	// off the GPUs, when it was only reported).
	for pid, f := range ex.seen {
		st, err := readStat(int(pid))
		if err != nil || st.dead() || st.start != f.start {
			delete(ex.seen, pid)
			continue
		}
		if _, listed := onGPUs[pid]; !listed && f.termAt.IsZero() {
			delete(ex.seen, pid)
			continue
		}
		if !f.termAt.IsZero() && !f.killed && now.Sub(f.termAt) >= a.cfg.ForeignKillGrace {
			f.killed = true
			if err := syscall.Kill(int(pid), syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				a.log.Warn("SIGKILL of a foreign GPU process failed", zap.Uint32("pid", pid), zap.Error(err))
			}
		}
	}
}

// foreign handles a newly found foreign process: the event, and SIGTERM
// under the kill policy.
func (a *Agent) foreign(h holder, pid uint32, st procStat, gpus []int, now time.Time) *foreignProc {
	f := &foreignProc{start: st.start}
	where := "GPU " + strconv.Itoa(gpus[0])
	if len(gpus) > 1 {
		where = "GPUs " + joinInts(gpus)
	}
	why := "on an idle node"
	if h.id != "" {
		why = "not part of lease " + h.id
	}
	action, what := "reported", "reported only (foreign process policy "+ForeignReport+")"
	if a.cfg.ForeignProcessPolicy == ForeignKill {
		if int(pid) == os.Getpid() || pid <= 1 {
			what = "not killed: it is the node agent itself or init"
		} else if err := syscall.Kill(int(pid), syscall.SIGTERM); err == nil || errors.Is(err, syscall.ESRCH) {
			f.termAt = now
			action = "killed"
			what = fmt.Sprintf("sent SIGTERM, SIGKILL after %v", a.cfg.ForeignKillGrace)
		} else {
			what = "could not be killed: " + err.Error()
		}
	}
	msg := fmt.Sprintf("process %d (%s) on %s, %s: %s", pid, st.comm, where, why, what)
	a.log.Warn("foreign GPU process", zap.Uint32("pid", pid), zap.String("comm", st.comm),
		zap.Ints("gpus", gpus), zap.String("lease_id", h.id), zap.String("action", action))
	a.event(&pb.NodeEvent{
		Kind: pb.NodeEventKind_NODE_EVENT_KIND_FOREIGN_PROCESS, Gpu: int32(gpus[0]),
		LeaseId: h.id, Pid: pid, Action: action, Message: msg,
	})
	return f
}

func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ",")
}

// simDriver keeps a simulated node's GPU process lists in step with real
// processes, as a driver would: a lease's command is listed on every GPU
// while it runs (so the mock's load follows the job and exclusivity sees the
// lease's own process), processes registered by MockInject are added, and
// dead processes are dropped. Every change is a read-modify-write of one
// GPU's list under mu, so PIDs put there by anyone else (injection, tests)
// are never clobbered. A nil *simDriver (real NVML) does nothing.
type simDriver struct {
	mu   sync.Mutex
	m    *gpu.Mock
	gpus int
}

// list returns GPU g's processes as the mock reports them.
func (d *simDriver) list(g int) []uint32 {
	dev, ret := d.m.NVML().DeviceGetHandleByIndex(g)
	if ret != nvml.SUCCESS {
		return nil
	}
	infos, _ := dev.GetComputeRunningProcesses()
	pids := make([]uint32, 0, len(infos))
	for _, p := range infos {
		pids = append(pids, p.Pid)
	}
	return pids
}

// add lists pid on GPU g (every GPU for g < 0).
func (d *simDriver) add(g int, pid uint32) {
	if d == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range d.gpus {
		if g >= 0 && i != g {
			continue
		}
		if pids := d.list(i); !slices.Contains(pids, pid) {
			d.m.SetProcesses(i, append(pids, pid))
		}
	}
}

// remove drops pid from every GPU that lists it.
func (d *simDriver) remove(pid uint32) {
	if d == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range d.gpus {
		if pids := d.list(i); slices.Contains(pids, pid) {
			d.m.SetProcesses(i, slices.DeleteFunc(pids, func(p uint32) bool { return p == pid }))
		}
	}
}

// dropDead drops every listed process that has exited (or is a zombie).
func (d *simDriver) dropDead() {
	if d == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range d.gpus {
		pids := d.list(i)
		live := slices.DeleteFunc(slices.Clone(pids), func(p uint32) bool {
			st, err := readStat(int(p))
			return errors.Is(err, errNoProcess) || (err == nil && st.dead())
		})
		if len(live) != len(pids) {
			d.m.SetProcesses(i, live)
		}
	}
}

// clear resets GPU g (every GPU for g < 0): faults and processes gone.
func (d *simDriver) clear(g int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if g < 0 {
		d.m.Clear()
	} else {
		d.m.ClearGPU(g)
	}
}
