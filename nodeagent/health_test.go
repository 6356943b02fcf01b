package nodeagent

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpusched/gpusched/nodeagent/gpu"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// ---------------------------------------------------------------------------
// Helpers: real OS processes, injection, events.

// testProc is a real process the test started, reaped as soon as it exits
// (so that "gone" means ESRCH, not a zombie).
type testProc struct {
	pid  int
	done chan struct{}
	err  error // Wait's result, once done is closed
}

// startProcess starts a command in its own process group and kills the
// group at the end of the test.
func startProcess(t *testing.T, name string, args ...string) *testProc {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	p := &testProc{pid: cmd.Process.Pid, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-p.pid, syscall.SIGKILL)
		<-p.done
	})
	return p
}

// signaled waits for p to have been reaped and reports the signal that
// ended it.
func (p *testProc) signaled() (syscall.Signal, bool) {
	select {
	case <-p.done:
	case <-time.After(waitLimit):
		return 0, false
	}
	var ee *exec.ExitError
	if !errors.As(p.err, &ee) {
		return 0, false
	}
	ws := ee.Sys().(syscall.WaitStatus)
	return ws.Signal(), ws.Signaled()
}

// addGPUProcess lists pid on GPU g of the simulated node, keeping what is
// there. Only for a node no lease starts or ends on meanwhile (the agent
// changes the lists then); otherwise inject through the agent.
func addGPUProcess(t *testing.T, n *testNode, g, pid int) {
	t.Helper()
	dev, ret := n.gpus.Mock.NVML().DeviceGetHandleByIndex(g)
	if ret != 0 {
		t.Fatalf("GPU %d: %v", g, ret)
	}
	infos, _ := dev.GetComputeRunningProcesses()
	var pids []uint32
	for _, p := range infos {
		pids = append(pids, p.Pid)
	}
	n.gpus.Mock.SetProcesses(g, append(pids, uint32(pid)))
}

// gpuPIDs lists GPU g's processes as the simulated node reports them.
func gpuPIDs(n *testNode, g int) []uint32 {
	procs, _ := gpu.ListGPUProcesses(n.gpus.NVML)
	return procs[g]
}

// inject sends a MockInject on s and returns its result.
func (f *fakeScheduler) inject(t *testing.T, s *fakeStream, m *pb.MockInject) *pb.MockInjectResult {
	t.Helper()
	m.RequestId = f.requestID()
	s.send(t, &pb.ConnectResponse{FencingToken: 1, Msg: &pb.ConnectResponse_MockInject{MockInject: m}})
	return f.await(t, "MockInjectResult "+strconv.Itoa(int(m.RequestId)), func(r *pb.ConnectRequest) bool {
		return r.GetMockInjectResult() != nil && r.GetMockInjectResult().GetRequestId() == m.RequestId
	}).GetMockInjectResult()
}

// mustInject injects and fails the test on an error.
func (f *fakeScheduler) mustInject(t *testing.T, s *fakeStream, m *pb.MockInject) {
	t.Helper()
	if r := f.inject(t, s, m); r.GetError() != "" {
		t.Fatalf("MockInject %v: %s", m, r.GetError())
	}
}

func injectProcess(g, pid int) *pb.MockInject {
	return &pb.MockInject{Gpu: int32(g), Fault: &pb.MockInject_GpuProcess{GpuProcess: uint32(pid)}}
}

func injectXID(g int, xid uint64) *pb.MockInject {
	return &pb.MockInject{Gpu: int32(g), Fault: &pb.MockInject_Xid{Xid: xid}}
}

func injectECC(g int) *pb.MockInject {
	return &pb.MockInject{Gpu: int32(g), Fault: &pb.MockInject_EccDoubleBit{EccDoubleBit: true}}
}

func injectClear() *pb.MockInject {
	return &pb.MockInject{Gpu: -1, Fault: &pb.MockInject_Clear{Clear: true}}
}

func isEvent(kind pb.NodeEventKind) func(*pb.ConnectRequest) bool {
	return func(m *pb.ConnectRequest) bool { return m.GetNodeEvent().GetKind() == kind && m.GetNodeEvent() != nil }
}

// isForeign matches the FOREIGN_PROCESS events about pid.
func isForeign(pid int) func(*pb.ConnectRequest) bool {
	return func(m *pb.ConnectRequest) bool {
		return isEvent(pb.NodeEventKind_NODE_EVENT_KIND_FOREIGN_PROCESS)(m) && m.GetNodeEvent().GetPid() == uint32(pid)
	}
}

func isHealth(healthy bool) func(*pb.ConnectRequest) bool {
	return func(m *pb.ConnectRequest) bool { return m.GetHealth() != nil && m.GetHealth().GetHealthy() == healthy }
}

func isTelemetry(m *pb.ConnectRequest) bool { return m.GetTelemetry() != nil }

// index returns the position of the first message matching pred among all
// received so far, -1 if none.
func (f *fakeScheduler) index(pred func(*pb.ConnectRequest) bool) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.IndexFunc(f.msgs, pred)
}

// count is the number of messages received so far.
func (f *fakeScheduler) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.msgs)
}

// awaitAfter waits for a message matching pred among those received after
// the first n, and returns it.
func (f *fakeScheduler) awaitAfter(t *testing.T, n int, what string, pred func(*pb.ConnectRequest) bool) *pb.ConnectRequest {
	t.Helper()
	var got *pb.ConnectRequest
	eventually(t, what, func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		if i := slices.IndexFunc(f.msgs[min(n, len(f.msgs)):], pred); i >= 0 {
			got = f.msgs[n+i]
			return true
		}
		return false
	})
	return got
}

// rounds waits until k more telemetry batches have arrived: the agent's
// monitor has run at least k-1 whole rounds (exclusivity, then telemetry)
// since the call.
func (f *fakeScheduler) rounds(t *testing.T, k int) {
	t.Helper()
	n := len(f.received(isTelemetry))
	eventually(t, strconv.Itoa(k)+" more telemetry batches", func() bool { return len(f.received(isTelemetry)) >= n+k })
}

// fast is the timing of the tests in this file: quick rounds and
// re-checks (the verdicts never depend on them).
func fast(c *Config) {
	c.TelemetryInterval = 100 * time.Millisecond
	c.HealthRecheckInterval = 200 * time.Millisecond
	c.ForeignKillGrace = 5 * time.Second
}

// ---------------------------------------------------------------------------
// Exclusivity.

func TestAForeignGPUProcessOnAnIdleNode(t *testing.T) {
	tests := []struct {
		name     string
		policy   string
		inject   bool // through MockInject rather than the mock directly
		gpu      int
		wantKill bool
	}{
		{"a registered foreign process is killed under the kill policy", ForeignKill, false, 3, true},
		{"a foreign process injected with MockInject is killed", "", true, 5, true},
		{"under the report policy a foreign process survives and is reported", ForeignReport, true, 0, false},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, f, s, _ := agentOnFake(t, "node-fp"+strconv.Itoa(i), fast, func(c *Config) { c.ForeignProcessPolicy = tt.policy })
			p := startProcess(t, "sleep", "60")
			if tt.inject {
				f.mustInject(t, s, injectProcess(tt.gpu, p.pid))
			} else {
				addGPUProcess(t, n, tt.gpu, p.pid)
			}
			ev := f.await(t, "a FOREIGN_PROCESS event", isForeign(p.pid)).GetNodeEvent()
			wantAction := "reported"
			if tt.wantKill {
				wantAction = "killed"
			}
			if ev.GetAction() != wantAction || ev.GetGpu() != int32(tt.gpu) || ev.GetLeaseId() != "" ||
				ev.GetNode() != n.name || ev.GetTime() == nil || !strings.Contains(ev.GetMessage(), "idle") {
				t.Errorf("event = %v; want action %q on GPU %d of %s, no lease, saying the node is idle", ev, wantAction, tt.gpu, n.name)
			}
			if tt.wantKill {
				eventually(t, "the foreign process to be gone", func() bool { return processGone(p.pid) })
				if sig, ok := p.signaled(); !ok || sig != syscall.SIGTERM {
					t.Errorf("the foreign process ended with signal %v (signaled: %v); want SIGTERM", sig, ok)
				}
				// The simulated driver forgets a dead process, as a real one does.
				eventually(t, "the GPU to be free again", func() bool { return len(gpuPIDs(n, tt.gpu)) == 0 })
			} else {
				f.rounds(t, 5)
				if processGone(p.pid) {
					t.Fatalf("the foreign process was killed under the report policy")
				}
			}
			if got := f.received(isForeign(p.pid)); len(got) != 1 {
				t.Errorf("%d FOREIGN_PROCESS events for pid %d; want exactly 1", len(got), p.pid)
			}
		})
	}
}

func TestAForeignProcessIgnoringSIGTERMGetsSIGKILLAfterTheGrace(t *testing.T) {
	n, f, _, _ := agentOnFake(t, "node-fp-kill", fast, func(c *Config) { c.ForeignKillGrace = 200 * time.Millisecond })
	ready := filepath.Join(t.TempDir(), "ready")
	// An ignored signal stays ignored across exec.
	p := startProcess(t, "sh", "-c", `trap '' TERM; : > "$0"; exec sleep 60`, ready)
	eventually(t, "the process to ignore SIGTERM", func() bool { _, err := os.Stat(ready); return err == nil })
	addGPUProcess(t, n, 1, p.pid)
	f.await(t, "a FOREIGN_PROCESS event", isForeign(p.pid))
	eventually(t, "the foreign process to be gone", func() bool { return processGone(p.pid) })
	if sig, ok := p.signaled(); !ok || sig != syscall.SIGKILL {
		t.Errorf("the foreign process ended with %v; want SIGKILL", p.err)
	}
}

func TestTheLeaseOwnProcessesAreNotForeign(t *testing.T) {
	n, f, s, _ := agentOnFake(t, "node-own", fast)
	// The command, a child in its process group, and a child that left the
	// group (setsid) but not the tree, all on GPUs.
	s.send(t, startCmd(1, shLease("lease-own", `
		sleep 60 & echo $! > "$GPUSCHED_SCRATCH_DIR/group.pid"
		setsid sleep 60 & echo $! > "$GPUSCHED_SCRATCH_DIR/session.pid"
		while [ ! -e "$GPUSCHED_SCRATCH_DIR/go" ]; do sleep 0.05; done`)))
	main := int(f.awaitStarted(t, "lease-own").GetPid())
	group := readPID(t, filepath.Join(n.scratchDir("lease-own"), "group.pid"))
	session := readPID(t, filepath.Join(n.scratchDir("lease-own"), "session.pid"))
	eventually(t, "the setsid child to leave the group", func() bool {
		st, err := readStat(session)
		return err == nil && st.pgrp == session
	})
	f.mustInject(t, s, injectProcess(2, group))
	f.mustInject(t, s, injectProcess(6, session))
	for g := range 8 {
		if !slices.Contains(gpuPIDs(n, g), uint32(main)) {
			t.Errorf("GPU %d lists %v; want the lease's command %d on every GPU of a simulated node", g, gpuPIDs(n, g), main)
		}
	}
	f.rounds(t, 5)
	if got := f.received(isEvent(pb.NodeEventKind_NODE_EVENT_KIND_FOREIGN_PROCESS)); len(got) != 0 {
		t.Fatalf("the lease's own processes were reported foreign: %v", got)
	}

	if err := os.WriteFile(filepath.Join(n.scratchDir("lease-own"), "go"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	f.awaitExited(t, "lease-own")
	eventually(t, "the command to be dropped from the GPUs", func() bool { return !slices.Contains(gpuPIDs(n, 0), uint32(main)) })
	s.send(t, releaseCmd(1, "lease-own", 5*time.Second))
	if r := f.awaitReleased(t, "lease-own"); !r.GetClean() {
		t.Errorf("LeaseReleased = %v; want clean", r)
	}
	for _, pid := range []int{group, session} {
		eventually(t, "the lease's child "+strconv.Itoa(pid)+" to be gone", func() bool { return processDead(pid) })
	}
}

// ---------------------------------------------------------------------------
// Telemetry.

func TestTelemetryIsAttributedToTheLeaseAndFollowsTheJob(t *testing.T) {
	n, f, s, _ := agentOnFake(t, "node-tel", fast)
	idle := f.await(t, "a telemetry batch", isTelemetry).GetTelemetry()
	if len(idle.GetSamples()) != 8 || idle.GetLeaseId() != "" || idle.GetJobId() != "" || idle.GetTime() == nil {
		t.Fatalf("idle batch = %d samples, lease %q job %q; want 8 samples, no lease", len(idle.GetSamples()), idle.GetLeaseId(), idle.GetJobId())
	}
	inv := n.gpus.Mock
	for i, x := range idle.GetSamples() {
		if x.GetGpu() != int32(i) || !strings.HasPrefix(x.GetUuid(), "GPU-") || x.GetGpuUtil() != 0 ||
			x.GetFbUsedBytes() != inv.IdleFBUsedBytes() || x.GetFbFreeBytes() == 0 || x.GetGpuTemp() == 0 ||
			x.GetPowerUsageMilliwatts() == 0 || x.GetSmClockMhz() == 0 || x.GetMemClockMhz() == 0 {
			t.Errorf("idle sample %d = %v; want an idle GPU %d", i, x, i)
		}
	}

	s.send(t, startCmd(1, shLease("lease-tel", "exec sleep 60")))
	f.awaitStarted(t, "lease-tel")
	busy := f.await(t, "a batch of lease-tel with every GPU busy", func(m *pb.ConnectRequest) bool {
		b := m.GetTelemetry()
		if b == nil || b.GetLeaseId() != "lease-tel" || len(b.GetSamples()) != 8 {
			return false
		}
		for _, x := range b.GetSamples() {
			if x.GetGpuUtil() == 0 || x.GetFbUsedBytes() <= inv.IdleFBUsedBytes() {
				return false
			}
		}
		return true
	}).GetTelemetry()
	if busy.GetJobId() != "job-lease-tel" {
		t.Errorf("busy batch job = %q; want job-lease-tel", busy.GetJobId())
	}

	s.send(t, releaseCmd(1, "lease-tel", 5*time.Second))
	if r := f.awaitReleased(t, "lease-tel"); !r.GetClean() {
		t.Fatalf("LeaseReleased = %v; want clean", r)
	}
	after := f.count()
	b := f.awaitAfter(t, after, "a batch after the release", isTelemetry).GetTelemetry()
	if b.GetLeaseId() != "" || b.GetJobId() != "" {
		t.Errorf("batch after release attributed to lease %q job %q; want none", b.GetLeaseId(), b.GetJobId())
	}
	for _, x := range b.GetSamples() {
		if x.GetFbUsedBytes() != inv.IdleFBUsedBytes() {
			t.Errorf("GPU %d uses %d bytes after release; want the idle %d", x.GetGpu(), x.GetFbUsedBytes(), inv.IdleFBUsedBytes())
		}
	}
}

// ---------------------------------------------------------------------------
// Health.

func TestAFatalXIDMakesTheNodeUnhealthyUntilCleared(t *testing.T) {
	tests := []struct {
		name     string
		fault    *pb.MockInject
		wantKind pb.NodeEventKind
		wantXID  uint64
	}{
		{"XID 79 (fallen off the bus)", injectXID(2, 79), pb.NodeEventKind_NODE_EVENT_KIND_XID, 79},
		{"an ECC double-bit error", injectECC(2), pb.NodeEventKind_NODE_EVENT_KIND_ECC_DBE, 48},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, f, s, _ := agentOnFake(t, "node-xid"+strconv.Itoa(i), fast)
			if h := f.await(t, "the HealthReport after the Welcome", func(m *pb.ConnectRequest) bool { return m.GetHealth() != nil }).GetHealth(); !h.GetHealthy() {
				t.Fatalf("first HealthReport = %v; want healthy", h)
			}
			f.mustInject(t, s, tt.fault)
			ev := f.await(t, "the XID event", isEvent(tt.wantKind)).GetNodeEvent()
			if ev.GetXid() != tt.wantXID || ev.GetGpu() != 2 || !strings.Contains(ev.GetMessage(), "fatal") {
				t.Errorf("event = %v; want XID %d on GPU 2, called fatal", ev, tt.wantXID)
			}
			h := f.await(t, "an unhealthy HealthReport", isHealth(false)).GetHealth()
			if want := "XID " + strconv.Itoa(int(tt.wantXID)); len(h.GetProblems()) == 0 || !strings.Contains(strings.Join(h.GetProblems(), "\n"), want) {
				t.Errorf("problems = %q; want one naming %s", h.GetProblems(), want)
			}
			if f.index(isHealth(false)) < f.index(isEvent(tt.wantKind)) {
				t.Errorf("the HealthReport came before the event that explains it")
			}
			f.await(t, "the XID in telemetry", func(m *pb.ConnectRequest) bool {
				return len(m.GetTelemetry().GetSamples()) == 8 && m.GetTelemetry().GetSamples()[2].GetLastXid() == tt.wantXID
			})

			// Re-checks do not clear an unresolved fault; a StartLease is refused.
			n := len(f.received(isHealth(false)))
			eventually(t, "two more re-checks", func() bool { return len(f.received(isHealth(false))) >= n+2 })
			if got := f.received(isHealth(true)); len(got) != 1 {
				t.Fatalf("%d healthy reports; want only the first (before the fault)", len(got))
			}
			s.send(t, startCmd(1, shLease("lease-sick", "exit 0")))
			if x := f.awaitExited(t, "lease-sick"); x.GetExitCode() != -1 || !strings.Contains(x.GetMessage(), "pre-lease check failed") {
				t.Errorf("LeaseExited on an unhealthy node = %v; want -1, pre-lease check failed", x)
			}
			s.send(t, releaseCmd(1, "lease-sick", time.Second))
			f.awaitReleased(t, "lease-sick")

			// A new leader learns the verdict after its Welcome.
			before := f.count()
			s.hangUp()
			s2 := f.stream(t, 2)
			s2.send(t, welcomeCmd(1))
			if h := f.awaitAfter(t, before, "a HealthReport on the new stream", func(m *pb.ConnectRequest) bool { return m.GetHealth() != nil }).GetHealth(); h.GetHealthy() {
				t.Errorf("HealthReport after reconnect = %v; want unhealthy", h)
			}

			f.mustInject(t, s2, injectClear())
			f.awaitAfter(t, before, "a healthy HealthReport after the clear", isHealth(true))
			s2.send(t, startCmd(1, shLease("lease-well", "exit 0")))
			f.awaitStarted(t, "lease-well")
		})
	}
}

func TestAnApplicationXIDIsRecordedButKeepsTheNodeHealthy(t *testing.T) {
	_, f, s, _ := agentOnFake(t, "node-app", fast)
	f.mustInject(t, s, injectXID(4, 13))
	ev := f.await(t, "the XID 13 event", func(m *pb.ConnectRequest) bool { return m.GetNodeEvent().GetXid() == 13 }).GetNodeEvent()
	if ev.GetKind() != pb.NodeEventKind_NODE_EVENT_KIND_XID || ev.GetGpu() != 4 || !strings.Contains(ev.GetMessage(), "application") {
		t.Errorf("event = %v; want an XID event on GPU 4 calling it application-level", ev)
	}
	// The watcher handles XIDs in order: once a later fatal one is in, the
	// first was dealt with, and only the fatal one may be in the verdict.
	f.mustInject(t, s, injectXID(1, 79))
	f.await(t, "the XID 79 event", func(m *pb.ConnectRequest) bool { return m.GetNodeEvent().GetXid() == 79 })
	h := f.await(t, "an unhealthy HealthReport", isHealth(false))
	if f.index(isHealth(false)) < f.index(func(m *pb.ConnectRequest) bool { return m.GetNodeEvent().GetXid() == 79 }) {
		t.Errorf("the node was reported unhealthy before the fatal XID")
	}
	if got := strings.Join(h.GetHealth().GetProblems(), "\n"); strings.Contains(got, "XID 13") || !strings.Contains(got, "XID 79") {
		t.Errorf("problems = %q; want XID 79 only", got)
	}
}

func TestPreLeaseCheck(t *testing.T) {
	t.Run("a foreign GPU process fails the check and the lease never runs", func(t *testing.T) {
		n, f, s, _ := agentOnFake(t, "node-pre1", fast, func(c *Config) { c.ForeignProcessPolicy = ForeignReport })
		p := startProcess(t, "sleep", "60")
		addGPUProcess(t, n, 4, p.pid)
		f.await(t, "the FOREIGN_PROCESS report", isForeign(p.pid))

		s.send(t, startCmd(1, shLease("lease-pre", `touch "$GPUSCHED_SCRATCH_DIR/ran"`)))
		x := f.awaitExited(t, "lease-pre")
		if x.GetExitCode() != -1 || !strings.Contains(x.GetMessage(), "pre-lease check failed") || !strings.Contains(x.GetMessage(), "GPU 4") {
			t.Errorf("LeaseExited = %v; want -1, pre-lease check failed, naming GPU 4", x)
		}
		exited := f.index(isExited("lease-pre"))
		evAt := f.index(isEvent(pb.NodeEventKind_NODE_EVENT_KIND_PRE_LEASE_CHECK_FAILED))
		sickAt := f.index(isHealth(false))
		if evAt < 0 || sickAt < 0 || evAt > exited || sickAt > exited {
			t.Errorf("PRE_LEASE_CHECK_FAILED at %d, unhealthy report at %d, LeaseExited at %d; want both before the exit", evAt, sickAt, exited)
		}
		if ev := f.received(isEvent(pb.NodeEventKind_NODE_EVENT_KIND_PRE_LEASE_CHECK_FAILED))[0].GetNodeEvent(); ev.GetLeaseId() != "lease-pre" {
			t.Errorf("event = %v; want it on lease-pre", ev)
		}
		if got := f.received(isStarted("lease-pre")); len(got) != 0 {
			t.Errorf("the lease started: %v", got)
		}
		if _, err := os.Stat(filepath.Join(n.scratchDir("lease-pre"), "ran")); err == nil {
			t.Errorf("the command ran")
		}

		// Re-checks keep it unhealthy while the process stays, although the
		// failed lease still holds the node; once it is gone, a re-check
		// finds the node healthy again.
		sick := len(f.received(isHealth(false)))
		eventually(t, "two more re-checks", func() bool { return len(f.received(isHealth(false))) >= sick+2 })
		if len(f.received(isHealth(true))) != 1 { // the one after the Welcome
			t.Fatalf("the node was reported healthy again while the foreign process ran")
		}
		_ = syscall.Kill(p.pid, syscall.SIGKILL)
		f.awaitAfter(t, sickAt, "a healthy HealthReport after the failure", isHealth(true))
		s.send(t, releaseCmd(1, "lease-pre", time.Second))
		if r := f.awaitReleased(t, "lease-pre"); !r.GetClean() {
			t.Errorf("LeaseReleased = %v; want clean", r)
		}
		s.send(t, startCmd(1, shLease("lease-next", "exit 0")))
		f.awaitStarted(t, "lease-next")
	})

	t.Run("a GPU hotter than the limit fails the check", func(t *testing.T) {
		// An idle simulated H100 sits at 33 °C.
		_, f, s, _ := agentOnFake(t, "node-pre2", fast, func(c *Config) { c.MaxGPUTempC = 20 })
		s.send(t, startCmd(1, shLease("lease-hot", "exit 0")))
		if x := f.awaitExited(t, "lease-hot"); x.GetExitCode() != -1 || !strings.Contains(x.GetMessage(), "temperature") {
			t.Errorf("LeaseExited = %v; want -1 naming the temperature", x)
		}
		if got := f.received(isStarted("lease-hot")); len(got) != 0 {
			t.Errorf("the lease started: %v", got)
		}
	})
}

// ---------------------------------------------------------------------------
// Cleanup.

func TestCleanupWaitsForTheGPUsToBeFree(t *testing.T) {
	n, f, s, a := agentOnFake(t, "node-cw", fast, func(c *Config) { c.ForeignProcessPolicy = ForeignReport })
	s.send(t, startCmd(1, shLease("lease-cw", "exec sleep 60")))
	f.awaitStarted(t, "lease-cw")
	// A GPU process outside the lease's group that ends when told to.
	gate := filepath.Join(t.TempDir(), "go")
	p := startProcess(t, "sh", "-c", `while [ ! -e "$0" ]; do sleep 0.05; done`, gate)
	f.mustInject(t, s, injectProcess(6, p.pid))

	s.send(t, releaseCmd(1, "lease-cw", 5*time.Second))
	if x := f.awaitExited(t, "lease-cw"); x.GetSignal() != "SIGTERM" {
		t.Fatalf("LeaseExited = %v; want SIGTERM", x)
	}
	f.rounds(t, 3)
	if got := f.received(isReleased("lease-cw")); len(got) != 0 || !a.holds("lease-cw") {
		t.Fatalf("the lease was released while a GPU process was left: %v", got)
	}
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r := f.awaitReleased(t, "lease-cw")
	if !r.GetClean() {
		t.Errorf("LeaseReleased = %v; want clean once the process is gone", r)
	}
	if !processDead(p.pid) {
		t.Errorf("released clean while the GPU process %d still runs", p.pid)
	}
	if len(gpuPIDs(n, 6)) != 0 {
		t.Errorf("GPU 6 still lists %v", gpuPIDs(n, 6))
	}
}

func TestCleanupHook(t *testing.T) {
	tests := []struct {
		name      string
		exit      int
		wantClean bool
	}{
		{"a cleanup hook that succeeds leaves the node clean", 0, true},
		{"a cleanup hook that fails makes the release unclean", 3, false},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "hook.out")
			node := "node-hook" + strconv.Itoa(i)
			_, f, s, _ := agentOnFake(t, node, fast, func(c *Config) {
				c.CleanupHook = `echo "$GPUSCHED_LEASE_ID $GPUSCHED_NODE_ID" >> ` + out + `; echo hook-says-no >&2; exit ` + strconv.Itoa(tt.exit)
			})
			s.send(t, startCmd(1, shLease("lease-hook", "exit 0")))
			f.awaitExited(t, "lease-hook")
			s.send(t, releaseCmd(1, "lease-hook", time.Second))
			r := f.awaitReleased(t, "lease-hook")
			if b, _ := os.ReadFile(out); !strings.HasPrefix(string(b), "lease-hook "+node+"\n") {
				t.Errorf("the hook wrote %q; want %q first", b, "lease-hook "+node+"\n")
			}
			if r.GetClean() != tt.wantClean {
				t.Fatalf("LeaseReleased = %v; want clean=%v", r, tt.wantClean)
			}
			if tt.wantClean {
				return
			}
			if !strings.Contains(r.GetMessage(), "exit status 3") || !strings.Contains(r.GetMessage(), "hook-says-no") {
				t.Errorf("message = %q; want the hook's exit status and output", r.GetMessage())
			}
			if f.index(isEvent(pb.NodeEventKind_NODE_EVENT_KIND_CLEANUP_FAILED)) < 0 || f.index(isHealth(false)) < 0 {
				t.Errorf("want a CLEANUP_FAILED event and an unhealthy HealthReport")
			}
		})
	}
}

// ---------------------------------------------------------------------------
// MockInject.

func TestMockInject(t *testing.T) {
	t.Run("an agent on real NVML refuses injection", func(t *testing.T) {
		_, f, s, _ := agentOnFake(t, "node-real", func(c *Config) { c.Mock = nil })
		for _, m := range []*pb.MockInject{injectXID(0, 79), injectClear()} {
			if r := f.inject(t, s, m); !strings.Contains(r.GetError(), "not a simulated node") {
				t.Errorf("MockInject %v = %v; want refused as not simulated", m, r)
			}
		}
	})

	t.Run("injections that cannot apply are refused", func(t *testing.T) {
		_, f, s, _ := agentOnFake(t, "node-inj")
		gone := startProcess(t, "true")
		<-gone.done
		for _, tt := range []struct {
			m    *pb.MockInject
			want string
		}{
			{injectXID(-1, 79), "needs a GPU index"},
			{injectECC(-1), "needs a GPU index"},
			{injectXID(8, 79), "no GPU 8"},
			{injectProcess(-1, os.Getpid()), "needs a GPU index"},
			{injectProcess(0, gone.pid), "no process"},
			{&pb.MockInject{Gpu: 0}, "no fault"},
		} {
			if r := f.inject(t, s, tt.m); !strings.Contains(r.GetError(), tt.want) {
				t.Errorf("MockInject %v = %v; want an error mentioning %q", tt.m, r, tt.want)
			}
		}
		if r := f.inject(t, s, injectClear()); r.GetError() != "" {
			t.Errorf("clear = %v; want success", r)
		}
	})
}

func TestNewRejectsABadHealthConfig(t *testing.T) {
	n := newNode(t, "node-cfg2")
	other := newNode(t, "node-cfg3")
	for _, tt := range []struct {
		name   string
		modify func(*Config)
	}{
		{"an unknown foreign process policy is refused", func(c *Config) { c.ForeignProcessPolicy = "ignore" }},
		{"a Mock that is not the NVML backend is refused", func(c *Config) { c.Mock = other.gpus.Mock }},
		{"a negative telemetry interval is refused", func(c *Config) { c.TelemetryInterval = -time.Second }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := n.config(t, "127.0.0.1:1")
			tt.modify(&cfg)
			if _, err := New(cfg); !errors.Is(err, ErrConfig) {
				t.Fatalf("New = %v; want ErrConfig", err)
			}
		})
	}
}
