package gpu

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// fakeGPU describes one hand-built device for the error-path tests.
type fakeGPU struct {
	name             string
	memory           uint64
	uuidRet          nvml.Return
	compute, graphic []uint32
	graphicRet       nvml.Return
}

// fakeLib builds a bare go-nvml moq Interface over the given GPUs, so tests
// can make single calls fail in ways the DGX mocks never do.
func fakeLib(gpus ...fakeGPU) *mock.Interface {
	devs := make([]nvml.Device, len(gpus))
	for i, g := range gpus {
		procs := func(pids []uint32) []nvml.ProcessInfo {
			var out []nvml.ProcessInfo
			for _, p := range pids {
				out = append(out, nvml.ProcessInfo{Pid: p})
			}
			return out
		}
		devs[i] = &mock.Device{
			GetNameFunc: func() (string, nvml.Return) { return g.name, nvml.SUCCESS },
			GetUUIDFunc: func() (string, nvml.Return) {
				if g.uuidRet != nvml.SUCCESS {
					return "", g.uuidRet
				}
				return "GPU-fake-" + g.name, nvml.SUCCESS
			},
			GetMemoryInfoFunc: func() (nvml.Memory, nvml.Return) { return nvml.Memory{Total: g.memory}, nvml.SUCCESS },
			GetPciInfoFunc: func() (nvml.PciInfo, nvml.Return) {
				var p nvml.PciInfo
				putCString(p.BusId[:], "00000000:18:00.0")
				return p, nvml.SUCCESS
			},
			GetComputeRunningProcessesFunc: func() ([]nvml.ProcessInfo, nvml.Return) {
				return procs(g.compute), nvml.SUCCESS
			},
			GetGraphicsRunningProcessesFunc: func() ([]nvml.ProcessInfo, nvml.Return) {
				return procs(g.graphic), g.graphicRet
			},
		}
	}
	return &mock.Interface{
		SystemGetDriverVersionFunc:     func() (string, nvml.Return) { return "570.86.15", nvml.SUCCESS },
		SystemGetCudaDriverVersionFunc: func() (int, nvml.Return) { return 12080, nvml.SUCCESS },
		DeviceGetCountFunc:             func() (int, nvml.Return) { return len(devs), nvml.SUCCESS },
		DeviceGetHandleByIndexFunc: func(i int) (nvml.Device, nvml.Return) {
			return devs[i], nvml.SUCCESS
		},
	}
}

func TestReadInventoryErrorNamesCallAndGPU(t *testing.T) {
	lib := fakeLib(
		fakeGPU{name: "NVIDIA H100 80GB HBM3", memory: 1},
		fakeGPU{name: "NVIDIA H100 80GB HBM3", memory: 1, uuidRet: nvml.ERROR_GPU_IS_LOST},
	)
	_, err := ReadInventory(lib)
	if !errors.Is(err, nvml.ERROR_GPU_IS_LOST) {
		t.Fatalf("ReadInventory = %v, want it to wrap ERROR_GPU_IS_LOST", err)
	}
	for _, part := range []string{"DeviceGetUUID", "GPU 1", "ERROR_GPU_IS_LOST"} {
		if !strings.Contains(err.Error(), part) {
			t.Errorf("error %q lacks %q", err, part)
		}
	}
}

func TestReadInventoryErrorNamesSystemCall(t *testing.T) {
	lib := fakeLib()
	lib.SystemGetCudaDriverVersionFunc = func() (int, nvml.Return) { return 0, nvml.ERROR_UNINITIALIZED }
	_, err := ReadInventory(lib)
	if !errors.Is(err, nvml.ERROR_UNINITIALIZED) || !strings.Contains(err.Error(), "SystemGetCudaDriverVersion") {
		t.Fatalf("ReadInventory = %v, want SystemGetCudaDriverVersion wrapping ERROR_UNINITIALIZED", err)
	}
}

func TestReadInventorySummarisesTheNode(t *testing.T) {
	cases := []struct {
		name      string
		gpus      []fakeGPU
		model     string
		memory    uint64
		bus, cuda string
	}{
		{"a node without GPUs is empty but readable", nil, "", 0, "", "12.8"},
		{"a uniform node reports its one model", []fakeGPU{
			{name: "NVIDIA H200 141GB HBM3e", memory: 141},
			{name: "NVIDIA H200 141GB HBM3e", memory: 141},
		}, "H200", 141, "00000000:18:00.0", "12.8"},
		{"a mixed node reports every model and its smallest memory", []fakeGPU{
			{name: "NVIDIA H100 80GB HBM3", memory: 80},
			{name: "NVIDIA A100-SXM4-40GB", memory: 40},
		}, "A100+H100", 40, "00000000:18:00.0", "12.8"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			inv, err := ReadInventory(fakeLib(c.gpus...))
			if err != nil {
				t.Fatal(err)
			}
			if inv.GPUModel != c.model || inv.GPUMemoryBytes != c.memory || inv.GPUCount != len(c.gpus) || inv.CUDAVersion != c.cuda {
				t.Fatalf("inventory %+v; want model %q, memory %d, %d GPUs, CUDA %q", inv, c.model, c.memory, len(c.gpus), c.cuda)
			}
			if len(inv.GPUs) > 0 && inv.GPUs[0].PCIBusID != c.bus {
				t.Errorf("bus id %q, want %q with the NULs trimmed", inv.GPUs[0].PCIBusID, c.bus)
			}
		})
	}
}

func TestCUDAVersionFormatsLikeNvidiaSmi(t *testing.T) {
	cases := []struct {
		name string
		in   int
		want string
	}{
		{"CUDA 12.4", 12040, "12.4"},
		{"CUDA 12.6", 12060, "12.6"},
		{"CUDA 11.8", 11080, "11.8"},
		{"CUDA 13.0", 13000, "13.0"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := cudaVersion(c.in); got != c.want {
				t.Fatalf("cudaVersion(%d) = %q, want %q", c.in, got, c.want)
			}
		})
	}
}

func TestVisibleDevicesListsEveryIndex(t *testing.T) {
	gpus := func(n int) []GPU {
		out := make([]GPU, n)
		for i := range out {
			out[i] = GPU{Index: i, UUID: "GPU-" + string(rune('a'+i))}
		}
		return out
	}
	cases := []struct {
		name string
		n    int
		want string
	}{
		{"no GPUs gives an empty list", 0, ""},
		{"one GPU gives 0", 1, "0"},
		{"a DGX gives 0 to 7", 8, "0,1,2,3,4,5,6,7"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			inv := Inventory{GPUs: gpus(c.n), GPUCount: c.n}
			if got := inv.VisibleDevices(); got != c.want {
				t.Fatalf("VisibleDevices() = %q, want %q", got, c.want)
			}
			if got := inv.UUIDs(); len(got) != c.n || (c.n > 0 && got[0] != "GPU-a") {
				t.Fatalf("UUIDs() = %v", got)
			}
		})
	}
}

func TestListGPUProcessesMergesComputeAndGraphics(t *testing.T) {
	cases := []struct {
		name string
		gpu  fakeGPU
		want []uint32
	}{
		{"a process in both lists counts once", fakeGPU{compute: []uint32{3, 1}, graphic: []uint32{1, 2}}, []uint32{1, 2, 3}},
		{"graphics not supported means no graphics processes",
			fakeGPU{compute: []uint32{5}, graphic: []uint32{9}, graphicRet: nvml.ERROR_NOT_SUPPORTED}, []uint32{5}},
		{"an idle GPU has an empty entry", fakeGPU{}, []uint32{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := ListGPUProcesses(fakeLib(c.gpu))
			if err != nil {
				t.Fatal(err)
			}
			pids, ok := got[0]
			if !ok || !slices.Equal(pids, c.want) {
				t.Fatalf("GPU 0 runs %v (listed %v), want %v", pids, ok, c.want)
			}
		})
	}
}

func TestListGPUProcessesErrorNamesCallAndGPU(t *testing.T) {
	_, err := ListGPUProcesses(fakeLib(fakeGPU{}, fakeGPU{graphicRet: nvml.ERROR_NO_PERMISSION}))
	if !errors.Is(err, nvml.ERROR_NO_PERMISSION) ||
		!strings.Contains(err.Error(), "DeviceGetGraphicsRunningProcesses") || !strings.Contains(err.Error(), "GPU 1") {
		t.Fatalf("ListGPUProcesses = %v, want the graphics call on GPU 1 wrapping ERROR_NO_PERMISSION", err)
	}
}
