package gpu

import (
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxb200"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh200"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
)

// mockModel describes one simulated DGX: go-nvml's server for the
// inventory, plus idle telemetry go-nvml does not model. The telemetry is
// plausible, not measured: the scheduler only needs it to be non-zero and
// stable until a later step makes it follow the workload.
type mockModel struct {
	newServer   func() *server.Server
	idlePowerMW uint32
	idleTempC   uint32
	smClockMHz  uint32
	memClockMHz uint32
}

var mockModels = map[string]mockModel{
	BackendMockDGXA100: {dgxa100.New, 55_000, 31, 1410, 1215},
	BackendMockDGXH100: {dgxh100.New, 70_000, 33, 1980, 2619},
	BackendMockDGXH200: {dgxh200.New, 75_000, 33, 1980, 3201},
	BackendMockDGXB200: {dgxb200.New, 140_000, 35, 1965, 3996},
}

// noMIG is the GPU/compute instance id NVML reports for a process on a GPU
// without MIG.
const noMIG = 0xFFFFFFFF

// MockOptions tune a simulated node.
type MockOptions struct {
	// NodeName and Seed, when either is set, derive the GPU UUIDs
	// deterministically, so a simulated node keeps its GPUs across agent
	// restarts and tests can predict them. Left zero, UUIDs are random.
	// Either way every Mock's UUIDs differ from every other node's.
	NodeName string
	// Seed separates simulated nodes that share a NodeName.
	Seed int64
}

// Mock is one simulated GPU node: go-nvml's mock DGX server with the
// telemetry and process calls a node agent makes filled in from state held
// here. The state is guarded by mu so that dynamics and fault injection can
// change it while the agent is reading it.
type Mock struct {
	model  string
	server *server.Server

	mu   sync.Mutex
	gpus []simGPU
}

// simGPU is the changeable state of one simulated GPU.
type simGPU struct {
	memUsedBytes uint64
	util         nvml.Utilization
	tempC        uint32
	powerMW      uint32
	clocksMHz    [nvml.CLOCK_COUNT]uint32
	computePIDs  []uint32
}

// NewMock builds a simulated node of the given model: a mock backend name
// such as "mock-dgxh100", or the bare model "dgxh100". Each call builds a
// new, independent node. It is not initialised; OpenMock is the usual entry.
func NewMock(model string, opts MockOptions) (*Mock, error) {
	name := model
	if !strings.HasPrefix(name, "mock-") {
		name = "mock-" + name
	}
	spec, ok := mockModels[name]
	if !ok {
		return nil, unknownBackend(model)
	}

	m := &Mock{model: name, server: spec.newServer()}
	uuids := mockUUIDs(name, opts, len(m.server.Devices))
	m.gpus = make([]simGPU, len(m.server.Devices))
	for i := range m.server.Devices {
		g := &m.gpus[i]
		g.tempC = spec.idleTempC
		g.powerMW = spec.idlePowerMW
		g.clocksMHz[nvml.CLOCK_GRAPHICS] = spec.smClockMHz
		g.clocksMHz[nvml.CLOCK_SM] = spec.smClockMHz
		g.clocksMHz[nvml.CLOCK_MEM] = spec.memClockMHz
		g.clocksMHz[nvml.CLOCK_VIDEO] = spec.smClockMHz * 9 / 10

		// go-nvml builds its devices with exactly this type; anything else
		// means the mock changed under us and nothing below would hold.
		d := m.server.Devices[i].(*server.Device)
		// Set before anyone can read the server, so the unlocked reads in
		// go-nvml's own funcs (handle by UUID / bus id) are safe.
		d.UUID = uuids[i]
		d.PciBusID = fmt.Sprintf("%08X:%02X:00.0", 0, i)
		m.wireDevice(i, d)
	}
	m.wireServer()
	return m, nil
}

// OpenMock builds and initialises a simulated node (see NewMock) and wraps
// it as a Backend whose Mock field allows injection.
func OpenMock(model string, opts MockOptions) (*Backend, error) {
	m, err := NewMock(model, opts)
	if err != nil {
		return nil, err
	}
	if ret := m.server.Init(); ret != nvml.SUCCESS {
		return nil, fmt.Errorf("gpu: initialising %s: %w", m.model, ret)
	}
	return &Backend{NVML: m.server, Name: m.model, Mock: m}, nil
}

// NVML returns the simulated node as an nvml.Interface.
func (m *Mock) NVML() nvml.Interface { return m.server }

// Model returns the mock backend name, e.g. "mock-dgxh100".
func (m *Mock) Model() string { return m.model }

// SetProcesses replaces the compute processes NVML reports on GPU index gpu,
// as a job starting or a foreign process appearing would. A nil or empty
// pids clears the GPU. It panics if gpu is not a GPU index of this node,
// since that is a bug in the caller, not a simulated fault.
func (m *Mock) SetProcesses(gpu int, pids []uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if gpu < 0 || gpu >= len(m.gpus) {
		panic(fmt.Sprintf("gpu: SetProcesses: GPU index %d out of range [0,%d)", gpu, len(m.gpus)))
	}
	m.gpus[gpu].computePIDs = slices.Clone(pids)
}

// wireDevice points the per-device calls at the simulated state of GPU i.
// go-nvml leaves the telemetry and process calls nil (they panic); the
// inventory calls are replaced too, to fix what go-nvml reports unlike real
// NVML (see the comments inline).
func (m *Mock) wireDevice(i int, d *server.Device) {
	// The DGX A100 mock keeps a legacy "Mock " prefix; a simulated node
	// should report what a real one would.
	name := strings.TrimPrefix(d.Config.Name, "Mock ")
	d.GetNameFunc = func() (string, nvml.Return) { return name, nvml.SUCCESS }

	// go-nvml reports Free = Used = 0; keep Total, derive the rest.
	total := d.MemoryInfo.Total
	d.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
		m.mu.Lock()
		defer m.mu.Unlock()
		used := min(m.gpus[i].memUsedBytes, total)
		return nvml.Memory{Total: total, Used: used, Free: total - used}, nvml.SUCCESS
	}

	// go-nvml fills in only the device id, leaving the bus id empty.
	pci := nvml.PciInfo{Bus: uint32(i), PciDeviceId: d.Config.PciDeviceId}
	putCString(pci.BusId[:], d.PciBusID)
	putCString(pci.BusIdLegacy[:], fmt.Sprintf("%04X:%02X:00.0", 0, i))
	d.GetPciInfoFunc = func() (nvml.PciInfo, nvml.Return) { return pci, nvml.SUCCESS }

	d.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) {
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.gpus[i].util, nvml.SUCCESS
	}
	d.GetTemperatureFunc = func(sensor nvml.TemperatureSensors) (uint32, nvml.Return) {
		if sensor != nvml.TEMPERATURE_GPU {
			return 0, nvml.ERROR_INVALID_ARGUMENT
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.gpus[i].tempC, nvml.SUCCESS
	}
	d.GetPowerUsageFunc = func() (uint32, nvml.Return) {
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.gpus[i].powerMW, nvml.SUCCESS
	}
	d.GetClockInfoFunc = func(clock nvml.ClockType) (uint32, nvml.Return) {
		if clock < 0 || clock >= nvml.CLOCK_COUNT {
			return 0, nvml.ERROR_INVALID_ARGUMENT
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.gpus[i].clocksMHz[clock], nvml.SUCCESS
	}
	d.GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) {
		m.mu.Lock()
		defer m.mu.Unlock()
		procs := make([]nvml.ProcessInfo, 0, len(m.gpus[i].computePIDs))
		for _, pid := range m.gpus[i].computePIDs {
			procs = append(procs, nvml.ProcessInfo{Pid: pid, GpuInstanceId: noMIG, ComputeInstanceId: noMIG})
		}
		return procs, nvml.SUCCESS
	}
	// Datacenter GPUs run no graphics contexts in practice.
	d.GetGraphicsRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) {
		return []nvml.ProcessInfo{}, nvml.SUCCESS
	}
}

// wireServer fills in the library-level forms of the device calls
// (lib.DeviceGetUUID(dev) rather than dev.GetUUID()), which real NVML offers
// and go-nvml's mock leaves nil, so agent code may use either style.
func (m *Mock) wireServer() {
	s := m.server
	s.ErrorStringFunc = func(r nvml.Return) string { return r.Error() }
	s.DeviceGetNameFunc = func(d nvml.Device) (string, nvml.Return) { return d.GetName() }
	s.DeviceGetUUIDFunc = func(d nvml.Device) (string, nvml.Return) { return d.GetUUID() }
	s.DeviceGetIndexFunc = func(d nvml.Device) (int, nvml.Return) { return d.GetIndex() }
	s.DeviceGetMemoryInfoFunc = func(d nvml.Device) (nvml.Memory, nvml.Return) { return d.GetMemoryInfo() }
	s.DeviceGetPciInfoFunc = func(d nvml.Device) (nvml.PciInfo, nvml.Return) { return d.GetPciInfo() }
	s.DeviceGetUtilizationRatesFunc = func(d nvml.Device) (nvml.Utilization, nvml.Return) {
		return d.GetUtilizationRates()
	}
	s.DeviceGetTemperatureFunc = func(d nvml.Device, t nvml.TemperatureSensors) (uint32, nvml.Return) {
		return d.GetTemperature(t)
	}
	s.DeviceGetPowerUsageFunc = func(d nvml.Device) (uint32, nvml.Return) { return d.GetPowerUsage() }
	s.DeviceGetClockInfoFunc = func(d nvml.Device, c nvml.ClockType) (uint32, nvml.Return) {
		return d.GetClockInfo(c)
	}
	s.DeviceGetComputeRunningProcessesFunc = func(d nvml.Device) ([]nvml.ProcessInfo, nvml.Return) {
		return d.GetComputeRunningProcesses()
	}
	s.DeviceGetGraphicsRunningProcessesFunc = func(d nvml.Device) ([]nvml.ProcessInfo, nvml.Return) {
		return d.GetGraphicsRunningProcesses()
	}
}

// putCString writes s into an NVML fixed-size char array, NUL-terminated
// and truncated if needed, as the C library would.
func putCString(dst []int8, s string) {
	n := min(len(s), len(dst)-1)
	for i := range n {
		dst[i] = int8(s[i])
	}
	dst[n] = 0
}
