package nodeagent

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// agentOnFake runs an agent for a fresh node against a fresh fake scheduler
// and returns the node, the fake and the agent's first stream.
func agentOnFake(t *testing.T, node string, tune ...func(*Config)) (*testNode, *fakeScheduler, *fakeStream, *runningAgent) {
	t.Helper()
	n := newNode(t, node)
	f := newFake()
	addr, _ := f.listen(t)
	cfg := n.config(t, addr)
	for _, fn := range tune {
		fn(&cfg)
	}
	a := runAgent(t, cfg)
	s := f.stream(t, 1)
	s.send(t, welcomeCmd(1))
	return n, f, s, a
}

// startedBefore reports whether the lease's LeaseStarted arrived before its
// LeaseExited.
func startedBefore(f *fakeScheduler, lease string) bool {
	ms := f.received(func(m *pb.ConnectRequest) bool { return isStarted(lease)(m) || isExited(lease)(m) })
	return len(ms) == 2 && ms[0].GetLeaseStarted() != nil && ms[1].GetLeaseExited() != nil
}

func TestStartLeaseRunsTheCommandWithTheLeaseEnvironment(t *testing.T) {
	n, f, s, _ := agentOnFake(t, "node-b")
	s.send(t, startCmd(1, &pb.StartLease{
		LeaseId: "lease-env", JobId: "job-env", Rank: 1,
		Command:    []string{"sh", "-c", `env; echo "cwd=$(pwd)"`},
		Nodes:      []string{"node-a", "node-b", "node-c"},
		MasterAddr: "node-a.test:29500",
		Env: map[string]string{
			"MY_SETTING": "a b=c",
			// What gpusched sets wins over the job's own env.
			"GPUSCHED_LEASE_ID": "spoofed", "CUDA_VISIBLE_DEVICES": "0",
		},
	}))
	started := f.awaitStarted(t, "lease-env")
	if started.GetPid() <= 0 {
		t.Errorf("LeaseStarted pid = %d; want a real pid", started.GetPid())
	}
	x := f.awaitExited(t, "lease-env")
	if x.GetExitCode() != 0 || x.GetSignal() != "" {
		t.Fatalf("LeaseExited = %v; want exit code 0, no signal", x)
	}
	if !startedBefore(f, "lease-env") {
		t.Errorf("want exactly one LeaseStarted, then one LeaseExited")
	}

	out, last := f.fetchLogs(t, s, 1, "lease-env")
	if last.GetError() != "" {
		t.Fatalf("FetchLogs error: %s", last.GetError())
	}
	got := map[string][]string{} // every value a name has, in order
	for line := range strings.Lines(string(out)) {
		if k, v, ok := strings.Cut(strings.TrimSuffix(line, "\n"), "="); ok {
			got[k] = append(got[k], v)
		}
	}
	scratch := n.scratchDir("lease-env")
	for _, tt := range []struct{ name, want string }{
		{"GPUSCHED_JOB_ID", "job-env"},
		{"GPUSCHED_LEASE_ID", "lease-env"},
		{"GPUSCHED_NODE_ID", "node-b"},
		{"GPUSCHED_NODE_RANK", "1"},
		{"GPUSCHED_NUM_NODES", "3"},
		{"GPUSCHED_NODES", "node-a,node-b,node-c"},
		{"GPUSCHED_MASTER_ADDR", "node-a.test:29500"},
		{"GPUSCHED_SCRATCH_DIR", scratch},
		{"CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7"},
		{"MY_SETTING", "a b=c"},
		{"cwd", scratch},
	} {
		if vs := got[tt.name]; len(vs) != 1 || vs[0] != tt.want {
			t.Errorf("%s = %q in the command's output; want exactly [%q]", tt.name, vs, tt.want)
		}
	}
	if len(got["PATH"]) != 1 {
		t.Errorf("PATH = %q; want the agent's PATH passed on once", got["PATH"])
	}
}

func TestExitCodes(t *testing.T) {
	tests := []struct {
		name        string
		command     []string
		wantStarted bool
		wantCode    int32
		wantSignal  string
		wantMessage string
	}{
		{"a command that exits 3 reports exit code 3",
			[]string{"sh", "-c", "echo failing; exit 3"}, true, 3, "", "exit status 3"},
		{"a command killed by a signal reports the signal",
			[]string{"sh", "-c", "kill -KILL $$"}, true, -1, "SIGKILL", "SIGKILL"},
		{"a command not on the PATH reports 127 and never starts",
			[]string{"gpusched-no-such-command"}, false, 127, "", "gpusched-no-such-command"},
		{"a command path that does not exist reports 127 and never starts",
			[]string{"/nonexistent/gpusched-no-such-command"}, false, 127, "", "no such file"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, f, s, _ := agentOnFake(t, "node-x"+strconv.Itoa(i))
			s.send(t, startCmd(1, &pb.StartLease{LeaseId: "lease-x", JobId: "job-x", Command: tt.command, Nodes: []string{"node-x"}}))
			x := f.awaitExited(t, "lease-x")
			if x.GetExitCode() != tt.wantCode || x.GetSignal() != tt.wantSignal ||
				!strings.Contains(strings.ToLower(x.GetMessage()), strings.ToLower(tt.wantMessage)) {
				t.Errorf("LeaseExited = %v; want code %d signal %q message mentioning %q", x, tt.wantCode, tt.wantSignal, tt.wantMessage)
			}
			// LeaseStarted, if any, is queued before LeaseExited.
			if started := len(f.received(isStarted("lease-x"))) > 0; started != tt.wantStarted {
				t.Errorf("LeaseStarted sent: %v; want %v", started, tt.wantStarted)
			}
			if tt.wantStarted && !startedBefore(f, "lease-x") {
				t.Errorf("want exactly one LeaseStarted, then one LeaseExited")
			}
			if got := len(f.received(isExited("lease-x"))); got != 1 {
				t.Errorf("%d LeaseExited messages; want 1", got)
			}
		})
	}
}

func TestFetchLogs(t *testing.T) {
	big := strings.Repeat("0123456789abcdef", 13_000) // 208 kB: several chunks
	tests := []struct {
		name      string
		lease     string
		script    string // run as lease first, unless empty
		wantData  string
		wantError string
	}{
		{"output larger than a chunk comes back whole and in order", "lease-big",
			`i=0; while [ $i -lt 13000 ]; do printf 0123456789abcdef; i=$((i+1)); done`, big, ""},
		{"stdout and stderr are both captured", "lease-both",
			`echo out; echo err >&2`, "out\nerr\n", ""},
		{"a command that printed nothing has empty logs", "lease-quiet", `true`, "", ""},
		{"a lease never run on the node has no logs", "lease-never", "", "", "no logs for lease lease-never"},
		{"a lease id that escapes the data dir is refused", "../state.json", "", "", "invalid lease id"},
		{"a hidden lease id is refused", ".", "", "", "invalid lease id"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, f, s, _ := agentOnFake(t, "node-l"+strconv.Itoa(i))
			if tt.script != "" {
				s.send(t, startCmd(1, shLease(tt.lease, tt.script)))
				if x := f.awaitExited(t, tt.lease); x.GetExitCode() != 0 {
					t.Fatalf("command exited %v", x)
				}
			}
			data, last := f.fetchLogs(t, s, 1, tt.lease)
			if !strings.Contains(last.GetError(), tt.wantError) || (tt.wantError == "") != (last.GetError() == "") {
				t.Errorf("error = %q; want %q", last.GetError(), tt.wantError)
			}
			if string(data) != tt.wantData {
				t.Errorf("logs = %d bytes %.40q...; want %d bytes %.40q...", len(data), data, len(tt.wantData), tt.wantData)
			}
		})
	}
}

func TestReleaseLease(t *testing.T) {
	t.Run("release stops a running command with SIGTERM, wipes scratch and keeps logs", func(t *testing.T) {
		n, f, s, _ := agentOnFake(t, "node-r1")
		s.send(t, startCmd(1, shLease("lease-r",
			`echo hello; echo junk > "$GPUSCHED_SCRATCH_DIR/junk"; sleep 60`)))
		pid := int(f.awaitStarted(t, "lease-r").GetPid())
		junk := filepath.Join(n.scratchDir("lease-r"), "junk")
		eventually(t, "the command to write to its scratch dir", func() bool {
			b, _ := os.ReadFile(junk)
			return string(b) == "junk\n"
		})

		s.send(t, releaseCmd(1, "lease-r", 10*time.Second))
		if r := f.awaitReleased(t, "lease-r"); !r.GetClean() || r.GetMessage() != "" {
			t.Errorf("LeaseReleased = %v; want clean, no message", r)
		}
		if x := f.awaitExited(t, "lease-r"); x.GetSignal() != "SIGTERM" || x.GetExitCode() != -1 {
			t.Errorf("LeaseExited = %v; want killed by SIGTERM", x)
		}
		eventually(t, "the command's process to be gone", func() bool { return processGone(pid) })
		if _, err := os.Stat(n.scratchDir("lease-r")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("scratch dir after release: %v; want it removed", err)
		}
		if data, last := f.fetchLogs(t, s, 1, "lease-r"); string(data) != "hello\n" || last.GetError() != "" {
			t.Errorf("logs after release = %q (error %q); want %q", data, last.GetError(), "hello\n")
		}
		st, err := loadState(n.dir)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Leases) != 0 {
			t.Errorf("state after release still holds %v", st.Leases)
		}

		// The node is free again.
		s.send(t, startCmd(1, shLease("lease-next", "exit 0")))
		f.awaitStarted(t, "lease-next")
		if x := f.awaitExited(t, "lease-next"); x.GetExitCode() != 0 {
			t.Errorf("next lease on the released node: %v; want exit 0", x)
		}
	})

	t.Run("release kills a command that ignores SIGTERM once the release's grace is over", func(t *testing.T) {
		// The agent's own grace is an hour: only the release's 200ms can
		// end this test in time.
		n, f, s, _ := agentOnFake(t, "node-r2", func(c *Config) { c.StopGrace = time.Hour })
		s.send(t, startCmd(1, shLease("lease-stubborn",
			`trap '' TERM; touch "$GPUSCHED_SCRATCH_DIR/ready"; while :; do sleep 1; done`)))
		pid := int(f.awaitStarted(t, "lease-stubborn").GetPid())
		eventually(t, "the command to ignore SIGTERM", func() bool {
			_, err := os.Stat(filepath.Join(n.scratchDir("lease-stubborn"), "ready"))
			return err == nil
		})

		s.send(t, releaseCmd(1, "lease-stubborn", 200*time.Millisecond))
		if r := f.awaitReleased(t, "lease-stubborn"); !r.GetClean() {
			t.Errorf("LeaseReleased = %v; want clean", r)
		}
		if x := f.awaitExited(t, "lease-stubborn"); x.GetSignal() != "SIGKILL" {
			t.Errorf("LeaseExited = %v; want killed by SIGKILL", x)
		}
		eventually(t, "the command's process to be gone", func() bool { return processGone(pid) })
	})

	t.Run("release of a lease whose command already exited just cleans up", func(t *testing.T) {
		n, f, s, _ := agentOnFake(t, "node-r3")
		s.send(t, startCmd(1, shLease("lease-done", `echo x > "$GPUSCHED_SCRATCH_DIR/x"; exit 2`)))
		if x := f.awaitExited(t, "lease-done"); x.GetExitCode() != 2 {
			t.Fatalf("LeaseExited = %v; want exit 2", x)
		}
		s.send(t, releaseCmd(1, "lease-done", time.Second))
		if r := f.awaitReleased(t, "lease-done"); !r.GetClean() {
			t.Errorf("LeaseReleased = %v; want clean", r)
		}
		f.barrier(t, s, 1)
		if got := len(f.received(isExited("lease-done"))); got != 1 {
			t.Errorf("%d LeaseExited messages; want 1", got)
		}
		if _, err := os.Stat(n.scratchDir("lease-done")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("scratch dir after release: %v; want it removed", err)
		}
	})

	t.Run("release of a lease the node never held is answered clean", func(t *testing.T) {
		_, f, s, _ := agentOnFake(t, "node-r4")
		s.send(t, releaseCmd(1, "lease-unknown", time.Second))
		if r := f.awaitReleased(t, "lease-unknown"); !r.GetClean() {
			t.Errorf("LeaseReleased = %v; want clean", r)
		}
	})
}

func TestReleaseWithALeftoverGPUProcessIsNotClean(t *testing.T) {
	tests := []struct {
		name    string
		running bool // the released lease's command is still running
		gpu     int
	}{
		{"a GPU process the lease left behind makes its release unclean", true, 0},
		{"a GPU process on the last GPU makes the release unclean", true, 7},
		{"a GPU process on an idle node makes a repeated release unclean", false, 3},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Reported, not killed, so that it is still there at the end of
			// the cleanup's (short) wait.
			n, f, s, _ := agentOnFake(t, "node-gpu"+strconv.Itoa(i), func(c *Config) {
				c.ForeignProcessPolicy = ForeignReport
				c.CleanupTimeout = 300 * time.Millisecond
			})
			if tt.running {
				s.send(t, startCmd(1, shLease("lease-gpu", "exec sleep 60")))
				f.awaitStarted(t, "lease-gpu")
			}
			// Something the group kill cannot reach.
			leftover := startProcess(t, "sleep", "60")
			f.mustInject(t, s, injectProcess(tt.gpu, leftover.pid))
			s.send(t, releaseCmd(1, "lease-gpu", 5*time.Second))
			r := f.awaitReleased(t, "lease-gpu")
			wantGPU := "GPU " + strconv.Itoa(tt.gpu)
			wantPID := strconv.Itoa(leftover.pid)
			if r.GetClean() || !strings.Contains(r.GetMessage(), wantGPU) || !strings.Contains(r.GetMessage(), wantPID) {
				t.Errorf("LeaseReleased = %v; want not clean, naming %s and pid %s", r, wantGPU, wantPID)
			}
			ev := f.await(t, "a CLEANUP_FAILED event", isEvent(pb.NodeEventKind_NODE_EVENT_KIND_CLEANUP_FAILED)).GetNodeEvent()
			if ev.GetLeaseId() != "lease-gpu" || !strings.Contains(ev.GetMessage(), wantPID) {
				t.Errorf("CLEANUP_FAILED event = %v; want it on lease-gpu, naming pid %s", ev, wantPID)
			}
			if tt.running {
				if x := f.awaitExited(t, "lease-gpu"); x.GetSignal() != "SIGTERM" {
					t.Errorf("LeaseExited = %v; want killed by SIGTERM", x)
				}
				if _, err := os.Stat(n.scratchDir("lease-gpu")); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("scratch dir after release: %v; want it removed", err)
				}
			}
			if processGone(leftover.pid) {
				t.Errorf("the leftover process was killed under the report policy")
			}
		})
	}
}

func TestASecondLeaseIsRefusedWhileOneIsHeld(t *testing.T) {
	n, f, s, _ := agentOnFake(t, "node-excl")
	s.send(t, startCmd(1, shLease("lease-a", "exec sleep 60")))
	pid := int(f.awaitStarted(t, "lease-a").GetPid())
	n.gpus.Mock.SetProcesses(0, []uint32{uint32(pid)}) // lease-a uses the GPUs

	// Every refusal names the lease that holds the node, not an earlier
	// refused one.
	for _, id := range []string{"lease-b", "lease-c", "lease-d", "lease-e"} {
		s.send(t, startCmd(1, shLease(id, "exec sleep 60")))
		x := f.awaitExited(t, id)
		if x.GetExitCode() == 0 || !strings.Contains(x.GetMessage(), "lease-a") {
			t.Errorf("LeaseExited for %s = %v; want a failure naming lease-a", id, x)
		}
	}
	// A re-sent start of the held lease is not a second lease either.
	s.send(t, startCmd(1, shLease("lease-a", "exec sleep 60")))
	f.barrier(t, s, 1)
	for _, id := range []string{"lease-b", "lease-c", "lease-d", "lease-e"} {
		if got := f.received(isStarted(id)); len(got) != 0 {
			t.Errorf("the refused lease started: %v", got)
		}
	}
	if got := f.received(isStarted("lease-a")); len(got) != 1 {
		t.Errorf("%d LeaseStarted for lease-a; want 1 (a re-sent start is not run again)", len(got))
	}

	// The scheduler releases a refused lease (its job failed here): that
	// cleans up nothing of lease-a's, and lease-a's GPU processes do not
	// make the node unclean.
	s.send(t, releaseCmd(1, "lease-b", time.Second))
	if r := f.awaitReleased(t, "lease-b"); !r.GetClean() {
		t.Errorf("LeaseReleased for a refused lease = %v; want clean", r)
	}
	f.barrier(t, s, 1)
	if got := f.received(isExited("lease-a")); len(got) != 0 {
		t.Errorf("the held lease was disturbed: %v", got)
	}
	if processGone(pid) {
		t.Errorf("the held lease's command died")
	}

	// Once the lease that held it is released, the node is free again.
	n.gpus.Mock.SetProcesses(0, nil)
	s.send(t, releaseCmd(1, "lease-a", 5*time.Second))
	if r := f.awaitReleased(t, "lease-a"); !r.GetClean() {
		t.Errorf("LeaseReleased for lease-a = %v; want clean", r)
	}
	s.send(t, startCmd(1, shLease("lease-f", "exit 0")))
	f.awaitStarted(t, "lease-f")
	if x := f.awaitExited(t, "lease-f"); x.GetExitCode() != 0 {
		t.Errorf("a new lease on the released node: %v; want exit 0", x)
	}
}

func TestReportsAreNotLostWhileLogsFillTheStream(t *testing.T) {
	_, f, s, a := agentOnFake(t, "node-flood")
	// A lease that left 64 KiB of logs behind.
	s.send(t, startCmd(1, shLease("lease-log", "head -c 65536 /dev/zero")))
	if x := f.awaitExited(t, "lease-log"); x.GetExitCode() != 0 {
		t.Fatalf("LeaseExited = %v; want exit 0", x)
	}
	s.send(t, releaseCmd(1, "lease-log", time.Second))
	f.awaitReleased(t, "lease-log")
	s.send(t, startCmd(1, shLease("lease-busy", "exec sleep 60")))
	f.awaitStarted(t, "lease-busy")

	// The scheduler stops reading while it asks for those logs again and
	// again, until the agent's stream is backed up with log chunks.
	f.pauseReading()
	eventually(t, "the agent's send queue to fill with log chunks", func() bool {
		if sendQueueFull(a.Agent) {
			return true
		}
		for range 16 {
			s.sendWait(t, fetchCmd(1, f.requestID(), "lease-log"))
		}
		return false
	})
	// Now the lease ends: its exit and release must still get through.
	s.send(t, releaseCmd(1, "lease-busy", 5*time.Second))
	eventually(t, "the agent to finish releasing lease-busy", func() bool { return !a.holds("lease-busy") })
	f.resumeReading()
	if x := f.awaitExited(t, "lease-busy"); x.GetSignal() != "SIGTERM" {
		t.Errorf("LeaseExited = %v; want killed by SIGTERM", x)
	}
	if r := f.awaitReleased(t, "lease-busy"); !r.GetClean() {
		t.Errorf("LeaseReleased = %v; want clean", r)
	}
}

// sendQueueFull reports whether the agent's current stream has no room left
// for log chunks.
func sendQueueFull(a *Agent) bool {
	a.mu.Lock()
	s := a.session
	a.mu.Unlock()
	return s != nil && len(s.logSlots) == cap(s.logSlots)
}
