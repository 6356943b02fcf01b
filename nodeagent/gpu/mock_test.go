package gpu

import (
	"errors"
	"regexp"
	"slices"
	"sync"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

func TestEveryMockBackendReadsAFullInventory(t *testing.T) {
	cases := []struct {
		name, backend, model string
	}{
		{"a DGX A100 has eight A100s", BackendMockDGXA100, "A100"},
		{"a DGX H100 has eight H100s", BackendMockDGXH100, "H100"},
		{"a DGX H200 has eight H200s", BackendMockDGXH200, "H200"},
		{"a DGX B200 has eight B200s", BackendMockDGXB200, "B200"},
	}
	uuidForm := regexp.MustCompile(`^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := mustOpen(t, c.backend)
			if b.Name != c.backend || b.Mock == nil {
				t.Fatalf("backend = %q (mock %v), want %q with a Mock", b.Name, b.Mock, c.backend)
			}
			inv, err := ReadInventory(b.NVML)
			if err != nil {
				t.Fatalf("ReadInventory: %v", err)
			}
			if inv.GPUModel != c.model || inv.GPUCount != 8 || len(inv.GPUs) != 8 {
				t.Fatalf("model %q, count %d, %d GPUs; want %q, 8, 8", inv.GPUModel, inv.GPUCount, len(inv.GPUs), c.model)
			}
			if inv.GPUMemoryBytes == 0 || inv.DriverVersion == "" || inv.CUDAVersion == "" {
				t.Fatalf("memory %d, driver %q, CUDA %q; want all set", inv.GPUMemoryBytes, inv.DriverVersion, inv.CUDAVersion)
			}
			seen := map[string]bool{}
			for i, g := range inv.GPUs {
				if g.Index != i || g.MemoryBytes == 0 || g.PCIBusID == "" || g.Name == "" {
					t.Errorf("GPU %d = %+v; want its index, memory, bus id and name", i, g)
				}
				if !uuidForm.MatchString(g.UUID) || seen[g.UUID] {
					t.Errorf("GPU %d UUID %q is malformed or repeated", i, g.UUID)
				}
				seen[g.UUID] = true
			}
		})
	}
}

func TestMockInventoryLooksLikeRealNVML(t *testing.T) {
	inv, err := ReadInventory(mustOpen(t, BackendMockDGXA100).NVML)
	if err != nil {
		t.Fatal(err)
	}
	g := inv.GPUs[3]
	if g.Name != "NVIDIA A100-SXM4-40GB" {
		t.Errorf("name %q still carries go-nvml's mock prefix", g.Name)
	}
	if g.PCIBusID != "00000000:03:00.0" {
		t.Errorf("bus id %q, want NVML's 00000000:03:00.0", g.PCIBusID)
	}
	if g.MemoryBytes != 40960<<20 {
		t.Errorf("memory %d, want 40 GiB", g.MemoryBytes)
	}
	if inv.CUDAVersion != "12.4" || inv.DriverVersion != "550.54.15" {
		t.Errorf("CUDA %q driver %q, want 12.4 and 550.54.15", inv.CUDAVersion, inv.DriverVersion)
	}
}

func TestMockUUIDs(t *testing.T) {
	uuids := func(t *testing.T, model string, opts MockOptions) []string {
		t.Helper()
		b, err := OpenMock(model, opts)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		inv, err := ReadInventory(b.NVML)
		if err != nil {
			t.Fatal(err)
		}
		return inv.UUIDs()
	}
	disjoint := func(a, b []string) bool {
		return !slices.ContainsFunc(a, func(u string) bool { return slices.Contains(b, u) })
	}
	cases := []struct {
		name       string
		a, b       MockOptions
		model      string
		wantSame   bool
		otherModel string
	}{
		{name: "two random nodes have disjoint UUIDs", model: "mock-dgxh100"},
		{name: "two named nodes have disjoint UUIDs", model: "mock-dgxh100",
			a: MockOptions{NodeName: "node-a"}, b: MockOptions{NodeName: "node-b"}},
		{name: "seeds separate nodes of the same name", model: "mock-dgxb200",
			a: MockOptions{NodeName: "n", Seed: 1}, b: MockOptions{NodeName: "n", Seed: 2}},
		{name: "a node rebuilt with the same name and seed keeps its UUIDs", model: "mock-dgxh200",
			a: MockOptions{NodeName: "node-a", Seed: 7}, b: MockOptions{NodeName: "node-a", Seed: 7}, wantSame: true},
		{name: "the same name on other hardware gives other UUIDs", model: "mock-dgxh100", otherModel: "dgxh200",
			a: MockOptions{NodeName: "node-a"}, b: MockOptions{NodeName: "node-a"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			other := c.otherModel
			if other == "" {
				other = c.model
			}
			a, b := uuids(t, c.model, c.a), uuids(t, other, c.b)
			if c.wantSame && !slices.Equal(a, b) {
				t.Fatalf("UUIDs differ:\n%v\n%v", a, b)
			}
			if !c.wantSame && !disjoint(a, b) {
				t.Fatalf("UUIDs overlap:\n%v\n%v", a, b)
			}
		})
	}
}

func TestOpenMockAcceptsBareModelNames(t *testing.T) {
	b, err := OpenMock("dgxh100", MockOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Name != BackendMockDGXH100 || b.Mock.Model() != BackendMockDGXH100 {
		t.Fatalf("name %q model %q, want %q", b.Name, b.Mock.Model(), BackendMockDGXH100)
	}
	if _, err := OpenMock("dgxz900", MockOptions{}); !errors.Is(err, ErrUnknownBackend) {
		t.Fatalf("OpenMock(dgxz900) = %v, want ErrUnknownBackend", err)
	}
}

// TestMockAnswersEveryAgentCall calls, on every simulated model, each NVML
// function the agent uses, both as a device method and in the library form,
// because go-nvml's mock panics on any it leaves unset.
func TestMockAnswersEveryAgentCall(t *testing.T) {
	for _, name := range Backends()[1:] {
		t.Run(name+" answers without panicking", func(t *testing.T) {
			lib := mustOpen(t, name).NVML
			ok := func(what string, ret nvml.Return) {
				t.Helper()
				if ret != nvml.SUCCESS {
					t.Errorf("%s = %v", what, ret)
				}
			}
			_, ret := lib.SystemGetDriverVersion()
			ok("SystemGetDriverVersion", ret)
			_, ret = lib.SystemGetCudaDriverVersion()
			ok("SystemGetCudaDriverVersion", ret)
			_ = lib.ErrorString(nvml.ERROR_GPU_IS_LOST)
			n, ret := lib.DeviceGetCount()
			ok("DeviceGetCount", ret)
			for i := range n {
				d, ret := lib.DeviceGetHandleByIndex(i)
				ok("DeviceGetHandleByIndex", ret)
				for _, r := range []nvml.Return{
					second(d.GetName()), second(lib.DeviceGetName(d)),
					second(d.GetUUID()), second(lib.DeviceGetUUID(d)),
					second(d.GetIndex()), second(lib.DeviceGetIndex(d)),
					second(d.GetMemoryInfo()), second(lib.DeviceGetMemoryInfo(d)),
					second(d.GetPciInfo()), second(lib.DeviceGetPciInfo(d)),
					second(d.GetUtilizationRates()), second(lib.DeviceGetUtilizationRates(d)),
					second(d.GetTemperature(nvml.TEMPERATURE_GPU)), second(lib.DeviceGetTemperature(d, nvml.TEMPERATURE_GPU)),
					second(d.GetPowerUsage()), second(lib.DeviceGetPowerUsage(d)),
					second(d.GetClockInfo(nvml.CLOCK_SM)), second(lib.DeviceGetClockInfo(d, nvml.CLOCK_MEM)),
					second(d.GetComputeRunningProcesses()), second(lib.DeviceGetComputeRunningProcesses(d)),
					second(d.GetGraphicsRunningProcesses()), second(lib.DeviceGetGraphicsRunningProcesses(d)),
				} {
					ok("device call", r)
				}
				if temp, _ := d.GetTemperature(nvml.TEMPERATURE_GPU); temp == 0 {
					t.Errorf("GPU %d reads 0 °C", i)
				}
				if mw, _ := d.GetPowerUsage(); mw == 0 {
					t.Errorf("GPU %d draws 0 mW", i)
				}
				if _, ret := d.GetClockInfo(nvml.CLOCK_COUNT); ret != nvml.ERROR_INVALID_ARGUMENT {
					t.Errorf("GetClockInfo(CLOCK_COUNT) = %v, want ERROR_INVALID_ARGUMENT", ret)
				}
				if d2, ret := lib.DeviceGetHandleByUUID(first(d.GetUUID())); ret != nvml.SUCCESS || d2 != d {
					t.Errorf("DeviceGetHandleByUUID does not find GPU %d: %v", i, ret)
				}
				pci, _ := d.GetPciInfo()
				if d2, ret := lib.DeviceGetHandleByPciBusId(cString(pci.BusId[:])); ret != nvml.SUCCESS || d2 != d {
					t.Errorf("DeviceGetHandleByPciBusId does not find GPU %d: %v", i, ret)
				}
			}
		})
	}
}

func first[T any](v T, _ nvml.Return) T            { return v }
func second[T any](_ T, r nvml.Return) nvml.Return { return r }

func TestSetProcessesShowsUpInListGPUProcesses(t *testing.T) {
	b := mustOpen(t, BackendMockDGXH100)
	steps := []struct {
		name string
		gpu  int
		pids []uint32
		want map[int][]uint32
	}{
		{"a fresh node runs nothing", -1, nil, map[int][]uint32{}},
		{"a job appears on one GPU, sorted and deduplicated", 3, []uint32{42, 7, 42},
			map[int][]uint32{3: {7, 42}}},
		{"a second GPU gets a process", 5, []uint32{99}, map[int][]uint32{3: {7, 42}, 5: {99}}},
		{"clearing a GPU empties it", 3, nil, map[int][]uint32{5: {99}}},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			if s.gpu >= 0 {
				b.Mock.SetProcesses(s.gpu, s.pids)
			}
			got, err := ListGPUProcesses(b.NVML)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 8 {
				t.Fatalf("%d GPUs listed, want every one of 8", len(got))
			}
			for i := range 8 {
				if !slices.Equal(got[i], s.want[i]) {
					t.Errorf("GPU %d runs %v, want %v", i, got[i], s.want[i])
				}
			}
		})
	}
}

func TestSetProcessesCopiesItsInput(t *testing.T) {
	b := mustOpen(t, BackendMockDGXA100)
	pids := []uint32{1, 2}
	b.Mock.SetProcesses(0, pids)
	pids[0] = 1000
	got, err := ListGPUProcesses(b.NVML)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got[0], []uint32{1, 2}) {
		t.Fatalf("GPU 0 runs %v after the caller reused its slice, want [1 2]", got[0])
	}
}

func TestSetProcessesOutOfRangePanics(t *testing.T) {
	b := mustOpen(t, BackendMockDGXA100)
	defer func() {
		if recover() == nil {
			t.Fatal("SetProcesses(8, ...) on an 8-GPU node did not panic")
		}
	}()
	b.Mock.SetProcesses(8, []uint32{1})
}

func TestMockStateIsSafeForConcurrentUse(t *testing.T) {
	b := mustOpen(t, BackendMockDGXH100)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 200 {
				b.Mock.SetProcesses(i%8, []uint32{uint32(w), uint32(i)})
			}
		})
		wg.Go(func() {
			for range 50 {
				if _, err := ListGPUProcesses(b.NVML); err != nil {
					t.Error(err)
					return
				}
				if _, err := ReadInventory(b.NVML); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}
