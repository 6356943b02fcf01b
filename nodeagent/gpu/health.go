package gpu

import (
	"fmt"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// NodeProblem is the Problem.GPU of a problem with the node as a whole.
const NodeProblem = -1

// Problem is one reason a node's GPUs are not fit for a lease.
type Problem struct {
	// GPU is the NVML index of the GPU concerned, or NodeProblem.
	GPU int
	// What says what is wrong, for people: it goes into node events.
	What string
}

// String formats the problem as "GPU 3: ..." or "node: ...".
func (p Problem) String() string {
	if p.GPU == NodeProblem {
		return "node: " + p.What
	}
	return fmt.Sprintf("GPU %d: %s", p.GPU, p.What)
}

// CheckHealth checks what NVML can tell about the GPUs' fitness, through
// nvml.Interface only, and returns the problems found; none means healthy.
// It checks that:
//   - there are at least expectedGPUs GPUs, and each answers NVML;
//   - no GPU is hotter than maxTempC (0 skips the check);
//   - no GPU has a volatile uncorrected (double-bit) ECC error;
//   - no GPU has a row remapping pending (needs a GPU reset) or failed
//     (needs repair), nor, on pre-Ampere GPUs, retired pages pending.
//
// A call a GPU does not support (ERROR_NOT_SUPPORTED) skips that check;
// any other NVML error is itself a problem. GPU processes are not checked
// here (whether they belong to a lease is the agent's call), nor are
// unresolved fatal XIDs (the agent tracks those from its EventWatcher).
//
// Remapped rows by themselves are not a problem: a row remapped for an
// uncorrectable error is the repair, which NVIDIA's guidance treats as
// healthy once applied (pending clears on reset); the count stays for the
// GPU's life, so failing on it would drain a repaired node forever. The
// count is in the telemetry (Sample.RemappedRowsUncorrectable).
func CheckHealth(lib nvml.Interface, expectedGPUs int, maxTempC uint32) []Problem {
	var out []Problem
	count, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return []Problem{{NodeProblem, fmt.Sprintf("cannot count GPUs: DeviceGetCount: %v", ret)}}
	}
	if count < expectedGPUs {
		out = append(out, Problem{NodeProblem, fmt.Sprintf("%d GPUs visible, expected %d", count, expectedGPUs)})
	}
	for i := range count {
		out = append(out, checkGPUHealth(lib, i, maxTempC)...)
	}
	return out
}

// checkGPUHealth checks GPU i (see CheckHealth).
func checkGPUHealth(lib nvml.Interface, i int, maxTempC uint32) []Problem {
	var out []Problem
	problem := func(format string, args ...any) {
		out = append(out, Problem{i, fmt.Sprintf(format, args...)})
	}
	// failed reports whether ret is an error other than NOT_SUPPORTED,
	// recording it as a problem.
	failed := func(call string, ret nvml.Return) bool {
		if ret == nvml.SUCCESS || ret == nvml.ERROR_NOT_SUPPORTED {
			return false
		}
		problem("%s: %v", call, ret)
		return true
	}
	dev, ret := lib.DeviceGetHandleByIndex(i)
	if ret != nvml.SUCCESS {
		problem("DeviceGetHandleByIndex: %v", ret)
		return out
	}

	if maxTempC > 0 {
		//nolint:staticcheck // SA1019: deliberate, see ReadTelemetry.
		t, ret := dev.GetTemperature(nvml.TEMPERATURE_GPU)
		if ret == nvml.SUCCESS && t > maxTempC {
			problem("temperature %d °C above the limit of %d °C", t, maxTempC)
		}
		failed("DeviceGetTemperature", ret)
	}

	dbe, ret := dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC)
	if ret == nvml.SUCCESS && dbe > 0 {
		problem("%d uncorrectable (double-bit) ECC errors since the driver loaded", dbe)
	}
	failed("DeviceGetTotalEccErrors(uncorrected)", ret)

	_, unc, pending, failure, ret := dev.GetRemappedRows()
	if ret == nvml.SUCCESS {
		if failure {
			problem("row remapping failed (%d rows remapped for uncorrectable errors): needs repair", unc)
		}
		if pending {
			problem("row remapping pending: needs a GPU reset")
		}
	}
	failed("DeviceGetRemappedRows", ret)

	retired, ret := dev.GetRetiredPagesPendingStatus()
	if ret == nvml.SUCCESS && retired == nvml.FEATURE_ENABLED {
		problem("retired pages pending: needs a GPU reset")
	}
	failed("DeviceGetRetiredPagesPendingStatus", ret)
	return out
}
