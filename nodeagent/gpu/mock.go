package gpu

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxa100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxb200"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh100"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh200"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
)

// mockModel describes one simulated DGX: go-nvml's server for the
// inventory, plus the telemetry go-nvml does not model. The numbers are
// plausible for the product, not measured: idle and busy levels the
// simulated dynamics move between (see dynamics.go).
type mockModel struct {
	newServer      func() *server.Server
	idlePowerMW    uint32
	busyPowerMW    uint32 // below the board's TDP, as a busy training job draws
	idleTempC      uint32
	busyTempC      uint32
	idleSMClockMHz uint32
	smClockMHz     uint32 // boost clock under load
	memClockMHz    uint32
}

var mockModels = map[string]mockModel{
	// A100-SXM4 TDP 400 W; H100/H200 SXM 700 W; B200 1000 W.
	BackendMockDGXA100: {dgxa100.New, 55_000, 360_000, 31, 68, 210, 1410, 1215},
	BackendMockDGXH100: {dgxh100.New, 72_000, 620_000, 33, 70, 345, 1980, 2619},
	BackendMockDGXH200: {dgxh200.New, 76_000, 640_000, 33, 70, 345, 1980, 3201},
	BackendMockDGXB200: {dgxb200.New, 140_000, 900_000, 35, 72, 120, 1965, 3996},
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
	// Now is the clock the simulated dynamics run on (utilization, memory,
	// power and temperature are functions of the time since a GPU's load
	// last changed) and that stamps faults. Nil means time.Now; tests pass
	// a fake clock they advance by hand. It is called with the Mock's lock
	// held, so it must not call back into the Mock.
	Now func() time.Time
}

// Mock is one simulated GPU node: go-nvml's mock DGX server with the
// telemetry, event, process and fault calls a node agent makes filled in
// from state held here. The state is guarded by mu so that dynamics and
// fault injection can change it while the agent is reading it.
//
// Call recording: go-nvml's moq-generated mocks append every call and its
// arguments to a per-method log that is never trimmed, so an agent polling
// at 1 Hz would grow without bound. The nvml.Interface a Mock hands out
// (mockLib) and the device handles it returns (mockDevice) are thin
// wrappers that implement the calls the agent makes repeatedly
// (DeviceGetCount, DeviceGetHandleBy*, every telemetry, process, ECC and
// event call, EventSetCreate/Wait/Free) as plain methods that never touch
// that log; only the rest, used rarely if at all, fall through to go-nvml
// and are recorded.
type Mock struct {
	model string
	spec  mockModel
	now   func() time.Time
	// epoch anchors the deterministic wobble of busy levels.
	epoch  time.Time
	server *server.Server
	lib    *mockLib
	devs   []*mockDevice

	mu        sync.Mutex
	gpus      []simGPU
	eventSets map[*mockEventSet]struct{}
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
	now := opts.Now
	if now == nil {
		now = time.Now
	}

	m := &Mock{
		model:     name,
		spec:      spec,
		now:       now,
		server:    spec.newServer(),
		eventSets: map[*mockEventSet]struct{}{},
	}
	m.epoch = now()
	m.lib = &mockLib{Server: m.server, m: m}
	uuids := mockUUIDs(name, opts, len(m.server.Devices))
	m.gpus = make([]simGPU, len(m.server.Devices))
	m.devs = make([]*mockDevice, len(m.server.Devices))
	for i := range m.server.Devices {
		m.gpus[i] = m.idleGPU(m.epoch)

		// go-nvml builds its devices with exactly this type; anything else
		// means the mock changed under us and nothing below would hold.
		d := m.server.Devices[i].(*server.Device)
		// Set before anyone can read the server, so the unlocked reads in
		// go-nvml's own funcs are safe.
		d.UUID = uuids[i]
		d.PciBusID = fmt.Sprintf("%08X:%02X:00.0", 0, i)
		m.devs[i] = m.newDevice(i, d)
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
	return &Backend{NVML: m.lib, Name: m.model, Mock: m}, nil
}

// NVML returns the simulated node as an nvml.Interface.
func (m *Mock) NVML() nvml.Interface { return m.lib }

// Model returns the mock backend name, e.g. "mock-dgxh100".
func (m *Mock) Model() string { return m.model }

// SetProcesses replaces the compute processes NVML reports on GPU index gpu,
// as a job starting or a foreign process appearing would. A nil or empty
// pids clears the GPU. A GPU with at least one process is busy: its
// utilization, memory, power and temperature climb toward load levels; one
// without returns to idle (see dynamics.go). It panics if gpu is not a GPU
// index of this node, since that is a bug in the caller, not a simulated
// fault.
func (m *Mock) SetProcesses(gpu int, pids []uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.checkGPU("SetProcesses", gpu)
	m.gpus[gpu].computePIDs = slices.Clone(pids)
	m.setBusyLocked(gpu, len(pids) > 0)
}

// checkGPU panics on a GPU index outside this node.
func (m *Mock) checkGPU(call string, gpu int) {
	if gpu < 0 || gpu >= len(m.gpus) {
		panic(fmt.Sprintf("gpu: %s: GPU index %d out of range [0,%d)", call, gpu, len(m.gpus)))
	}
}

// mockLib is the nvml.Interface a Mock hands out: go-nvml's server, with
// the calls made on every poll answered here without call recording (see
// Mock).
type mockLib struct {
	*server.Server
	m *Mock
}

var (
	_ nvml.Interface         = (*mockLib)(nil)
	_ nvml.ExtendedInterface = (*mockLib)(nil)
)

func (l *mockLib) DeviceGetCount() (int, nvml.Return) { return len(l.m.devs), nvml.SUCCESS }

func (l *mockLib) DeviceGetHandleByIndex(i int) (nvml.Device, nvml.Return) {
	if i < 0 || i >= len(l.m.devs) {
		return nil, nvml.ERROR_INVALID_ARGUMENT
	}
	return l.m.devs[i], nvml.SUCCESS
}

func (l *mockLib) DeviceGetHandleByUUID(uuid string) (nvml.Device, nvml.Return) {
	for _, d := range l.m.devs {
		if d.UUID == uuid {
			return d, nvml.SUCCESS
		}
	}
	return nil, nvml.ERROR_NOT_FOUND
}

func (l *mockLib) DeviceGetHandleByPciBusId(busID string) (nvml.Device, nvml.Return) {
	for _, d := range l.m.devs {
		if d.PciBusID == busID {
			return d, nvml.SUCCESS
		}
	}
	return nil, nvml.ERROR_NOT_FOUND
}

func (l *mockLib) EventSetCreate() (nvml.EventSet, nvml.Return) {
	return l.m.newEventSet(), nvml.SUCCESS
}

// Extensions returns the library itself, whose LookupSymbol says every
// symbol exists: the simulated driver is new enough for every call.
func (l *mockLib) Extensions() nvml.ExtendedInterface { return l }

// LookupSymbol always succeeds; see Extensions.
func (l *mockLib) LookupSymbol(string) error { return nil }

// mockDevice is the device handle a Mock hands out: go-nvml's simulated
// device for everything it models (inventory, MIG), with the calls a node
// agent polls answered from the Mock's state without call recording.
type mockDevice struct {
	*server.Device
	m     *Mock
	i     int
	name  string
	total uint64
	pci   nvml.PciInfo
}

var _ nvml.Device = (*mockDevice)(nil)

// newDevice wraps go-nvml's device i. It also points the device's own
// funcs at the wrapper, so the raw device answers alike should go-nvml
// ever hand it out (the unwrapped forms are recorded; see Mock).
func (m *Mock) newDevice(i int, d *server.Device) *mockDevice {
	w := &mockDevice{Device: d, m: m, i: i,
		// The DGX A100 mock keeps a legacy "Mock " prefix; a simulated
		// node should report what a real one would.
		name: strings.TrimPrefix(d.Config.Name, "Mock "),
		// go-nvml reports Free = Used = 0; keep Total, derive the rest.
		total: d.MemoryInfo.Total,
		// go-nvml fills in only the device id, leaving the bus id empty.
		pci: nvml.PciInfo{Bus: uint32(i), PciDeviceId: d.Config.PciDeviceId},
	}
	putCString(w.pci.BusId[:], d.PciBusID)
	putCString(w.pci.BusIdLegacy[:], fmt.Sprintf("%04X:%02X:00.0", 0, i))

	d.GetNameFunc = w.GetName
	d.GetUUIDFunc = w.GetUUID
	d.GetIndexFunc = w.GetIndex
	d.GetMemoryInfoFunc = w.GetMemoryInfo
	d.GetPciInfoFunc = w.GetPciInfo
	d.GetUtilizationRatesFunc = w.GetUtilizationRates
	d.GetTemperatureFunc = w.GetTemperature
	d.GetPowerUsageFunc = w.GetPowerUsage
	d.GetClockInfoFunc = w.GetClockInfo
	d.GetCurrentClocksEventReasonsFunc = w.GetCurrentClocksEventReasons
	d.GetCurrentClocksThrottleReasonsFunc = w.GetCurrentClocksThrottleReasons
	d.GetTotalEccErrorsFunc = w.GetTotalEccErrors
	d.GetRemappedRowsFunc = w.GetRemappedRows
	d.GetRetiredPagesPendingStatusFunc = w.GetRetiredPagesPendingStatus
	d.GetComputeRunningProcessesFunc = w.GetComputeRunningProcesses
	d.GetGraphicsRunningProcessesFunc = w.GetGraphicsRunningProcesses
	d.GetSupportedEventTypesFunc = w.GetSupportedEventTypes
	d.RegisterEventsFunc = w.RegisterEvents
	return w
}

func (d *mockDevice) GetName() (string, nvml.Return)          { return d.name, nvml.SUCCESS }
func (d *mockDevice) GetUUID() (string, nvml.Return)          { return d.UUID, nvml.SUCCESS }
func (d *mockDevice) GetIndex() (int, nvml.Return)            { return d.i, nvml.SUCCESS }
func (d *mockDevice) GetPciInfo() (nvml.PciInfo, nvml.Return) { return d.pci, nvml.SUCCESS }

func (d *mockDevice) GetMemoryInfo() (nvml.Memory, nvml.Return) {
	l := d.m.levelsNow(d.i)
	used := min(uint64(l.fbUsed), d.total)
	return nvml.Memory{Total: d.total, Used: used, Free: d.total - used}, nvml.SUCCESS
}

func (d *mockDevice) GetUtilizationRates() (nvml.Utilization, nvml.Return) {
	l := d.m.levelsNow(d.i)
	return nvml.Utilization{Gpu: roundU32(l.gpuUtil), Memory: roundU32(l.memUtil)}, nvml.SUCCESS
}

func (d *mockDevice) GetTemperature(sensor nvml.TemperatureSensors) (uint32, nvml.Return) {
	if sensor != nvml.TEMPERATURE_GPU {
		return 0, nvml.ERROR_INVALID_ARGUMENT
	}
	return roundU32(d.m.levelsNow(d.i).tempC), nvml.SUCCESS
}

func (d *mockDevice) GetPowerUsage() (uint32, nvml.Return) {
	return roundU32(d.m.levelsNow(d.i).powerMW), nvml.SUCCESS
}

func (d *mockDevice) GetClockInfo(clock nvml.ClockType) (uint32, nvml.Return) {
	if clock < 0 || clock >= nvml.CLOCK_COUNT {
		return 0, nvml.ERROR_INVALID_ARGUMENT
	}
	sm, mem := d.m.spec.idleSMClockMHz, d.m.spec.memClockMHz
	if d.m.busy(d.i) {
		sm = d.m.spec.smClockMHz
	}
	switch clock {
	case nvml.CLOCK_MEM:
		return mem, nvml.SUCCESS
	case nvml.CLOCK_VIDEO:
		return sm * 9 / 10, nvml.SUCCESS
	default: // CLOCK_GRAPHICS, CLOCK_SM
		return sm, nvml.SUCCESS
	}
}

// GetCurrentClocksEventReasons reports GPU_IDLE on an idle GPU and nothing
// under load: the simulated GPUs never throttle.
func (d *mockDevice) GetCurrentClocksEventReasons() (uint64, nvml.Return) {
	if d.m.busy(d.i) {
		return nvml.ClocksEventReasonNone, nvml.SUCCESS
	}
	return nvml.ClocksEventReasonGpuIdle, nvml.SUCCESS
}

// GetCurrentClocksThrottleReasons is the pre-R535 name of
// GetCurrentClocksEventReasons.
func (d *mockDevice) GetCurrentClocksThrottleReasons() (uint64, nvml.Return) {
	return d.GetCurrentClocksEventReasons()
}

// GetTotalEccErrors reports the injected ECC errors. Aggregate counters
// equal the volatile ones: a simulated GPU has no life before the Mock.
func (d *mockDevice) GetTotalEccErrors(kind nvml.MemoryErrorType, counter nvml.EccCounterType) (uint64, nvml.Return) {
	if counter != nvml.VOLATILE_ECC && counter != nvml.AGGREGATE_ECC {
		return 0, nvml.ERROR_INVALID_ARGUMENT
	}
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	g := &d.m.gpus[d.i]
	switch kind {
	case nvml.MEMORY_ERROR_TYPE_CORRECTED:
		return g.eccSBE, nvml.SUCCESS
	case nvml.MEMORY_ERROR_TYPE_UNCORRECTED:
		return g.eccDBE, nvml.SUCCESS
	default:
		return 0, nvml.ERROR_INVALID_ARGUMENT
	}
}

func (d *mockDevice) GetRemappedRows() (corrRows, uncRows int, pending, failed bool, ret nvml.Return) {
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	g := &d.m.gpus[d.i]
	return g.remapCorr, g.remapUnc, g.remapPending, g.remapFailed, nvml.SUCCESS
}

// GetRetiredPagesPendingStatus answers as an Ampere-or-later GPU does:
// those replaced page retirement with row remapping.
func (d *mockDevice) GetRetiredPagesPendingStatus() (nvml.EnableState, nvml.Return) {
	return nvml.FEATURE_DISABLED, nvml.ERROR_NOT_SUPPORTED
}

func (d *mockDevice) GetComputeRunningProcesses() ([]nvml.ProcessInfo, nvml.Return) {
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	pids := d.m.gpus[d.i].computePIDs
	procs := make([]nvml.ProcessInfo, 0, len(pids))
	for _, pid := range pids {
		procs = append(procs, nvml.ProcessInfo{Pid: pid, GpuInstanceId: noMIG, ComputeInstanceId: noMIG})
	}
	return procs, nvml.SUCCESS
}

// GetGraphicsRunningProcesses is always empty: datacenter GPUs run no
// graphics contexts in practice.
func (d *mockDevice) GetGraphicsRunningProcesses() ([]nvml.ProcessInfo, nvml.Return) {
	return []nvml.ProcessInfo{}, nvml.SUCCESS
}

// wireServer fills in the library-level forms of the device calls
// (lib.DeviceGetUUID(dev) rather than dev.GetUUID()), which real NVML offers
// and go-nvml's mock leaves nil, so agent code may use either style. These
// forms are recorded by go-nvml (see Mock); the device methods are not.
// The server's own handle lookups are pointed at the wrapped devices, so the
// server answers like the mockLib in front of it.
func (m *Mock) wireServer() {
	s, l := m.server, m.lib
	s.ErrorStringFunc = func(r nvml.Return) string { return r.Error() }
	s.DeviceGetCountFunc = l.DeviceGetCount
	s.DeviceGetHandleByIndexFunc = l.DeviceGetHandleByIndex
	s.DeviceGetHandleByUUIDFunc = l.DeviceGetHandleByUUID
	s.DeviceGetHandleByPciBusIdFunc = l.DeviceGetHandleByPciBusId
	s.EventSetCreateFunc = l.EventSetCreate
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
	s.DeviceGetCurrentClocksEventReasonsFunc = func(d nvml.Device) (uint64, nvml.Return) {
		return d.GetCurrentClocksEventReasons()
	}
	s.DeviceGetCurrentClocksThrottleReasonsFunc = func(d nvml.Device) (uint64, nvml.Return) {
		return d.GetCurrentClocksEventReasons()
	}
	s.DeviceGetTotalEccErrorsFunc = func(d nvml.Device, k nvml.MemoryErrorType, c nvml.EccCounterType) (uint64, nvml.Return) {
		return d.GetTotalEccErrors(k, c)
	}
	s.DeviceGetRemappedRowsFunc = func(d nvml.Device) (int, int, bool, bool, nvml.Return) {
		return d.GetRemappedRows()
	}
	s.DeviceGetRetiredPagesPendingStatusFunc = func(d nvml.Device) (nvml.EnableState, nvml.Return) {
		return d.GetRetiredPagesPendingStatus()
	}
	s.DeviceGetComputeRunningProcessesFunc = func(d nvml.Device) ([]nvml.ProcessInfo, nvml.Return) {
		return d.GetComputeRunningProcesses()
	}
	s.DeviceGetGraphicsRunningProcessesFunc = func(d nvml.Device) ([]nvml.ProcessInfo, nvml.Return) {
		return d.GetGraphicsRunningProcesses()
	}
	s.DeviceGetSupportedEventTypesFunc = func(d nvml.Device) (uint64, nvml.Return) {
		return d.GetSupportedEventTypes()
	}
	s.DeviceRegisterEventsFunc = func(d nvml.Device, types uint64, set nvml.EventSet) nvml.Return {
		return d.RegisterEvents(types, set)
	}
	s.EventSetWaitFunc = func(set nvml.EventSet, timeoutMs uint32) (nvml.EventData, nvml.Return) {
		return set.Wait(timeoutMs)
	}
	s.EventSetFreeFunc = func(set nvml.EventSet) nvml.Return { return set.Free() }
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
