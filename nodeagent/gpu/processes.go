package gpu

import (
	"fmt"
	"slices"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// ListGPUProcesses returns, for every GPU index, the PIDs of the processes
// running on it (compute and graphics), sorted and without duplicates. Every
// GPU has an entry, empty when the GPU is idle, so a missing key never
// passes for "idle".
func ListGPUProcesses(lib nvml.Interface) (map[int][]uint32, error) {
	count, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("gpu: DeviceGetCount: %w", ret)
	}
	out := make(map[int][]uint32, count)
	for i := range count {
		dev, ret := lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("gpu: DeviceGetHandleByIndex for GPU %d: %w", i, ret)
		}
		pids := []uint32{}
		for _, q := range []struct {
			call string
			list func() ([]nvml.ProcessInfo, nvml.Return)
		}{
			{"DeviceGetComputeRunningProcesses", dev.GetComputeRunningProcesses},
			{"DeviceGetGraphicsRunningProcesses", dev.GetGraphicsRunningProcesses},
		} {
			procs, ret := q.list()
			// Some GPUs cannot run one kind of context at all; NVML says
			// so with NOT_SUPPORTED, which means none of that kind.
			if ret == nvml.ERROR_NOT_SUPPORTED {
				continue
			}
			if ret != nvml.SUCCESS {
				return nil, fmt.Errorf("gpu: %s for GPU %d: %w", q.call, i, ret)
			}
			for _, p := range procs {
				pids = append(pids, p.Pid)
			}
		}
		slices.Sort(pids)
		out[i] = slices.Compact(pids)
	}
	return out, nil
}
