package gpu

import (
	"fmt"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Sample is one GPU's telemetry at one moment. The fields match what
// NVIDIA's dcgm-exporter exports (named in the comments), so the agent can
// re-export them under the same names. A field NVML does not support on
// this GPU reads zero.
type Sample struct {
	// Index is the NVML device index.
	Index int
	// UUID is NVML's GPU identifier.
	UUID string
	// GPUUtil is the percentage of the last sample period a kernel ran
	// (DCGM_FI_DEV_GPU_UTIL).
	GPUUtil uint32
	// MemUtil is the percentage of the last sample period device memory
	// was read or written (DCGM_FI_DEV_MEM_COPY_UTIL).
	MemUtil uint32
	// FBUsedBytes and FBFreeBytes are the framebuffer memory in use and
	// free (DCGM_FI_DEV_FB_USED, DCGM_FI_DEV_FB_FREE, which are in MiB).
	FBUsedBytes, FBFreeBytes uint64
	// TempC is the GPU core temperature in °C (DCGM_FI_DEV_GPU_TEMP).
	TempC uint32
	// PowerMilliwatts is the board's power draw (DCGM_FI_DEV_POWER_USAGE,
	// which is in W).
	PowerMilliwatts uint32
	// SMClockMHz and MemClockMHz are the current clocks
	// (DCGM_FI_DEV_SM_CLOCK, DCGM_FI_DEV_MEM_CLOCK).
	SMClockMHz, MemClockMHz uint32
	// ThrottleReasons is NVML's bit mask of why clocks are held back
	// (nvml.ClocksEventReason*; DCGM_FI_DEV_CLOCKS_EVENT_REASONS).
	ThrottleReasons uint64
	// ECCVolatileSBE and ECCVolatileDBE count corrected (single-bit) and
	// uncorrected (double-bit) ECC errors since the driver loaded
	// (DCGM_FI_DEV_ECC_SBE_VOL_TOTAL, DCGM_FI_DEV_ECC_DBE_VOL_TOTAL).
	ECCVolatileSBE, ECCVolatileDBE uint64
	// RemappedRowsCorrectable and RemappedRowsUncorrectable count memory
	// rows remapped for correctable and uncorrectable errors, Ampere and
	// later (DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS,
	// DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS).
	RemappedRowsCorrectable, RemappedRowsUncorrectable int
}

// symClocksEventReasons is the NVML symbol behind
// GetCurrentClocksEventReasons, which drivers before R535 lack.
const symClocksEventReasons = "nvmlDeviceGetCurrentClocksEventReasons"

// ReadTelemetry reads one Sample per GPU, in index order, from an
// initialised NVML, through nvml.Interface only, so real NVML and the mocks
// read alike. A call that answers ERROR_NOT_SUPPORTED leaves its fields zero
// (GPUs differ in what they report: no ECC, no row remapping, no power
// sensor...); any other error fails the read, naming the NVML call and GPU
// index and wrapping its nvml.Return.
//
// NVML calls, and why where there was a choice:
//   - Temperature: DeviceGetTemperature(TEMPERATURE_GPU). NVML 13 deprecates
//     it for DeviceGetTemperatureV, but keeps exporting it, and every driver
//     has it, while the V form only exists in recent drivers (calling a
//     symbol the loaded library lacks kills the process, since go-nvml
//     binds lazily) and go-nvml wraps it in a TemperatureHandler over an
//     unexported handle that no mock can answer.
//   - Throttling: DeviceGetCurrentClocksEventReasons, the current name, when
//     the library exports it; DeviceGetCurrentClocksThrottleReasons, the
//     same call under its pre-R535 name, otherwise. The choice is made by
//     looking the symbol up (Extensions().LookupSymbol) once per read.
//   - Memory: DeviceGetMemoryInfo (v1, as the inventory uses), whose "used"
//     includes the driver's reservation on the real hardware, like the
//     mocks' idle baseline.
//   - Clocks: DeviceGetClockInfo(CLOCK_SM, CLOCK_MEM), the current clocks.
//   - ECC: DeviceGetTotalEccErrors(CORRECTED/UNCORRECTED, VOLATILE_ECC).
//   - Remapped rows: DeviceGetRemappedRows (Ampere+; NOT_SUPPORTED before).
func ReadTelemetry(lib nvml.Interface) ([]Sample, error) {
	count, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("gpu: DeviceGetCount: %w", ret)
	}
	eventReasons := lib.Extensions().LookupSymbol(symClocksEventReasons) == nil
	out := make([]Sample, count)
	for i := range count {
		if err := readSample(lib, i, eventReasons, &out[i]); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// fieldReader tells, for each NVML call of one GPU's read, whether to use
// its result, remembering the first hard error.
type fieldReader struct {
	gpu int
	err error
}

// use reports whether ret is SUCCESS. NOT_SUPPORTED is skipped silently;
// any other failure is kept (the first one) and skipped.
func (r *fieldReader) use(call string, ret nvml.Return) bool {
	switch {
	case ret == nvml.SUCCESS:
		return true
	case ret == nvml.ERROR_NOT_SUPPORTED:
		return false
	case r.err == nil:
		r.err = fmt.Errorf("gpu: %s for GPU %d: %w", call, r.gpu, ret)
	}
	return false
}

// readSample reads GPU i into s.
func readSample(lib nvml.Interface, i int, eventReasons bool, s *Sample) error {
	dev, ret := lib.DeviceGetHandleByIndex(i)
	if ret != nvml.SUCCESS {
		return fmt.Errorf("gpu: DeviceGetHandleByIndex for GPU %d: %w", i, ret)
	}
	r := fieldReader{gpu: i}
	s.Index = i
	if uuid, ret := dev.GetUUID(); r.use("DeviceGetUUID", ret) {
		s.UUID = uuid
	}
	if u, ret := dev.GetUtilizationRates(); r.use("DeviceGetUtilizationRates", ret) {
		s.GPUUtil, s.MemUtil = u.Gpu, u.Memory
	}
	if mem, ret := dev.GetMemoryInfo(); r.use("DeviceGetMemoryInfo", ret) {
		s.FBUsedBytes, s.FBFreeBytes = mem.Used, mem.Free
	}
	//nolint:staticcheck // SA1019: deliberate, see ReadTelemetry.
	if t, ret := dev.GetTemperature(nvml.TEMPERATURE_GPU); r.use("DeviceGetTemperature", ret) {
		s.TempC = t
	}
	if p, ret := dev.GetPowerUsage(); r.use("DeviceGetPowerUsage", ret) {
		s.PowerMilliwatts = p
	}
	if c, ret := dev.GetClockInfo(nvml.CLOCK_SM); r.use("DeviceGetClockInfo(SM)", ret) {
		s.SMClockMHz = c
	}
	if c, ret := dev.GetClockInfo(nvml.CLOCK_MEM); r.use("DeviceGetClockInfo(MEM)", ret) {
		s.MemClockMHz = c
	}
	if eventReasons {
		if t, ret := dev.GetCurrentClocksEventReasons(); r.use("DeviceGetCurrentClocksEventReasons", ret) {
			s.ThrottleReasons = t
		}
	} else {
		//nolint:staticcheck // SA1019: the only name drivers before R535 know.
		if t, ret := dev.GetCurrentClocksThrottleReasons(); r.use("DeviceGetCurrentClocksThrottleReasons", ret) {
			s.ThrottleReasons = t
		}
	}
	if n, ret := dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_CORRECTED, nvml.VOLATILE_ECC); r.use("DeviceGetTotalEccErrors(corrected)", ret) {
		s.ECCVolatileSBE = n
	}
	if n, ret := dev.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC); r.use("DeviceGetTotalEccErrors(uncorrected)", ret) {
		s.ECCVolatileDBE = n
	}
	if corr, unc, _, _, ret := dev.GetRemappedRows(); r.use("DeviceGetRemappedRows", ret) {
		s.RemappedRowsCorrectable, s.RemappedRowsUncorrectable = corr, unc
	}
	return r.err
}
