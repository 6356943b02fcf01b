package gpu

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpusched/gpusched/internal/gpumodel"
)

// GPU is one GPU as the node agent reports it.
type GPU struct {
	// Index is the NVML device index, which is also the CUDA device index
	// when CUDA_DEVICE_ORDER=PCI_BUS_ID (the agent's setting).
	Index int
	// UUID is NVML's stable GPU identifier, "GPU-...".
	UUID string
	// Name is NVML's product name, e.g. "NVIDIA H100 80GB HBM3".
	Name string
	// MemoryBytes is the GPU's total framebuffer memory.
	MemoryBytes uint64
	// PCIBusID is NVML's bus id, e.g. "00000000:18:00.0".
	PCIBusID string
}

// Inventory is what a node has to offer, read once at agent start.
type Inventory struct {
	// GPUModel is the canonical model (gpumodel), e.g. "H100". A node with
	// mixed models reports them sorted and joined with "+", so it shows up
	// honestly but matches no single-model request.
	GPUModel string
	// GPUCount is len(GPUs).
	GPUCount int
	// GPUMemoryBytes is the smallest GPU's memory: a job needing that much
	// per GPU fits on every GPU of the node.
	GPUMemoryBytes uint64
	// GPUs lists the GPUs in NVML index order.
	GPUs []GPU
	// DriverVersion is the kernel driver version, e.g. "550.54.15".
	DriverVersion string
	// CUDAVersion is the newest CUDA the driver supports, e.g. "12.4".
	CUDAVersion string
}

// ReadInventory reads the node's GPUs from an initialised NVML. It uses only
// nvml.Interface and per-device methods, so real NVML and mocks read alike.
// Errors name the failing NVML call and GPU index and wrap its nvml.Return,
// so errors.Is(err, nvml.ERROR_GPU_IS_LOST) works.
func ReadInventory(lib nvml.Interface) (Inventory, error) {
	var inv Inventory
	var ret nvml.Return
	if inv.DriverVersion, ret = lib.SystemGetDriverVersion(); ret != nvml.SUCCESS {
		return Inventory{}, fmt.Errorf("gpu: SystemGetDriverVersion: %w", ret)
	}
	cuda, ret := lib.SystemGetCudaDriverVersion()
	if ret != nvml.SUCCESS {
		return Inventory{}, fmt.Errorf("gpu: SystemGetCudaDriverVersion: %w", ret)
	}
	inv.CUDAVersion = cudaVersion(cuda)

	count, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return Inventory{}, fmt.Errorf("gpu: DeviceGetCount: %w", ret)
	}
	var models []string
	for i := range count {
		g, err := readGPU(lib, i)
		if err != nil {
			return Inventory{}, err
		}
		inv.GPUs = append(inv.GPUs, g)
		if m := gpumodel.FromProductName(g.Name); !slices.Contains(models, m) {
			models = append(models, m)
		}
		if i == 0 || g.MemoryBytes < inv.GPUMemoryBytes {
			inv.GPUMemoryBytes = g.MemoryBytes
		}
	}
	slices.Sort(models)
	inv.GPUModel = strings.Join(models, "+")
	inv.GPUCount = len(inv.GPUs)
	return inv, nil
}

// readGPU reads one GPU's inventory.
func readGPU(lib nvml.Interface, i int) (GPU, error) {
	fail := func(call string, ret nvml.Return) (GPU, error) {
		return GPU{}, fmt.Errorf("gpu: %s for GPU %d: %w", call, i, ret)
	}
	dev, ret := lib.DeviceGetHandleByIndex(i)
	if ret != nvml.SUCCESS {
		return fail("DeviceGetHandleByIndex", ret)
	}
	g := GPU{Index: i}
	if g.Name, ret = dev.GetName(); ret != nvml.SUCCESS {
		return fail("DeviceGetName", ret)
	}
	if g.UUID, ret = dev.GetUUID(); ret != nvml.SUCCESS {
		return fail("DeviceGetUUID", ret)
	}
	mem, ret := dev.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return fail("DeviceGetMemoryInfo", ret)
	}
	g.MemoryBytes = mem.Total
	pci, ret := dev.GetPciInfo()
	if ret != nvml.SUCCESS {
		return fail("DeviceGetPciInfo", ret)
	}
	g.PCIBusID = cString(pci.BusId[:])
	return g, nil
}

// UUIDs returns the GPU UUIDs in index order.
func (inv Inventory) UUIDs() []string {
	out := make([]string, len(inv.GPUs))
	for i, g := range inv.GPUs {
		out[i] = g.UUID
	}
	return out
}

// VisibleDevices returns the GPU indices as CUDA_VISIBLE_DEVICES wants them,
// "0,1,...,N-1" for a whole node, "" for a node without GPUs.
func (inv Inventory) VisibleDevices() string {
	idx := make([]string, len(inv.GPUs))
	for i, g := range inv.GPUs {
		idx[i] = strconv.Itoa(g.Index)
	}
	return strings.Join(idx, ",")
}

// cudaVersion formats NVML's CUDA driver version, 1000*major + 10*minor
// (12040), the way nvidia-smi shows it ("12.4").
func cudaVersion(v int) string {
	return fmt.Sprintf("%d.%d", v/1000, v%1000/10)
}

// cString reads an NVML fixed-size char array up to its first NUL.
func cString(b []int8) string {
	var sb strings.Builder
	for _, c := range b {
		if c == 0 {
			break
		}
		sb.WriteByte(byte(c))
	}
	return sb.String()
}
