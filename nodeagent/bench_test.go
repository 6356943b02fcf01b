package nodeagent

import (
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/gpusched/gpusched/nodeagent/gpu"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// BenchmarkAgentSampling measures one monitor round, what the agent does
// every TelemetryInterval: list the GPU processes and check each against
// the lease (reading /proc), read the telemetry of every GPU and send one
// TelemetryBatch. The node is a simulated DGX H100 (8 GPUs) held by a lease
// whose command, a real process, is on every GPU. At the default interval
// of 1s, the agent's CPU share of one core is cpu-ns/op / 1e9, reported as
// %cpu@1Hz (user + system time of the whole process, so the Go runtime's
// own work, GC included, is counted).
//
//	go test -run '^$' -bench AgentSampling ./nodeagent/
func BenchmarkAgentSampling(b *testing.B) {
	backend, err := gpu.OpenMock(gpu.BackendMockDGXH100, gpu.MockOptions{NodeName: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	defer backend.Close()
	a, err := New(Config{
		NodeID: "bench", Servers: []string{"127.0.0.1:1"}, DataDir: b.TempDir(),
		NVML: backend.NVML, Mock: backend.Mock,
	})
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command("sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); _ = cmd.Wait() }()
	pid := cmd.Process.Pid
	a.state.Leases["bench.1"] = &heldLease{ID: "bench.1", JobID: "bench", PGID: pid, Started: true}
	a.sim.add(-1, uint32(pid))
	s := &session{out: make(chan *pb.ConnectRequest, 1024), logSlots: make(chan struct{}, maxQueuedLogChunks)}
	a.session = s
	r := newSampler()

	var before, after syscall.Rusage
	n := 0
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	for b.Loop() {
		a.sampleOnce(r)
		select {
		case m := <-s.out:
			if t := m.GetTelemetry(); t == nil || len(t.GetSamples()) != 8 || t.GetLeaseId() != "bench.1" {
				b.Fatalf("round sent %v; want one batch of 8 samples of lease bench.1", m)
			}
		default:
			b.Fatal("a round sent no telemetry")
		}
		n++
	}
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	cpu := time.Duration(after.Utime.Nano() + after.Stime.Nano() - before.Utime.Nano() - before.Stime.Nano())
	perRound := float64(cpu.Nanoseconds()) / float64(n)
	b.ReportMetric(perRound, "cpu-ns/op")
	b.ReportMetric(perRound/1e9*100, "%cpu@1Hz")
}
