package nodeagent

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpusched/gpusched/nodeagent/gpu"
	"github.com/gpusched/gpusched/nodeagent/runner"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func TestNewRejectsAnIncompleteConfig(t *testing.T) {
	n := newNode(t, "node-cfg")
	tests := []struct {
		name   string
		modify func(*Config)
	}{
		{"a config without a node id is refused", func(c *Config) { c.NodeID = "" }},
		{"a config without scheduler endpoints is refused", func(c *Config) { c.Servers = nil }},
		{"a config without a GPU backend is refused", func(c *Config) { c.NVML = nil }},
		{"a config without a data dir is refused", func(c *Config) { c.DataDir = "" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := n.config(t, "127.0.0.1:1")
			tt.modify(&cfg)
			a, err := New(cfg)
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("New = %v, %v; want an error wrapping ErrConfig", a, err)
			}
		})
	}
}

func TestNewFailsOnAnUnusableDataDir(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) string // returns the data dir to use
		want  string
	}{
		{"a data dir below a regular file is refused", func(t *testing.T, dir string) string {
			f := filepath.Join(dir, "file")
			if err := os.WriteFile(f, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			return filepath.Join(f, "data")
		}, "data dir"},
		{"a corrupt state file is refused rather than forgotten", func(t *testing.T, dir string) string {
			if err := os.WriteFile(filepath.Join(dir, "state.json"), []byte("{not json"), 0o600); err != nil {
				t.Fatal(err)
			}
			return dir
		}, "corrupt state"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newNode(t, "node-dir")
			cfg := n.config(t, "127.0.0.1:1")
			cfg.DataDir = tt.setup(t, t.TempDir())
			_, err := New(cfg)
			if err == nil || errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New = %v; want an error mentioning %q (and not ErrConfig)", err, tt.want)
			}
		})
	}
}

func TestHelloRegistersTheNode(t *testing.T) {
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name        string
		address     string
		wantAddress string
	}{
		{"the hello carries the configured address", "gpu-017.example:29500", "gpu-017.example:29500"},
		{"the hello defaults the address to the hostname", "", host},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := newNode(t, "node-hello")
			f := newFake()
			addr, _ := f.listen(t)
			cfg := n.config(t, addr)
			cfg.Address = tt.address
			cfg.Labels = map[string]string{"pool": "p1", "rack": "r7", "nvlink": "d3"}
			runAgent(t, cfg)

			s := f.stream(t, 1)
			h := s.hello
			if h.GetNodeId() != "node-hello" {
				t.Errorf("node id = %q; want node-hello", h.GetNodeId())
			}
			if h.GetAddress() != tt.wantAddress {
				t.Errorf("address = %q; want %q", h.GetAddress(), tt.wantAddress)
			}
			if got := h.GetLabels(); len(got) != 3 || got["pool"] != "p1" || got["rack"] != "r7" || got["nvlink"] != "d3" {
				t.Errorf("labels = %v; want pool=p1 rack=r7 nvlink=d3", got)
			}
			if len(h.GetLeases()) != 0 {
				t.Errorf("a fresh agent holds leases %v; want none", heldLeaseIDs(h))
			}
			if h.GetMaxFencingToken() != 0 {
				t.Errorf("max fencing token = %d on a fresh data dir; want 0", h.GetMaxFencingToken())
			}

			// The same simulated node, opened again, has the same GPUs:
			// the hello must describe exactly these.
			again, err := gpu.OpenMock(gpu.BackendMockDGXH100, gpu.MockOptions{NodeName: "node-hello"})
			if err != nil {
				t.Fatal(err)
			}
			defer again.Close()
			want, err := gpu.ReadInventory(again.NVML)
			if err != nil {
				t.Fatal(err)
			}
			inv := h.GetInventory()
			if inv.GetGpuModel() != "H100" || inv.GetGpuCount() != 8 || len(inv.GetGpus()) != 8 {
				t.Fatalf("inventory = %s x%d (%d GPUs listed); want H100 x8", inv.GetGpuModel(), inv.GetGpuCount(), len(inv.GetGpus()))
			}
			if inv.GetDriverVersion() != "550.54.15" || inv.GetCudaVersion() != "12.4" {
				t.Errorf("driver %q CUDA %q; want 550.54.15 and 12.4 (the DGX H100 mock)", inv.GetDriverVersion(), inv.GetCudaVersion())
			}
			if inv.GetHostname() != host {
				t.Errorf("hostname = %q; want %q", inv.GetHostname(), host)
			}
			if inv.GetGpuMemoryBytes() != want.GPUMemoryBytes || want.GPUMemoryBytes < 80e9 {
				t.Errorf("GPU memory = %d; want %d (80 GB class)", inv.GetGpuMemoryBytes(), want.GPUMemoryBytes)
			}
			seen := map[string]bool{}
			for i, g := range inv.GetGpus() {
				w := want.GPUs[i]
				if int(g.GetIndex()) != i || g.GetUuid() != w.UUID || g.GetName() != w.Name ||
					g.GetMemoryBytes() != w.MemoryBytes || g.GetPciBusId() != w.PCIBusID {
					t.Errorf("GPU %d = %v; want index %d uuid %s name %q mem %d bus %s", i, g, i, w.UUID, w.Name, w.MemoryBytes, w.PCIBusID)
				}
				if !strings.HasPrefix(g.GetUuid(), "GPU-") || seen[g.GetUuid()] {
					t.Errorf("GPU %d UUID %q is not a fresh GPU-... UUID", i, g.GetUuid())
				}
				seen[g.GetUuid()] = true
				if !strings.Contains(g.GetName(), "H100") {
					t.Errorf("GPU %d name %q does not name an H100", i, g.GetName())
				}
			}
		})
	}
}

func TestTheAgentSendsHeartbeatsOnAnIdleStream(t *testing.T) {
	n := newNode(t, "node-hb")
	f := newFake()
	addr, _ := f.listen(t)
	runAgent(t, n.config(t, addr))
	f.stream(t, 1).send(t, welcomeCmd(1))
	f.await(t, "a heartbeat", func(m *pb.ConnectRequest) bool { return m.GetHeartbeat() != nil })
}

func TestRunReturnsWhenCancelledWhileNoSchedulerAnswers(t *testing.T) {
	// A port that was just free: connecting to it is refused.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := lis.Addr().String()
	lis.Close()

	n := newNode(t, "node-alone")
	r := runAgent(t, n.config(t, dead, dead))
	r.stop(t) // fails the test if Run does not return
}

func TestFencing(t *testing.T) {
	n := newNode(t, "node-fence")
	f := newFake()
	addr, _ := f.listen(t)
	a := runAgent(t, n.config(t, addr))
	s := f.stream(t, 1)

	s.send(t, welcomeCmd(7))
	s.send(t, startCmd(7, shLease("lease-7", "exec sleep 60")))
	f.awaitStarted(t, "lease-7")

	// A deposed leader (token 5) can neither stop, start nor read anything.
	s.send(t, releaseCmd(5, "lease-7", time.Second))
	s.send(t, startCmd(5, shLease("lease-5a", "exit 0")))
	s.send(t, fetchCmd(5, 9999, "lease-7"))
	f.barrier(t, s, 7) // the current leader's token is still obeyed
	if got := f.received(anyAbout("lease-5a")); len(got) != 0 {
		t.Errorf("a command with a stale token was obeyed: %v", got)
	}
	if got := f.received(isReleased("lease-7")); len(got) != 0 {
		t.Errorf("a release with a stale token was obeyed: %v", got)
	}
	if got := f.received(isExited("lease-7")); len(got) != 0 {
		t.Errorf("a release with a stale token stopped the command: %v", got)
	}
	if got := f.received(func(m *pb.ConnectRequest) bool { return m.GetLogChunk().GetRequestId() == 9999 }); len(got) != 0 {
		t.Errorf("a FetchLogs with a stale token was answered: %v", got)
	}

	// The current leader releases; a stale start on the free node is
	// still ignored.
	s.send(t, releaseCmd(7, "lease-7", time.Second))
	if r := f.awaitReleased(t, "lease-7"); !r.GetClean() {
		t.Fatalf("release of lease-7 not clean: %q", r.GetMessage())
	}
	s.send(t, startCmd(5, shLease("lease-5b", "exit 0")))
	f.barrier(t, s, 7)
	if got := f.received(anyAbout("lease-5b")); len(got) != 0 {
		t.Errorf("a start with a stale token was obeyed on a free node: %v", got)
	}

	// The token survives an agent restart.
	a.stop(t)
	runAgent(t, n.config(t, addr))
	s2 := f.stream(t, 2)
	if got := s2.hello.GetMaxFencingToken(); got != 7 {
		t.Fatalf("after restart the hello reports max fencing token %d; want 7", got)
	}
	s2.send(t, startCmd(5, shLease("lease-5c", "exit 0")))
	f.barrier(t, s2, 7)
	if got := f.received(anyAbout("lease-5c")); len(got) != 0 {
		t.Errorf("after restart a start with a stale token was obeyed: %v", got)
	}

	// A newer leader is obeyed and raises the bar for everyone.
	s2.send(t, startCmd(8, shLease("lease-8", "exit 0")))
	f.awaitStarted(t, "lease-8")
	if x := f.awaitExited(t, "lease-8"); x.GetExitCode() != 0 {
		t.Errorf("lease-8 exited %d; want 0", x.GetExitCode())
	}
	st, err := loadState(n.dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.MaxFencingToken != 8 {
		t.Errorf("persisted max fencing token = %d; want 8", st.MaxFencingToken)
	}
}

func TestReconnect(t *testing.T) {
	t.Run("after the scheduler hangs up the agent says hello again with its running lease", func(t *testing.T) {
		n := newNode(t, "node-re1")
		f := newFake()
		addr, _ := f.listen(t)
		runAgent(t, n.config(t, addr))
		s1 := f.stream(t, 1)
		s1.send(t, startCmd(3, shLease("lease-run", "exec sleep 60")))
		pid := f.awaitStarted(t, "lease-run").GetPid()

		s1.hangUp()
		s2 := f.stream(t, 2)
		want := []*pb.HeldLease{{LeaseId: "lease-run", Started: true}}
		if got := s2.hello.GetLeases(); !sameHeld(got, want) {
			t.Fatalf("hello after reconnect holds %v; want %v", got, want)
		}
		if got := s2.hello.GetMaxFencingToken(); got != 3 {
			t.Errorf("hello after reconnect: max fencing token %d; want 3", got)
		}
		if processGone(int(pid)) {
			t.Fatalf("the command died when the stream did")
		}
		// The new stream carries commands and reports.
		s2.send(t, releaseCmd(3, "lease-run", 5*time.Second))
		if r := f.awaitReleased(t, "lease-run"); !r.GetClean() {
			t.Fatalf("release not clean: %q", r.GetMessage())
		}
	})

	t.Run("when its scheduler is gone the agent fails over to the second endpoint", func(t *testing.T) {
		n := newNode(t, "node-re2")
		f := newFake()
		first, stopFirst := f.listen(t)
		second, _ := f.listen(t)
		runAgent(t, n.config(t, first, second))
		s1 := f.stream(t, 1)
		if s1.server != first {
			t.Fatalf("first stream went to %s; want the first endpoint %s", s1.server, first)
		}
		s1.send(t, startCmd(4, shLease("lease-fo", "exec sleep 60")))
		f.awaitStarted(t, "lease-fo")

		stopFirst()
		s2 := f.stream(t, 2)
		if s2.server != second {
			t.Fatalf("after the first endpoint died the agent connected to %s; want %s", s2.server, second)
		}
		want := []*pb.HeldLease{{LeaseId: "lease-fo", Started: true}}
		if got := s2.hello.GetLeases(); !sameHeld(got, want) {
			t.Fatalf("hello on the second endpoint holds %v; want %v", got, want)
		}
	})

	t.Run("a lease that exited while disconnected is reported exited with its code", func(t *testing.T) {
		n := newNode(t, "node-re3")
		f := newFake()
		first, _ := f.listen(t)
		second, _ := f.listen(t)
		runAgent(t, n.config(t, first, second))
		s1 := f.stream(t, 1)
		// The command exits 4 once the test lets it.
		s1.send(t, startCmd(2, shLease("lease-off",
			`while [ ! -e "$GPUSCHED_SCRATCH_DIR/go" ]; do sleep 0.05; done; exit 4`)))
		f.awaitStarted(t, "lease-off")

		// Both schedulers turn the agent away until the exit is on record.
		f.setOnHello(func(*pb.AgentHello) error { return status.Error(codes.Unavailable, "not now") })
		refusedBefore := f.streamCount()
		s1.hangUp()
		eventually(t, "a refused reconnect", func() bool { return f.streamCount() > refusedBefore })
		if err := os.WriteFile(filepath.Join(n.scratchDir("lease-off"), "go"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the exit of lease-off in state.json", func() bool {
			st, err := loadState(n.dir)
			return err == nil && st.Leases["lease-off"] != nil && st.Leases["lease-off"].Exited
		})
		f.setOnHello(nil)

		s2 := f.stream(t, 2)
		want := []*pb.HeldLease{{LeaseId: "lease-off", Started: true, Exited: true,
			Exit: &pb.LeaseExited{LeaseId: "lease-off", ExitCode: 4, Message: "exit status 4"}}}
		if got := s2.hello.GetLeases(); !sameHeld(got, want) {
			t.Fatalf("hello after reconnect holds %v; want %v", got, want)
		}
	})

	t.Run("a lease released while disconnected is gone from the next hello", func(t *testing.T) {
		// The scheduler relies on this: the LeaseReleased went down with
		// the old stream, and the lease's absence is what tells it.
		n := newNode(t, "node-re4")
		f := newFake()
		addr, _ := f.listen(t)
		runAgent(t, n.config(t, addr))
		s1 := f.stream(t, 1)
		// The command takes its time over SIGTERM: it ends once the test
		// lets it.
		s1.send(t, startCmd(2, shLease("lease-slow",
			`trap 'echo term' TERM; touch "$GPUSCHED_SCRATCH_DIR/ready"
			 while [ ! -e "$GPUSCHED_SCRATCH_DIR/go" ]; do sleep 0.05; done`)))
		f.awaitStarted(t, "lease-slow")
		eventually(t, "the command to trap SIGTERM", func() bool {
			_, err := os.Stat(filepath.Join(n.scratchDir("lease-slow"), "ready"))
			return err == nil
		})
		s1.send(t, releaseCmd(2, "lease-slow", time.Hour))
		eventually(t, "the release to send SIGTERM", func() bool {
			b, _ := os.ReadFile(n.logFile("lease-slow"))
			return strings.Contains(string(b), "term")
		})

		f.setOnHello(func(*pb.AgentHello) error { return status.Error(codes.Unavailable, "not now") })
		refusedBefore := f.streamCount()
		s1.hangUp()
		eventually(t, "a refused reconnect", func() bool { return f.streamCount() > refusedBefore })
		if err := os.WriteFile(filepath.Join(n.scratchDir("lease-slow"), "go"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the release of lease-slow in state.json", func() bool {
			st, err := loadState(n.dir)
			return err == nil && len(st.Leases) == 0
		})
		f.setOnHello(nil)

		if got := f.stream(t, 2).hello.GetLeases(); len(got) != 0 {
			t.Fatalf("hello after a release while disconnected holds %v; want nothing", got)
		}
	})
}

// sameHeld compares held leases by id, progress and exit code and signal.
func sameHeld(got, want []*pb.HeldLease) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.GetLeaseId() != w.GetLeaseId() || g.GetStarted() != w.GetStarted() || g.GetExited() != w.GetExited() ||
			(g.GetExit() == nil) != (w.GetExit() == nil) ||
			g.GetExit().GetLeaseId() != w.GetExit().GetLeaseId() ||
			g.GetExit().GetExitCode() != w.GetExit().GetExitCode() || g.GetExit().GetSignal() != w.GetExit().GetSignal() {
			return false
		}
		if w.GetExit().GetMessage() != "" && !strings.Contains(g.GetExit().GetMessage(), w.GetExit().GetMessage()) {
			return false
		}
	}
	return true
}

func TestAgentRestart(t *testing.T) {
	t.Run("an agent that shuts down stops its command and the next one reports the lease exited", func(t *testing.T) {
		n := newNode(t, "node-rs1")
		f := newFake()
		addr, _ := f.listen(t)
		a := runAgent(t, n.config(t, addr))
		s := f.stream(t, 1)
		// A background child in the same group must go too.
		s.send(t, startCmd(6, shLease("lease-rs",
			`sleep 60 & echo $! > "$GPUSCHED_SCRATCH_DIR/child"; sleep 60`)))
		pid := int(f.awaitStarted(t, "lease-rs").GetPid())
		child := readPID(t, filepath.Join(n.scratchDir("lease-rs"), "child"))

		a.stop(t)
		eventually(t, "the command's process to be gone", func() bool { return processGone(pid) })
		eventually(t, "the command's process group to be empty", func() bool { return !runner.GroupAlive(pid) })
		eventually(t, "the background child to be gone", func() bool { return processDead(child) })

		runAgent(t, n.config(t, addr))
		s2 := f.stream(t, 2)
		want := []*pb.HeldLease{{LeaseId: "lease-rs", Started: true, Exited: true,
			Exit: &pb.LeaseExited{LeaseId: "lease-rs", ExitCode: -1, Signal: "SIGTERM", Message: "node agent shut down"}}}
		if got := s2.hello.GetLeases(); !sameHeld(got, want) {
			t.Fatalf("hello after restart holds %v; want %v", got, want)
		}
		if got := s2.hello.GetMaxFencingToken(); got != 6 {
			t.Errorf("hello after restart: max fencing token %d; want 6", got)
		}
		// The scheduler can still release it and read its logs.
		s2.send(t, releaseCmd(6, "lease-rs", time.Second))
		if r := f.awaitReleased(t, "lease-rs"); !r.GetClean() {
			t.Fatalf("release after restart not clean: %q", r.GetMessage())
		}
	})

	t.Run("an agent that shuts down kills a command that ignores SIGTERM after its stop grace", func(t *testing.T) {
		n := newNode(t, "node-rs3")
		f := newFake()
		addr, _ := f.listen(t)
		cfg := n.config(t, addr)
		cfg.StopGrace = 200 * time.Millisecond
		a := runAgent(t, cfg)
		s := f.stream(t, 1)
		s.send(t, startCmd(1, shLease("lease-stubborn",
			`trap '' TERM; touch "$GPUSCHED_SCRATCH_DIR/ready"; while :; do sleep 1; done`)))
		pid := int(f.awaitStarted(t, "lease-stubborn").GetPid())
		eventually(t, "the command to ignore SIGTERM", func() bool {
			_, err := os.Stat(filepath.Join(n.scratchDir("lease-stubborn"), "ready"))
			return err == nil
		})

		a.stop(t)
		eventually(t, "the command's process to be gone", func() bool { return processGone(pid) })
		eventually(t, "the command's process group to be empty", func() bool { return !runner.GroupAlive(pid) })
		st, err := loadState(n.dir)
		if err != nil {
			t.Fatal(err)
		}
		if l := st.Leases["lease-stubborn"]; l == nil || !l.Exited || l.Signal != "SIGKILL" {
			t.Errorf("state after shutdown: %+v; want lease-stubborn exited by SIGKILL", l)
		}
	})

	t.Run("an agent that crashed kills the command it left behind on start", func(t *testing.T) {
		n := newNode(t, "node-rs2")
		// The crashed agent's command: a process group of its own.
		orphan := exec.Command("sleep", "60")
		orphan.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := orphan.Start(); err != nil {
			t.Fatal(err)
		}
		waited := make(chan error, 1)
		go func() { waited <- orphan.Wait() }()
		t.Cleanup(func() {
			_ = syscall.Kill(-orphan.Process.Pid, syscall.SIGKILL)
			<-waited
		})
		st := &persistentState{MaxFencingToken: 11, Leases: map[string]*heldLease{
			"lease-crash": {ID: "lease-crash", JobID: "job-crash", PGID: orphan.Process.Pid, Started: true},
		}}
		if err := st.save(n.dir); err != nil {
			t.Fatal(err)
		}

		f := newFake()
		addr, _ := f.listen(t)
		runAgent(t, n.config(t, addr))
		select {
		case err := <-waited:
			waited <- err // for the cleanup
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Errorf("the left-behind command ended with %v; want killed by SIGKILL", err)
			}
		case <-time.After(waitLimit):
			t.Fatalf("the command a crashed agent left behind is still running")
		}
		h := f.stream(t, 1).hello
		want := []*pb.HeldLease{{LeaseId: "lease-crash", Started: true, Exited: true,
			Exit: &pb.LeaseExited{LeaseId: "lease-crash", ExitCode: -1, Message: "agent restarted"}}}
		if got := h.GetLeases(); !sameHeld(got, want) {
			t.Fatalf("hello after a crash holds %v; want %v", got, want)
		}
		if h.GetMaxFencingToken() != 11 {
			t.Errorf("hello after a crash: max fencing token %d; want 11", h.GetMaxFencingToken())
		}
	})
}

// A heartbeat from the scheduler may carry a new interval (the cluster
// grew, or shrank on a new leader); the agent beats at it from then on.
func TestTheAgentAdoptsTheIntervalAHeartbeatCarries(t *testing.T) {
	n := newNode(t, "node-hb2")
	f := newFake()
	addr, _ := f.listen(t)
	runAgent(t, n.config(t, addr))
	s := f.stream(t, 1)
	s.send(t, welcomeCmd(1)) // 2s: at most one beat in the window below
	f.await(t, "the HealthReport after the Welcome", func(m *pb.ConnectRequest) bool { return m.GetHealth() != nil })
	beats := func() int { return len(f.received(func(m *pb.ConnectRequest) bool { return m.GetHeartbeat() != nil })) }
	before := beats()
	s.send(t, &pb.ConnectResponse{FencingToken: 1, Msg: &pb.ConnectResponse_Heartbeat{Heartbeat: &pb.Heartbeat{Interval: durationpb.New(150 * time.Millisecond)}}})
	// Keep the scheduler audible at the new, shorter silence limit (450ms).
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				select {
				case s.cmds <- &pb.ConnectResponse{FencingToken: 1, Msg: &pb.ConnectResponse_Heartbeat{Heartbeat: &pb.Heartbeat{}}}:
				default:
				}
			}
		}
	}()
	// At 150ms, six beats take about 0.9s; at the old 2s they would take 12s.
	deadline := time.Now().Add(6 * time.Second)
	for beats()-before < 6 {
		if time.Now().After(deadline) {
			t.Fatalf("%d heartbeats in 6s after the interval changed to 150ms; want at least 6", beats()-before)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := f.streamCount(); got != 1 {
		t.Errorf("the agent opened %d streams; want 1 (it must not have left the scheduler)", got)
	}
}
