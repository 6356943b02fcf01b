package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpusched/gpusched/nodeagent/gpu"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Health. The agent keeps a verdict on its node, healthy or not with the
// problems why, and reports it (HealthReport) when it changes, after each
// re-check of an unhealthy node, and after every Welcome, so a new leader
// learns it. The agent only reports: whether a running lease is stopped,
// and when the node takes leases again, is the scheduler's decision.
//
// What makes the node unhealthy:
//   - a fatal XID (gpu.ClassifyXID; an ECC double-bit error is XID 48),
//     from the XID watcher. Application XIDs are recorded as events only;
//   - a failed pre-lease check (startLease);
//   - a failed cleanup after a lease (releaseLease).
//
// What makes it healthy again: a re-check, every HealthRecheckInterval
// while unhealthy and at once after a MockInject clear, that finds no
// problem: gpu.CheckHealth passes (GPUs present, temperatures at most
// MaxGPUTempC, no double-bit ECC error, no row remapping pending or
// failed); no fatal XID is unresolved (on the mock: no fatal fault is
// listed by Mock.Faults; on real NVML: none arrived since the previous
// check); no GPU process is foreign (exclusivity.go), and when no lease
// holds the node none is left at all and memory is back at its idle
// baseline; and a cleanup hook that failed passes when run again. The
// recovery is reported with a healthy HealthReport (the scheduler records
// the RECOVERED event when it returns the node to service).
//
// A fatal XID is not sticky on real NVML by itself: the node recovers on
// the second re-check after the last one unless NVML still shows the damage
// (a lost GPU fails CheckHealth, an ECC error its DBE count until a reset,
// XIDs 63/64 a pending or failed row remap).

// health is the node's verdict, guarded by mu. Reports are sent with mu
// held so they leave in the order the verdicts were reached. Lock order:
// health.mu before Agent.mu (notify), never the other way round.
type health struct {
	mu       sync.Mutex
	healthy  bool
	problems []string
	// gen counts the times the node was found unhealthy, so a re-check
	// racing with a new fault does not declare the node healthy.
	gen uint64
	// fatalSince lists the fatal XIDs since the last re-check (what fails
	// the next one on real NVML).
	fatalSince []string
	// hookFailed is the lease whose cleanup hook failed, until the hook
	// passes on a re-check.
	hookFailed string
	lastXID    []uint64 // per GPU, for telemetry
}

func (h *health) init(gpus int) {
	h.healthy = true
	h.lastXID = make([]uint64, gpus)
}

// lastXIDs returns a copy of the last XID seen on each GPU.
func (h *health) lastXIDs() []uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.lastXID)
}

// Healthy reports the agent's current verdict on its node and the problems
// behind it.
func (a *Agent) Healthy() (bool, []string) {
	a.health.mu.Lock()
	defer a.health.mu.Unlock()
	return a.health.healthy, slices.Clone(a.health.problems)
}

// event sends a node event, stamped with the time and node.
func (a *Agent) event(ev *pb.NodeEvent) {
	ev.Time, ev.Node = timestamppb.Now(), a.cfg.NodeID
	a.notify(&pb.ConnectRequest{Msg: &pb.ConnectRequest_NodeEvent{NodeEvent: ev}})
}

// reportHealth sends the current verdict.
func (a *Agent) reportHealth() {
	a.health.mu.Lock()
	defer a.health.mu.Unlock()
	a.reportHealthLocked()
}

func (a *Agent) reportHealthLocked() {
	a.notify(&pb.ConnectRequest{Msg: &pb.ConnectRequest_Health{Health: &pb.HealthReport{
		Healthy: a.health.healthy, Problems: slices.Clone(a.health.problems),
	}}})
}

// markUnhealthy adds problems to the verdict and reports it.
func (a *Agent) markUnhealthy(problems []string) {
	a.health.mu.Lock()
	defer a.health.mu.Unlock()
	a.health.gen++
	if a.health.healthy {
		a.log.Warn("node unhealthy", zap.Strings("problems", problems))
	}
	a.health.healthy = false
	a.health.problems = mergeProblems(a.health.problems, problems)
	a.reportHealthLocked()
}

// mergeProblems appends the problems of b not already in a.
func mergeProblems(a, b []string) []string {
	for _, p := range b {
		if !slices.Contains(a, p) {
			a = append(a, p)
		}
	}
	return a
}

// gpuProblem formats a problem of GPU i (gpu.NodeProblem: the node).
func gpuProblem(i int, format string, args ...any) string {
	return gpu.Problem{GPU: i, What: fmt.Sprintf(format, args...)}.String()
}

// initialHealth sets the verdict before the agent first connects, from a
// full check; it is reported after the Welcome.
func (a *Agent) initialHealth() {
	problems, _ := a.nodeProblems(nil, "")
	if len(problems) == 0 {
		return
	}
	a.health.mu.Lock()
	defer a.health.mu.Unlock()
	a.health.healthy, a.health.problems = false, problems
	a.health.gen++
	a.log.Warn("node unhealthy at start", zap.Strings("problems", problems))
}

// healthLoop re-checks an unhealthy node every HealthRecheckInterval, and
// whenever asked to (requestRecheck), until ctx ends.
func (a *Agent) healthLoop(ctx context.Context) {
	tick := time.NewTicker(a.cfg.HealthRecheckInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-a.recheck:
		}
		a.recheckHealth()
	}
}

// requestRecheck asks healthLoop for a re-check now.
func (a *Agent) requestRecheck() {
	select {
	case a.recheck <- struct{}{}:
	default:
	}
}

// recheckHealth checks an unhealthy node again and reports the verdict;
// a healthy node is left alone.
func (a *Agent) recheckHealth() {
	a.health.mu.Lock()
	if a.health.healthy {
		a.health.mu.Unlock()
		return
	}
	gen, fatal, hook := a.health.gen, a.health.fatalSince, a.health.hookFailed
	a.health.fatalSince = nil
	a.health.mu.Unlock()

	// Checked without the lock: a hook may take a while.
	problems, hookOK := a.nodeProblems(fatal, hook)

	a.health.mu.Lock()
	defer a.health.mu.Unlock()
	if hookOK && a.health.hookFailed == hook {
		a.health.hookFailed = ""
	}
	if a.health.gen != gen {
		// Something new went wrong meanwhile: its problems stand too.
		problems = mergeProblems(slices.Clone(a.health.problems), problems)
	}
	if len(problems) > 0 {
		a.health.problems = problems
		a.reportHealthLocked()
		return
	}
	a.health.healthy, a.health.problems = true, nil
	a.log.Info("node recovered")
	// The scheduler records the RECOVERED (and UNHEALTHY) events itself,
	// when it changes the node's state on this report.
	a.reportHealthLocked()
}

// nodeProblems is the full health check (see the comment at the top);
// fatal are the fatal XIDs seen since the last check (real NVML), hook a
// lease whose cleanup hook failed and is run again. hookOK reports that
// the hook, if run, passed.
func (a *Agent) nodeProblems(fatal []string, hook string) (problems []string, hookOK bool) {
	for _, p := range gpu.CheckHealth(a.cfg.NVML, a.inventory.GPUCount, a.cfg.MaxGPUTempC) {
		problems = append(problems, p.String())
	}
	if a.cfg.Mock != nil {
		problems = mergeProblems(problems, a.mockFatalFaults())
	} else {
		problems = mergeProblems(problems, fatal)
	}
	problems = append(problems, a.gpuUseProblems()...)
	if hook != "" {
		if err := a.runHook(hook, time.Now().Add(a.cfg.CleanupTimeout)); err != nil {
			problems = append(problems, "cleanup hook after lease "+hook+": "+err.Error())
		} else {
			hookOK = true
		}
	}
	return problems, hookOK
}

// xidProblem is the problem a fatal XID stands for. The same words from
// the watcher and from re-checks keep the verdict's reason unchanged while
// the fault lasts (the scheduler records each new reason as an event).
func xidProblem(g int, xid uint64) string {
	return gpuProblem(g, "XID %d (%s)", xid, gpu.ClassifyXID(xid))
}

// mockFatalFaults lists the simulated node's unresolved fatal faults.
func (a *Agent) mockFatalFaults() []string {
	var out []string
	for _, f := range a.cfg.Mock.Faults() {
		if gpu.ClassifyXID(f.XID) == gpu.SeverityFatal {
			out = mergeProblems(out, []string{xidProblem(f.GPU, f.XID)})
		}
	}
	return out
}

// gpuUseProblems is what must hold of the GPUs' use: no process that the
// lease holding the node does not own (on an idle node: no process at all),
// and, on an idle node, every GPU's memory back at its idle baseline.
func (a *Agent) gpuUseProblems() []string {
	a.sim.dropDead()
	procs, err := gpu.ListGPUProcesses(a.cfg.NVML)
	if err != nil {
		return []string{"node: listing GPU processes: " + err.Error()}
	}
	h := a.holder()
	var out []string
	for g := range len(procs) {
		var foreign []uint32
		for _, pid := range procs[g] {
			if st, err := readStat(int(pid)); err != nil || st.dead() || !h.owns(int(pid), st) {
				foreign = append(foreign, pid)
			}
		}
		switch {
		case len(foreign) == 0:
		case h.id == "":
			out = append(out, gpuProblem(g, "processes %v on an idle node", foreign))
		default:
			out = append(out, gpuProblem(g, "processes %v not part of lease %s", foreign, h.id))
		}
	}
	if h.id != "" {
		return out // the lease's own use of memory is its business
	}
	samples, err := gpu.ReadTelemetry(a.cfg.NVML)
	if err != nil {
		return append(out, "node: reading GPU memory: "+err.Error())
	}
	return append(out, a.fb.over(samples)...)
}

// preLeaseProblems is the check before a lease starts: the node is healthy
// (no unresolved fatal XID, no earlier failure pending), the expected GPUs
// are present and pass gpu.CheckHealth, and no GPU process runs at all.
// fresh are the problems found now; all adds the node's standing ones.
func (a *Agent) preLeaseProblems() (fresh, all []string) {
	for _, p := range gpu.CheckHealth(a.cfg.NVML, a.inventory.GPUCount, a.cfg.MaxGPUTempC) {
		fresh = append(fresh, p.String())
	}
	if a.cfg.Mock != nil {
		// The watcher may not have delivered a just-injected XID yet.
		fresh = mergeProblems(fresh, a.mockFatalFaults())
	}
	a.sim.dropDead()
	procs, err := gpu.ListGPUProcesses(a.cfg.NVML)
	if err != nil {
		fresh = append(fresh, "node: listing GPU processes: "+err.Error())
	}
	for g := range len(procs) {
		if pids := procs[g]; len(pids) > 0 {
			fresh = append(fresh, gpuProblem(g, "processes %v running before the lease", pids))
		}
	}
	healthy, standing := a.Healthy()
	if !healthy {
		all = append(all, "node unhealthy: "+strings.Join(standing, "; "))
	}
	return fresh, append(all, fresh...)
}

// watchXIDs starts the XID watcher; nil when the backend has no events
// (health then rests on the checks alone).
func (a *Agent) watchXIDs() *gpu.EventWatcher {
	w, err := gpu.WatchXIDs(a.cfg.NVML)
	if err != nil {
		a.log.Warn("XID events unavailable; health rests on periodic checks", zap.Error(err))
		return nil
	}
	if u := w.Unwatched(); len(u) > 0 {
		a.log.Warn("GPUs without XID events", zap.Ints("gpus", u))
	}
	return w
}

// xidWait bounds one wait for an XID, so the loop notices ctx.
const xidWait = 250 * time.Millisecond

// xidLoop turns XIDs into events and health until ctx ends, then closes w.
func (a *Agent) xidLoop(ctx context.Context, w *gpu.EventWatcher) {
	defer w.Close()
	var lastErr string
	for ctx.Err() == nil {
		ev, ok, err := w.Next(xidWait)
		switch {
		case errors.Is(err, gpu.ErrWatcherClosed):
			return
		case err != nil:
			if err.Error() != lastErr {
				lastErr = err.Error()
				a.log.Warn("waiting for XID events", zap.Error(err))
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		case ok:
			lastErr = ""
			a.onXID(ev)
		}
	}
}

// onXID records an XID: an event always; a fatal one makes the node
// unhealthy.
func (a *Agent) onXID(ev gpu.XIDEvent) {
	sev := gpu.ClassifyXID(ev.XID)
	kind := pb.NodeEventKind_NODE_EVENT_KIND_XID
	what := fmt.Sprintf("XID %d", ev.XID)
	if ev.XID == xidECCDoubleBit {
		kind, what = pb.NodeEventKind_NODE_EVENT_KIND_ECC_DBE, "uncorrectable (double-bit) ECC error, XID 48"
	}
	where := "an unknown GPU"
	if ev.GPU >= 0 {
		where = fmt.Sprintf("GPU %d", ev.GPU)
	}
	action, consequence := "recorded", "the node stays in service"
	problem := xidProblem(ev.GPU, ev.XID)
	if sev == gpu.SeverityFatal {
		action, consequence = "reported unhealthy", "the node is unhealthy until a health re-check passes"
	}
	a.health.mu.Lock()
	if ev.GPU >= 0 && ev.GPU < len(a.health.lastXID) {
		a.health.lastXID[ev.GPU] = ev.XID
	}
	if sev == gpu.SeverityFatal {
		a.health.fatalSince = append(a.health.fatalSince, problem)
	}
	a.health.mu.Unlock()

	a.log.Warn("XID", zap.Int("gpu", ev.GPU), zap.Uint64("xid", ev.XID), zap.Stringer("severity", sev))
	a.event(&pb.NodeEvent{
		Kind: kind, Gpu: int32(ev.GPU), LeaseId: a.holder().id, Xid: ev.XID, Action: action,
		Message: fmt.Sprintf("%s on %s, severity %s: %s", what, where, sev, consequence),
	})
	if sev == gpu.SeverityFatal {
		a.markUnhealthy([]string{problem})
	}
}

// xidECCDoubleBit is the XID of an uncorrectable ECC error.
const xidECCDoubleBit = 48

// errNotSimulated answers MockInject on real NVML.
const errNotSimulated = "not a simulated node: the nvml backend refuses fault injection"

// mockInject applies a MockInject to the simulated node.
func (a *Agent) mockInject(m *pb.MockInject) *pb.MockInjectResult {
	res := &pb.MockInjectResult{RequestId: m.GetRequestId()}
	if a.cfg.Mock == nil {
		res.Error = errNotSimulated
		return res
	}
	g, n := int(m.GetGpu()), a.inventory.GPUCount
	gpuErr := func() string {
		switch {
		case g == -1:
			return fmt.Sprintf("this fault needs a GPU index (0-%d)", n-1)
		case g < 0 || g >= n:
			return fmt.Sprintf("no GPU %d: the node has GPUs 0-%d", g, n-1)
		}
		return ""
	}
	log := a.log.With(zap.Uint64("request_id", m.GetRequestId()), zap.Int("gpu", g))
	switch f := m.GetFault().(type) {
	case *pb.MockInject_Xid:
		if res.Error = gpuErr(); res.Error == "" && f.Xid == 0 {
			res.Error = "XID 0 is not an XID"
		}
		if res.Error == "" {
			log.Info("injecting XID", zap.Uint64("xid", f.Xid))
			a.cfg.Mock.InjectXID(g, f.Xid)
		}
	case *pb.MockInject_EccDoubleBit:
		if res.Error = gpuErr(); res.Error == "" && !f.EccDoubleBit {
			res.Error = "ecc_double_bit must be true"
		}
		if res.Error == "" {
			log.Info("injecting an ECC double-bit error")
			a.cfg.Mock.InjectECCDoubleBit(g)
		}
	case *pb.MockInject_GpuProcess:
		pid := f.GpuProcess
		res.Error = gpuErr()
		if res.Error == "" {
			if err := syscall.Kill(int(pid), 0); pid == 0 || int(pid) < 0 || errors.Is(err, syscall.ESRCH) {
				res.Error = fmt.Sprintf("no process %d on node %s", pid, a.cfg.NodeID)
			}
		}
		if res.Error == "" {
			log.Info("registering a GPU process", zap.Uint32("pid", pid))
			a.sim.add(g, pid)
		}
	case *pb.MockInject_Clear:
		if g < -1 || g >= n {
			res.Error = gpuErr()
			break
		}
		log.Info("clearing injected faults and processes")
		a.sim.clear(g)
		// A running lease's command is not injected: list it again.
		if h := a.holder(); h.mainAlive {
			a.sim.add(g, uint32(h.pgid))
		}
		a.requestRecheck()
	default:
		res.Error = "no fault given"
	}
	return res
}
