package gpu_test

// Tests against this machine's real GPUs, through the same code the node
// agent runs in production: gpu.Open("nvml"), then ReadInventory,
// ReadTelemetry, CheckHealth, WatchXIDs and ListGPUProcesses, and a whole
// nodeagent.Agent on real NVML for exclusivity. Every other test of the
// project uses go-nvml's mock DGX servers.
//
// They run only with GPUSCHED_TEST_REAL_NVML=1 and skip otherwise.
// scripts/device-check.sh sets that and, from nvidia-smi, the values the
// tests compare with:
//
//	GPUSCHED_EXPECT_UUIDS  the GPU UUIDs in index order, comma-separated
//	                       (nvidia-smi --query-gpu=uuid --format=csv,noheader)
//	GPUSCHED_EXPECT_GPUS   one line per GPU: index, uuid, name, memory.total
//	                       (MiB), pci.bus_id, driver_version
//	                       (nvidia-smi --query-gpu=... --format=csv,noheader,nounits)
//	GPUSCHED_FOREIGN_PID   a process, started outside any lease, that holds
//	                       a CUDA context on GPU 0: the agent must report it
//	                       as a foreign GPU process
//
// Everything read is logged (run with -test.v), so the output is a record of
// what real NVML said.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpusched/gpusched/internal/gpumodel"
	"github.com/gpusched/gpusched/nodeagent"
	"github.com/gpusched/gpusched/nodeagent/gpu"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Environment of the real-NVML tests (see the comment above).
const (
	envRealNVML    = "GPUSCHED_TEST_REAL_NVML"
	envExpectUUIDs = "GPUSCHED_EXPECT_UUIDS"
	envExpectGPUs  = "GPUSCHED_EXPECT_GPUS"
	envForeignPID  = "GPUSCHED_FOREIGN_PID"
)

// openReal opens the real NVML backend exactly as the agent does, or skips
// the test when real-NVML tests are not asked for.
func openReal(t *testing.T) *gpu.Backend {
	t.Helper()
	if os.Getenv(envRealNVML) != "1" {
		t.Skipf("needs a machine with an NVIDIA GPU: set %s=1 to run (scripts/device-check.sh does)", envRealNVML)
	}
	b, err := gpu.Open(gpu.BackendNVML)
	if err != nil {
		t.Fatalf("gpu.Open(%q): %v", gpu.BackendNVML, err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	if b.Mock != nil {
		t.Fatalf("gpu.Open(%q) returned a simulated node", gpu.BackendNVML)
	}
	return b
}

// realInventory reads and logs the inventory; the test fails without one.
func realInventory(t *testing.T, lib nvml.Interface) gpu.Inventory {
	t.Helper()
	inv, err := gpu.ReadInventory(lib)
	if err != nil {
		t.Fatalf("ReadInventory: %v", err)
	}
	if inv.GPUCount < 1 || len(inv.GPUs) != inv.GPUCount {
		t.Fatalf("ReadInventory: GPUCount %d with %d GPUs listed; want at least 1, equal", inv.GPUCount, len(inv.GPUs))
	}
	return inv
}

// expectedGPU is one line of GPUSCHED_EXPECT_GPUS.
type expectedGPU struct {
	index           int
	uuid, name      string
	memMiB          uint64
	pciBusID, drvVr string
}

// expectedGPUs parses GPUSCHED_EXPECT_GPUS; nil when unset.
func expectedGPUs(t *testing.T) []expectedGPU {
	t.Helper()
	raw := strings.TrimSpace(os.Getenv(envExpectGPUs))
	if raw == "" {
		return nil
	}
	var out []expectedGPU
	for line := range strings.SplitSeq(raw, "\n") {
		f := strings.Split(line, ",")
		for i := range f {
			f[i] = strings.TrimSpace(f[i])
		}
		if len(f) != 6 {
			t.Fatalf("%s: line %q has %d fields, want 6 (index, uuid, name, memory.total, pci.bus_id, driver_version)", envExpectGPUs, line, len(f))
		}
		idx, err1 := strconv.Atoi(f[0])
		mem, err2 := strconv.ParseUint(f[3], 10, 64)
		if err1 != nil || err2 != nil {
			t.Fatalf("%s: line %q: bad index or memory.total", envExpectGPUs, line)
		}
		out = append(out, expectedGPU{index: idx, uuid: f[1], name: f[2], memMiB: mem, pciBusID: f[4], drvVr: f[5]})
	}
	return out
}

// foreignPID is GPUSCHED_FOREIGN_PID; 0 when unset.
func foreignPID(t *testing.T) uint32 {
	t.Helper()
	s := os.Getenv(envForeignPID)
	if s == "" {
		return 0
	}
	pid, err := strconv.ParseUint(s, 10, 32)
	if err != nil || pid <= 1 {
		t.Fatalf("%s=%q: not a PID", envForeignPID, s)
	}
	if err := syscall.Kill(int(pid), 0); err != nil {
		t.Fatalf("%s=%d: process not running: %v", envForeignPID, pid, err)
	}
	return uint32(pid)
}

var (
	uuidRE    = regexp.MustCompile(`^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	pciRE     = regexp.MustCompile(`^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]$`)
	driverRE  = regexp.MustCompile(`^\d+\.\d+(\.\d+)?$`)
	cudaVerRE = regexp.MustCompile(`^(\d+)\.\d+$`)
)

func TestRealNVMLInventory(t *testing.T) {
	b := openReal(t)
	inv := realInventory(t, b.NVML)
	t.Logf("driver %s, CUDA %s, model %q, %d GPU(s), smallest memory %d MiB, CUDA_VISIBLE_DEVICES=%s",
		inv.DriverVersion, inv.CUDAVersion, inv.GPUModel, inv.GPUCount, inv.GPUMemoryBytes>>20, inv.VisibleDevices())
	for _, g := range inv.GPUs {
		t.Logf("GPU %d: %s  %q  %d MiB  PCI %s  model %q", g.Index, g.UUID, g.Name, g.MemoryBytes>>20, g.PCIBusID, gpumodel.FromProductName(g.Name))
	}

	if !driverRE.MatchString(inv.DriverVersion) {
		t.Errorf("DriverVersion %q, want like 580.65.06", inv.DriverVersion)
	}
	if m := cudaVerRE.FindStringSubmatch(inv.CUDAVersion); m == nil {
		t.Errorf("CUDAVersion %q, want like 13.0", inv.CUDAVersion)
	} else if major, _ := strconv.Atoi(m[1]); major < 11 {
		t.Errorf("CUDAVersion %q: implausibly old for a driver that runs this code", inv.CUDAVersion)
	}
	if inv.GPUModel == "" || strings.Contains(inv.GPUModel, "+") {
		t.Errorf("GPUModel %q, want one model", inv.GPUModel)
	}
	seen := map[string]bool{}
	var minMem uint64
	for i, g := range inv.GPUs {
		if g.Index != i {
			t.Errorf("GPU %d: Index %d", i, g.Index)
		}
		if !uuidRE.MatchString(g.UUID) {
			t.Errorf("GPU %d: UUID %q, want GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", i, g.UUID)
		}
		if seen[g.UUID] {
			t.Errorf("GPU %d: UUID %s listed twice", i, g.UUID)
		}
		seen[g.UUID] = true
		if g.Name == "" {
			t.Errorf("GPU %d: empty name", i)
		}
		// The scheduler matches --gpu-model against this.
		if m := gpumodel.FromProductName(g.Name); !slices.Contains(gpumodel.Known(), m) {
			t.Errorf("GPU %d: product %q maps to model %q, not one of %v: jobs asking for a model never match this node",
				i, g.Name, m, gpumodel.Known())
		}
		if g.MemoryBytes < 1<<30 {
			t.Errorf("GPU %d: memory %d bytes, want at least 1 GiB", i, g.MemoryBytes)
		}
		if !pciRE.MatchString(g.PCIBusID) {
			t.Errorf("GPU %d: PCI bus id %q, want like 00000000:18:00.0", i, g.PCIBusID)
		}
		if i == 0 || g.MemoryBytes < minMem {
			minMem = g.MemoryBytes
		}
	}
	if inv.GPUMemoryBytes != minMem {
		t.Errorf("GPUMemoryBytes %d, want the smallest GPU's, %d", inv.GPUMemoryBytes, minMem)
	}

	// What nvidia-smi said, when the caller passed it on.
	if raw := os.Getenv(envExpectUUIDs); raw != "" {
		want := strings.Split(strings.ReplaceAll(strings.TrimSpace(raw), "\n", ","), ",")
		for i := range want {
			want[i] = strings.TrimSpace(want[i])
		}
		if got := inv.UUIDs(); !slices.Equal(got, want) {
			t.Errorf("UUIDs %v, nvidia-smi says %v", got, want)
		}
	} else {
		t.Logf("%s not set: UUIDs not compared with nvidia-smi", envExpectUUIDs)
	}
	exp := expectedGPUs(t)
	if exp == nil {
		t.Logf("%s not set: inventory not compared with nvidia-smi", envExpectGPUs)
		return
	}
	if len(exp) != inv.GPUCount {
		t.Fatalf("%d GPUs through NVML, nvidia-smi lists %d", inv.GPUCount, len(exp))
	}
	for i, e := range exp {
		g := inv.GPUs[i]
		if e.index != g.Index || e.uuid != g.UUID || e.name != g.Name {
			t.Errorf("GPU %d: index/uuid/name %d %s %q; nvidia-smi: %d %s %q", i, g.Index, g.UUID, g.Name, e.index, e.uuid, e.name)
		}
		// nvidia-smi prints MiB; allow 1% in case it uses another memory
		// info version than the v1 call the inventory makes.
		if got := g.MemoryBytes >> 20; got*100 < e.memMiB*99 || got*100 > e.memMiB*101 {
			t.Errorf("GPU %d: memory %d MiB; nvidia-smi: %d MiB", i, got, e.memMiB)
		} else if got != e.memMiB {
			t.Logf("GPU %d: memory %d MiB; nvidia-smi: %d MiB (within 1%%)", i, got, e.memMiB)
		}
		if !strings.EqualFold(e.pciBusID, g.PCIBusID) {
			t.Errorf("GPU %d: PCI bus id %s; nvidia-smi: %s", i, g.PCIBusID, e.pciBusID)
		}
		if e.drvVr != inv.DriverVersion {
			t.Errorf("driver version %s; nvidia-smi: %s", inv.DriverVersion, e.drvVr)
		}
	}
}

// Clock event (throttle) reason bits, for the log.
var throttleBits = []struct {
	bit  uint64
	name string
}{
	{0x1, "GpuIdle"}, {0x2, "ApplicationsClocksSetting"}, {0x4, "SwPowerCap"}, {0x8, "HwSlowdown"},
	{0x10, "SyncBoost"}, {0x20, "SwThermalSlowdown"}, {0x40, "HwThermalSlowdown"},
	{0x80, "HwPowerBrakeSlowdown"}, {0x100, "DisplayClockSetting"},
}

func throttleString(r uint64) string {
	var names []string
	for _, b := range throttleBits {
		if r&b.bit != 0 {
			names = append(names, b.name)
		}
	}
	if len(names) == 0 {
		return fmt.Sprintf("%#x", r)
	}
	return fmt.Sprintf("%#x (%s)", r, strings.Join(names, "|"))
}

func logSample(t *testing.T, s gpu.Sample) {
	t.Helper()
	t.Logf("GPU %d %s: util %d%% memutil %d%%, FB used %d MiB free %d MiB, %d °C, %.1f W, SM %d MHz, mem %d MHz, "+
		"clock events %s, ECC volatile SBE %d DBE %d, remapped rows corr %d unc %d",
		s.Index, s.UUID, s.GPUUtil, s.MemUtil, s.FBUsedBytes>>20, s.FBFreeBytes>>20, s.TempC,
		float64(s.PowerMilliwatts)/1000, s.SMClockMHz, s.MemClockMHz, throttleString(s.ThrottleReasons),
		s.ECCVolatileSBE, s.ECCVolatileDBE, s.RemappedRowsCorrectable, s.RemappedRowsUncorrectable)
}

func TestRealNVMLTelemetry(t *testing.T) {
	b := openReal(t)
	inv := realInventory(t, b.NVML)
	t.Logf("library exports nvmlDeviceGetCurrentClocksEventReasons: %v (else the pre-R535 name is used)",
		b.NVML.Extensions().LookupSymbol("nvmlDeviceGetCurrentClocksEventReasons") == nil)

	// The agent reads every GPU once per --telemetry-interval (1s): a
	// read must take well under that.
	var slowest time.Duration
	for round := range 3 {
		start := time.Now()
		samples, err := gpu.ReadTelemetry(b.NVML)
		took := time.Since(start)
		slowest = max(slowest, took)
		if err != nil {
			t.Fatalf("ReadTelemetry (round %d): %v", round, err)
		}
		t.Logf("round %d: ReadTelemetry took %v", round, took)
		if len(samples) != inv.GPUCount {
			t.Fatalf("ReadTelemetry: %d samples for %d GPUs", len(samples), inv.GPUCount)
		}
		for i, s := range samples {
			logSample(t, s)
			if round > 0 {
				continue // the values are checked once; later rounds time the read and log
			}
			g := inv.GPUs[i]
			if s.Index != i || s.UUID != g.UUID {
				t.Errorf("sample %d: GPU %d %s, want GPU %d %s", i, s.Index, s.UUID, i, g.UUID)
			}
			if s.GPUUtil > 100 || s.MemUtil > 100 {
				t.Errorf("GPU %d: utilization %d%%/%d%%, want at most 100", i, s.GPUUtil, s.MemUtil)
			}
			if total := s.FBUsedBytes + s.FBFreeBytes; s.FBFreeBytes == 0 || total > g.MemoryBytes || total < g.MemoryBytes/10*9 {
				t.Errorf("GPU %d: FB used %d + free %d = %d bytes, want non-zero free and a sum within 90-100%% of the %d total",
					i, s.FBUsedBytes, s.FBFreeBytes, total, g.MemoryBytes)
			}
			if s.TempC < 10 || s.TempC > 95 {
				t.Errorf("GPU %d: temperature %d °C, want 10-95 (0 means NVML did not support the read)", i, s.TempC)
			}
			if s.PowerMilliwatts < 10_000 || s.PowerMilliwatts > 1_500_000 {
				t.Errorf("GPU %d: power %d mW, want 10-1500 W (0 means NVML did not support the read)", i, s.PowerMilliwatts)
			}
			if s.SMClockMHz == 0 || s.SMClockMHz > 4000 {
				t.Errorf("GPU %d: SM clock %d MHz, want 1-4000", i, s.SMClockMHz)
			}
			if s.MemClockMHz == 0 || s.MemClockMHz > 20000 {
				t.Errorf("GPU %d: memory clock %d MHz, want 1-20000", i, s.MemClockMHz)
			}
			if s.ECCVolatileDBE != 0 {
				t.Errorf("GPU %d: %d uncorrectable ECC errors since the driver loaded: the agent will report this node unhealthy", i, s.ECCVolatileDBE)
			}
			if s.RemappedRowsCorrectable < 0 || s.RemappedRowsUncorrectable < 0 {
				t.Errorf("GPU %d: negative remapped row counts %d/%d", i, s.RemappedRowsCorrectable, s.RemappedRowsUncorrectable)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	if slowest > 500*time.Millisecond {
		t.Errorf("ReadTelemetry took up to %v: too slow for the agent's 1s sampling interval", slowest)
	}
}

func TestRealNVMLHealth(t *testing.T) {
	b := openReal(t)
	inv := realInventory(t, b.NVML)

	// The raw readings behind the checks, for the record.
	for i := range inv.GPUCount {
		dev, ret := b.NVML.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			t.Fatalf("DeviceGetHandleByIndex(%d): %v", i, ret)
		}
		cur, pend, ret := dev.GetEccMode()
		t.Logf("GPU %d: ECC mode current %v pending %v (%v)", i, cur, pend, ret)
		corr, unc, pending, failure, ret := dev.GetRemappedRows()
		t.Logf("GPU %d: remapped rows corr %d unc %d pending %v failure %v (%v)", i, corr, unc, pending, failure, ret)
		retired, ret := dev.GetRetiredPagesPendingStatus()
		t.Logf("GPU %d: retired pages pending %v (%v)", i, retired, ret)
	}

	// Production settings: every GPU present, at most 90 °C.
	if problems := gpu.CheckHealth(b.NVML, inv.GPUCount, 90); len(problems) > 0 {
		t.Errorf("CheckHealth(%d GPUs, 90 °C) found problems; the agent would report this node unhealthy:", inv.GPUCount)
		for _, p := range problems {
			t.Errorf("  %s", p)
		}
	} else {
		t.Logf("CheckHealth(%d GPUs, 90 °C): healthy", inv.GPUCount)
	}

	// The checks really read the hardware: a missing GPU and a 1 °C limit
	// must both show.
	problems := gpu.CheckHealth(b.NVML, inv.GPUCount+1, 1)
	t.Logf("CheckHealth(%d GPUs, 1 °C): %v", inv.GPUCount+1, problems)
	missing := slices.ContainsFunc(problems, func(p gpu.Problem) bool {
		return p.GPU == gpu.NodeProblem && strings.Contains(p.What, "GPUs visible")
	})
	if !missing {
		t.Errorf("CheckHealth with one GPU more than present: no 'GPUs visible' problem in %v", problems)
	}
	for i := range inv.GPUCount {
		hot := slices.ContainsFunc(problems, func(p gpu.Problem) bool {
			return p.GPU == i && strings.Contains(p.What, "temperature")
		})
		if !hot {
			t.Errorf("CheckHealth with a 1 °C limit: no temperature problem for GPU %d in %v", i, problems)
		}
	}
}

func TestRealNVMLXIDEvents(t *testing.T) {
	b := openReal(t)
	inv := realInventory(t, b.NVML)
	for i := range inv.GPUCount {
		dev, _ := b.NVML.DeviceGetHandleByIndex(i)
		types, ret := dev.GetSupportedEventTypes()
		t.Logf("GPU %d: supported event types %#x (%v): XID %v, double-bit ECC %v", i, types, ret,
			types&nvml.EventTypeXidCriticalError != 0, types&nvml.EventTypeDoubleBitEccError != 0)
	}

	w, err := gpu.WatchXIDs(b.NVML)
	if err != nil {
		t.Fatalf("WatchXIDs: %v", err)
	}
	defer w.Close()
	if u := w.Unwatched(); len(u) > 0 {
		t.Errorf("GPUs %v report no XID events: the agent would learn of faults only from periodic health checks", u)
	}

	// A healthy idle GPU raises no XID; Next must wait out its timeout
	// (it waits in 100ms slices) and return nothing.
	const wait = 2 * time.Second
	start := time.Now()
	ev, ok, err := w.Next(wait)
	took := time.Since(start)
	t.Logf("Next(%v) after %v: event %+v ok %v err %v", wait, took, ev, ok, err)
	switch {
	case err != nil:
		t.Errorf("Next: %v", err)
	case ok:
		t.Logf("an XID arrived during the test: XID %d on GPU %d (%s), severity %s", ev.XID, ev.GPU, ev.UUID, gpu.ClassifyXID(ev.XID))
		if gpu.ClassifyXID(ev.XID) == gpu.SeverityFatal {
			t.Errorf("fatal XID %d on GPU %d: the agent would report this node unhealthy", ev.XID, ev.GPU)
		}
	case took < wait*3/4 || took > wait+2*time.Second:
		t.Errorf("Next(%v) returned nothing after %v: want it to wait about %v", wait, took, wait)
	}

	// Close while a Next waits, as the agent does on shutdown.
	done := make(chan error, 1)
	go func() {
		_, _, err := w.Next(10 * time.Second)
		done <- err
	}()
	time.Sleep(300 * time.Millisecond)
	closeStart := time.Now()
	if err := w.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case err := <-done:
		t.Logf("Next returned %v %v after Close", err, time.Since(closeStart))
		if !errors.Is(err, gpu.ErrWatcherClosed) {
			t.Errorf("Next during Close: %v, want ErrWatcherClosed", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatalf("Next still waiting 3s after Close")
	}
	if err := w.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// procComm is /proc/<pid>/comm, or why it cannot be read.
func procComm(pid uint32) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(int(pid)) + "/comm")
	if err != nil {
		return "unreadable: " + err.Error()
	}
	return strings.TrimSpace(string(b))
}

func TestRealNVMLProcesses(t *testing.T) {
	b := openReal(t)
	inv := realInventory(t, b.NVML)
	pid := foreignPID(t)

	procs, err := gpu.ListGPUProcesses(b.NVML)
	if err != nil {
		t.Fatalf("ListGPUProcesses: %v", err)
	}
	for i := range inv.GPUCount {
		pids, ok := procs[i]
		if !ok {
			t.Errorf("GPU %d missing from ListGPUProcesses (every GPU must have an entry)", i)
		}
		for _, p := range pids {
			// The agent reads /proc/<pid>/stat of every listed PID; a PID
			// NVML reports from another PID namespace is invisible here.
			t.Logf("GPU %d: process %d (%s)", i, p, procComm(p))
		}
		if len(pids) == 0 {
			t.Logf("GPU %d: no processes", i)
		}
	}
	if len(procs) != inv.GPUCount {
		t.Errorf("ListGPUProcesses: %d entries for %d GPUs", len(procs), inv.GPUCount)
	}
	if pid == 0 {
		t.Logf("%s not set: not checking that a known process is listed", envForeignPID)
		return
	}
	var on []int
	for g, pids := range procs {
		if slices.Contains(pids, pid) {
			on = append(on, g)
		}
	}
	slices.Sort(on)
	switch {
	case len(on) == 0:
		t.Errorf("process %d (%s), which holds a CUDA context on GPU 0, is not listed by NVML: %v "+
			"(PIDs from another PID namespace?)", pid, procComm(pid), procs)
	case !slices.Contains(on, 0):
		t.Errorf("process %d is listed on GPUs %v, want GPU 0", pid, on)
	default:
		t.Logf("process %d (%s) listed on GPUs %v", pid, procComm(pid), on)
	}
}

// recordingScheduler plays the scheduler's side of one agent stream: it
// welcomes the agent, heartbeats, and records every message.
type recordingScheduler struct {
	pb.UnimplementedAgentServiceServer

	mu   sync.Mutex
	msgs []*pb.ConnectRequest
}

func (s *recordingScheduler) Connect(stream pb.AgentService_ConnectServer) error {
	hello, err := stream.Recv()
	if err != nil {
		return err
	}
	s.record(hello)
	if err := stream.Send(&pb.ConnectResponse{FencingToken: 1, Msg: &pb.ConnectResponse_Welcome{
		Welcome: &pb.Welcome{HeartbeatInterval: durationpb.New(500 * time.Millisecond)}}}); err != nil {
		return err
	}
	recvErr := make(chan error, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			s.record(m)
		}
	}()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-recvErr:
			return err
		case <-tick.C:
			if err := stream.Send(&pb.ConnectResponse{FencingToken: 1, Msg: &pb.ConnectResponse_Heartbeat{Heartbeat: &pb.Heartbeat{}}}); err != nil {
				return err
			}
		}
	}
}

func (s *recordingScheduler) record(m *pb.ConnectRequest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msgs = append(s.msgs, m)
}

// matching returns the messages received so far that match pred.
func (s *recordingScheduler) matching(pred func(*pb.ConnectRequest) bool) []*pb.ConnectRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*pb.ConnectRequest
	for _, m := range s.msgs {
		if pred(m) {
			out = append(out, m)
		}
	}
	return out
}

// await waits up to limit for n messages matching pred.
func (s *recordingScheduler) await(t *testing.T, what string, n int, limit time.Duration, pred func(*pb.ConnectRequest) bool) []*pb.ConnectRequest {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		if ms := s.matching(pred); len(ms) >= n {
			return ms
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", limit, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRealNVMLAgent runs a whole node agent on real NVML against a
// recording scheduler: its hello (inventory), health verdict, telemetry
// batches (every GpuSample field the agent reports) and, with
// GPUSCHED_FOREIGN_PID, exclusivity: the monitor's round
// (ListGPUProcesses, then the ownership check of nodeagent/exclusivity.go)
// must report that process as foreign on its GPU, once, and make the idle
// node's health check fail. The policy is "report", so the process is
// left alone; scripts/device-check.sh checks the kill end to end.
func TestRealNVMLAgent(t *testing.T) {
	b := openReal(t)
	inv := realInventory(t, b.NVML)
	pid := foreignPID(t)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sched := &recordingScheduler{}
	srv := grpc.NewServer()
	pb.RegisterAgentServiceServer(srv, sched)
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(lis) }()
	defer func() { srv.Stop(); <-served }()

	const interval = 250 * time.Millisecond
	a, err := nodeagent.New(nodeagent.Config{
		NodeID: "real-nvml-test", Servers: []string{lis.Addr().String()}, NVML: b.NVML,
		DataDir: t.TempDir(), Logger: zaptest.NewLogger(t),
		TelemetryInterval: interval, ForeignProcessPolicy: nodeagent.ForeignReport,
	})
	if err != nil {
		t.Fatalf("nodeagent.New on real NVML: %v", err)
	}
	if got := a.Inventory().UUIDs(); !slices.Equal(got, inv.UUIDs()) {
		t.Errorf("agent inventory UUIDs %v, ReadInventory %v", got, inv.UUIDs())
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- a.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case err := <-ran:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Errorf("agent still running 20s after its context ended")
		}
	}()

	hello := sched.await(t, "the agent's hello", 1, 10*time.Second, func(m *pb.ConnectRequest) bool { return m.GetHello() != nil })[0].GetHello()
	t.Logf("hello inventory: %s", compact(hello.GetInventory()))
	hi := hello.GetInventory()
	if int(hi.GetGpuCount()) != inv.GPUCount || hi.GetGpuModel() != inv.GPUModel || hi.GetDriverVersion() != inv.DriverVersion ||
		hi.GetCudaVersion() != inv.CUDAVersion || hi.GetGpuMemoryBytes() != inv.GPUMemoryBytes || len(hi.GetGpus()) != inv.GPUCount {
		t.Errorf("hello inventory %v does not match ReadInventory %+v", hi, inv)
	}
	for i, g := range hi.GetGpus() {
		if i < inv.GPUCount && (g.GetUuid() != inv.GPUs[i].UUID || g.GetPciBusId() != inv.GPUs[i].PCIBusID) {
			t.Errorf("hello GPU %d: %v, want %+v", i, g, inv.GPUs[i])
		}
	}

	// Telemetry: a few rounds, each with every GPU and plausible values in
	// every field the scheduler stores and exports.
	batches := sched.await(t, "3 telemetry batches", 3, 10*time.Second, func(m *pb.ConnectRequest) bool { return m.GetTelemetry() != nil })
	last := batches[len(batches)-1].GetTelemetry()
	t.Logf("telemetry batch: %s", compact(last))
	if last.GetLeaseId() != "" || last.GetJobId() != "" {
		t.Errorf("batch of an idle node attributed to lease %q job %q", last.GetLeaseId(), last.GetJobId())
	}
	if len(last.GetSamples()) != inv.GPUCount {
		t.Fatalf("batch has %d samples for %d GPUs", len(last.GetSamples()), inv.GPUCount)
	}
	for i, s := range last.GetSamples() {
		if int(s.GetGpu()) != i || s.GetUuid() != inv.GPUs[i].UUID {
			t.Errorf("sample %d: GPU %d %s, want %d %s", i, s.GetGpu(), s.GetUuid(), i, inv.GPUs[i].UUID)
		}
		if s.GetGpuTemp() == 0 || s.GetPowerUsageMilliwatts() == 0 || s.GetSmClockMhz() == 0 || s.GetMemClockMhz() == 0 ||
			s.GetFbFreeBytes() == 0 || s.GetFbUsedBytes()+s.GetFbFreeBytes() > inv.GPUs[i].MemoryBytes {
			t.Errorf("sample %d: implausible values (zero temperature, power, clocks or free memory, or more memory than the GPU has): %v", i, s)
		}
	}
	if lt := a.LatestTelemetry(); lt == nil || len(lt.GetSamples()) != inv.GPUCount {
		t.Errorf("LatestTelemetry (the agent's /metrics source): %v", lt)
	}

	health := sched.await(t, "a health report", 1, 10*time.Second, func(m *pb.ConnectRequest) bool { return m.GetHealth() != nil })[0].GetHealth()
	healthy, problems := a.Healthy()
	t.Logf("health report: healthy %v problems %q; Healthy(): %v %q", health.GetHealthy(), health.GetProblems(), healthy, problems)

	isForeign := func(m *pb.ConnectRequest) bool {
		ev := m.GetNodeEvent()
		return ev != nil && ev.GetKind() == pb.NodeEventKind_NODE_EVENT_KIND_FOREIGN_PROCESS
	}
	if pid == 0 {
		t.Logf("%s not set: checking that the idle node is healthy and nothing is foreign", envForeignPID)
		time.Sleep(4 * interval)
		if !health.GetHealthy() || !healthy {
			t.Errorf("idle node reported unhealthy: %q", problems)
		}
		for _, m := range sched.matching(isForeign) {
			t.Errorf("foreign process reported on an idle node nobody else uses: %s", compact(m.GetNodeEvent()))
		}
		return
	}

	// Exclusivity: the process outside any lease is foreign.
	mine := func(m *pb.ConnectRequest) bool { return isForeign(m) && m.GetNodeEvent().GetPid() == pid }
	ev := sched.await(t, fmt.Sprintf("a FOREIGN_PROCESS event for process %d", pid), 1, 15*time.Second, mine)[0].GetNodeEvent()
	t.Logf("foreign process event: %s", compact(ev))
	if ev.GetGpu() != 0 {
		t.Errorf("foreign process event on GPU %d, want 0", ev.GetGpu())
	}
	if ev.GetAction() != "reported" || !strings.Contains(ev.GetMessage(), "on an idle node") || ev.GetLeaseId() != "" || ev.GetNode() != "real-nvml-test" {
		t.Errorf("foreign process event %v: want action reported, on an idle node, no lease, node real-nvml-test", ev)
	}
	// The idle node's health check counts it (the verdict taken at start).
	want := strconv.FormatUint(uint64(pid), 10)
	if health.GetHealthy() || healthy || !slices.ContainsFunc(problems, func(p string) bool { return strings.Contains(p, want) }) {
		t.Errorf("with foreign process %d on the idle node: health report %v, Healthy() %v %q; want unhealthy naming it",
			pid, health, healthy, problems)
	}
	// Reported once, not every round; left alone under the report policy.
	time.Sleep(6 * interval)
	if n := len(sched.matching(mine)); n != 1 {
		t.Errorf("process %d reported %d times over several rounds, want once", pid, n)
	}
	if err := syscall.Kill(int(pid), 0); err != nil {
		t.Errorf("process %d gone under the report policy: %v", pid, err)
	}
	for _, m := range sched.matching(func(m *pb.ConnectRequest) bool { return isForeign(m) && !mine(m) }) {
		t.Logf("other foreign process reported: %s", compact(m.GetNodeEvent()))
	}
}

// compact formats a message on one line, for the log.
func compact(m proto.Message) string { return prototext.MarshalOptions{}.Format(m) }
