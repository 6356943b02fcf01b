package gpu

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
)

func TestEveryMockModelReadsSaneIdleTelemetry(t *testing.T) {
	cases := []struct {
		name, backend      string
		maxPowerW          uint32 // board TDP
		minIdleW, maxIdleW uint32
	}{
		{"a DGX A100 reports eight idle A100s", BackendMockDGXA100, 400, 40, 100},
		{"a DGX H100 reports eight idle H100s", BackendMockDGXH100, 700, 60, 100},
		{"a DGX H200 reports eight idle H200s", BackendMockDGXH200, 700, 60, 100},
		{"a DGX B200 reports eight idle B200s", BackendMockDGXB200, 1000, 100, 200},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := mustOpen(t, c.backend)
			inv, err := ReadInventory(b.NVML)
			if err != nil {
				t.Fatal(err)
			}
			samples, err := ReadTelemetry(b.NVML)
			if err != nil {
				t.Fatalf("ReadTelemetry: %v", err)
			}
			if len(samples) != 8 {
				t.Fatalf("%d samples, want 8", len(samples))
			}
			for i, s := range samples {
				g := inv.GPUs[i]
				check := func(what string, ok bool) {
					t.Helper()
					if !ok {
						t.Errorf("GPU %d: %s: %+v", i, what, s)
					}
				}
				check("index and UUID match the inventory", s.Index == i && s.UUID == g.UUID)
				check("an idle GPU does no work", s.GPUUtil == 0 && s.MemUtil == 0)
				check("an idle GPU uses exactly the baseline memory", s.FBUsedBytes == b.Mock.IdleFBUsedBytes())
				check("used and free memory add up to the total", s.FBUsedBytes+s.FBFreeBytes == g.MemoryBytes)
				check("an idle GPU is cool", s.TempC >= 25 && s.TempC <= 40)
				check("an idle GPU draws idle power",
					s.PowerMilliwatts >= c.minIdleW*1000 && s.PowerMilliwatts <= c.maxIdleW*1000 && s.PowerMilliwatts < c.maxPowerW*1000)
				check("clocks are plausible", s.SMClockMHz > 0 && s.SMClockMHz < 3000 && s.MemClockMHz > 0 && s.MemClockMHz < 5000)
				check("an idle GPU says its clocks are down for idleness", s.ThrottleReasons == nvml.ClocksEventReasonGpuIdle)
				check("a fresh GPU has no ECC errors or remapped rows",
					s.ECCVolatileSBE == 0 && s.ECCVolatileDBE == 0 && s.RemappedRowsCorrectable == 0 && s.RemappedRowsUncorrectable == 0)
			}
		})
	}
}

// bareDevice is a go-nvml moq device answering every call ReadTelemetry,
// CheckHealth and WatchXIDs make with fixed, recognisable values; tests
// then break single calls.
func bareDevice(uuid string) *mock.Device {
	return &mock.Device{
		GetUUIDFunc: func() (string, nvml.Return) { return uuid, nvml.SUCCESS },
		GetUtilizationRatesFunc: func() (nvml.Utilization, nvml.Return) {
			return nvml.Utilization{Gpu: 77, Memory: 33}, nvml.SUCCESS
		},
		GetMemoryInfoFunc: func() (nvml.Memory, nvml.Return) {
			return nvml.Memory{Total: 80 << 30, Used: 1 << 30, Free: 79 << 30}, nvml.SUCCESS
		},
		GetTemperatureFunc: func(nvml.TemperatureSensors) (uint32, nvml.Return) { return 45, nvml.SUCCESS },
		GetPowerUsageFunc:  func() (uint32, nvml.Return) { return 250_000, nvml.SUCCESS },
		GetClockInfoFunc: func(c nvml.ClockType) (uint32, nvml.Return) {
			if c == nvml.CLOCK_MEM {
				return 2619, nvml.SUCCESS
			}
			return 1980, nvml.SUCCESS
		},
		GetCurrentClocksEventReasonsFunc: func() (uint64, nvml.Return) {
			return nvml.ClocksEventReasonSwPowerCap, nvml.SUCCESS
		},
		GetTotalEccErrorsFunc: func(k nvml.MemoryErrorType, _ nvml.EccCounterType) (uint64, nvml.Return) {
			if k == nvml.MEMORY_ERROR_TYPE_CORRECTED {
				return 5, nvml.SUCCESS
			}
			return 0, nvml.SUCCESS
		},
		GetRemappedRowsFunc: func() (int, int, bool, bool, nvml.Return) { return 2, 1, false, false, nvml.SUCCESS },
		GetRetiredPagesPendingStatusFunc: func() (nvml.EnableState, nvml.Return) {
			return nvml.FEATURE_DISABLED, nvml.ERROR_NOT_SUPPORTED
		},
	}
}

// bareLib is a go-nvml moq Interface over the given devices whose library
// has every symbol.
func bareLib(devs ...*mock.Device) *mock.Interface {
	return &mock.Interface{
		DeviceGetCountFunc: func() (int, nvml.Return) { return len(devs), nvml.SUCCESS },
		DeviceGetHandleByIndexFunc: func(i int) (nvml.Device, nvml.Return) {
			return devs[i], nvml.SUCCESS
		},
		ExtensionsFunc: func() nvml.ExtendedInterface {
			return &mock.ExtendedInterface{LookupSymbolFunc: func(string) error { return nil }}
		},
	}
}

func TestReadTelemetryReadsEveryField(t *testing.T) {
	got, err := ReadTelemetry(bareLib(bareDevice("GPU-a")))
	if err != nil {
		t.Fatal(err)
	}
	want := Sample{Index: 0, UUID: "GPU-a", GPUUtil: 77, MemUtil: 33, FBUsedBytes: 1 << 30, FBFreeBytes: 79 << 30,
		TempC: 45, PowerMilliwatts: 250_000, SMClockMHz: 1980, MemClockMHz: 2619,
		ThrottleReasons: nvml.ClocksEventReasonSwPowerCap, ECCVolatileSBE: 5,
		RemappedRowsCorrectable: 2, RemappedRowsUncorrectable: 1}
	if len(got) != 1 || got[0] != want {
		t.Fatalf("ReadTelemetry = %+v\nwant %+v", got, want)
	}
}

func TestReadTelemetryLeavesUnsupportedFieldsZero(t *testing.T) {
	notSupported := nvml.ERROR_NOT_SUPPORTED
	cases := []struct {
		name    string
		breakIt func(d *mock.Device)
		zero    func(s Sample) bool
	}{
		{"a GPU without a power sensor reads zero power",
			func(d *mock.Device) { d.GetPowerUsageFunc = func() (uint32, nvml.Return) { return 0, notSupported } },
			func(s Sample) bool { return s.PowerMilliwatts == 0 }},
		{"a GPU without a temperature sensor reads zero degrees",
			func(d *mock.Device) {
				d.GetTemperatureFunc = func(nvml.TemperatureSensors) (uint32, nvml.Return) { return 0, notSupported }
			},
			func(s Sample) bool { return s.TempC == 0 }},
		{"a GPU with ECC off reads zero ECC counts",
			func(d *mock.Device) {
				d.GetTotalEccErrorsFunc = func(nvml.MemoryErrorType, nvml.EccCounterType) (uint64, nvml.Return) {
					return 0, notSupported
				}
			},
			func(s Sample) bool { return s.ECCVolatileSBE == 0 && s.ECCVolatileDBE == 0 }},
		{"a pre-Ampere GPU reads zero remapped rows",
			func(d *mock.Device) {
				d.GetRemappedRowsFunc = func() (int, int, bool, bool, nvml.Return) { return 0, 0, false, false, notSupported }
			},
			func(s Sample) bool { return s.RemappedRowsCorrectable == 0 && s.RemappedRowsUncorrectable == 0 }},
		{"a GPU without throttle reasons reads none",
			func(d *mock.Device) {
				d.GetCurrentClocksEventReasonsFunc = func() (uint64, nvml.Return) { return 0, notSupported }
			},
			func(s Sample) bool { return s.ThrottleReasons == 0 }},
		{"a GPU without utilization counters reads zero utilization",
			func(d *mock.Device) {
				d.GetUtilizationRatesFunc = func() (nvml.Utilization, nvml.Return) { return nvml.Utilization{}, notSupported }
			},
			func(s Sample) bool { return s.GPUUtil == 0 && s.MemUtil == 0 }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := bareDevice("GPU-a")
			c.breakIt(d)
			got, err := ReadTelemetry(bareLib(bareDevice("GPU-0"), d))
			if err != nil {
				t.Fatalf("ReadTelemetry = %v, want NOT_SUPPORTED tolerated", err)
			}
			if len(got) != 2 || !c.zero(got[1]) {
				t.Fatalf("samples %+v; want the unsupported field zero", got)
			}
			// The rest of the sample is still read.
			if s := got[1]; s.UUID != "GPU-a" || s.FBUsedBytes != 1<<30 || s.SMClockMHz != 1980 {
				t.Fatalf("sample %+v lost fields that were supported", s)
			}
		})
	}
}

func TestReadTelemetryErrorNamesCallAndGPU(t *testing.T) {
	cases := []struct {
		name, call string
		ret        nvml.Return
		breakIt    func(d *mock.Device, ret nvml.Return)
	}{
		{"a lost GPU fails the read", "DeviceGetPowerUsage", nvml.ERROR_GPU_IS_LOST,
			func(d *mock.Device, ret nvml.Return) {
				d.GetPowerUsageFunc = func() (uint32, nvml.Return) { return 0, ret }
			}},
		{"a permission error fails the read", "DeviceGetTotalEccErrors(uncorrected)", nvml.ERROR_NO_PERMISSION,
			func(d *mock.Device, ret nvml.Return) {
				d.GetTotalEccErrorsFunc = func(k nvml.MemoryErrorType, _ nvml.EccCounterType) (uint64, nvml.Return) {
					if k == nvml.MEMORY_ERROR_TYPE_UNCORRECTED {
						return 0, ret
					}
					return 0, nvml.SUCCESS
				}
			}},
		{"an unknown error in the first call fails the read", "DeviceGetUUID", nvml.ERROR_UNKNOWN,
			func(d *mock.Device, ret nvml.Return) { d.GetUUIDFunc = func() (string, nvml.Return) { return "", ret } }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := bareDevice("GPU-b")
			c.breakIt(d, c.ret)
			_, err := ReadTelemetry(bareLib(bareDevice("GPU-a"), d))
			if !errors.Is(err, c.ret) || !strings.Contains(err.Error(), c.call) || !strings.Contains(err.Error(), "GPU 1") {
				t.Fatalf("ReadTelemetry = %v; want %s on GPU 1 wrapping %v", err, c.call, c.ret)
			}
		})
	}
}

func TestReadTelemetryUsesTheOldThrottleCallOnOldDrivers(t *testing.T) {
	d := bareDevice("GPU-old")
	// An R470 driver has no nvmlDeviceGetCurrentClocksEventReasons: calling
	// it would kill the process, so the test makes it fail loudly.
	d.GetCurrentClocksEventReasonsFunc = nil
	d.GetCurrentClocksThrottleReasonsFunc = func() (uint64, nvml.Return) {
		return nvml.ClocksThrottleReasonHwSlowdown, nvml.SUCCESS
	}
	lib := bareLib(d)
	lib.ExtensionsFunc = func() nvml.ExtendedInterface {
		return &mock.ExtendedInterface{LookupSymbolFunc: func(sym string) error {
			if sym == "nvmlDeviceGetCurrentClocksEventReasons" {
				return fmt.Errorf("undefined symbol: %s", sym)
			}
			return nil
		}}
	}
	got, err := ReadTelemetry(lib)
	if err != nil {
		t.Fatal(err)
	}
	if got[0].ThrottleReasons != nvml.ClocksThrottleReasonHwSlowdown {
		t.Fatalf("throttle reasons %#x, want HW slowdown from the old call", got[0].ThrottleReasons)
	}
}

func TestMockPollingLeavesGoNVMLsCallLogEmpty(t *testing.T) {
	b := mustOpen(t, BackendMockDGXH100)
	b.Mock.SetProcesses(0, []uint32{1})
	w, err := WatchXIDs(b.NVML)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for range 10 {
		if _, err := ReadTelemetry(b.NVML); err != nil {
			t.Fatal(err)
		}
		if _, err := ListGPUProcesses(b.NVML); err != nil {
			t.Fatal(err)
		}
		_ = CheckHealth(b.NVML, 8, 90)
		if _, _, err := w.Next(0); err != nil {
			t.Fatal(err)
		}
	}
	s := b.Mock.server
	if n := len(s.DeviceGetCountCalls()) + len(s.DeviceGetHandleByIndexCalls()) + len(s.ExtensionsCalls()) +
		len(s.EventSetCreateCalls()); n != 0 {
		t.Errorf("go-nvml recorded %d library calls made while polling", n)
	}
	for i, dev := range s.Devices {
		d := dev.(*server.Device)
		n := len(d.GetUUIDCalls()) + len(d.GetUtilizationRatesCalls()) + len(d.GetMemoryInfoCalls()) +
			len(d.GetTemperatureCalls()) + len(d.GetPowerUsageCalls()) + len(d.GetClockInfoCalls()) +
			len(d.GetCurrentClocksEventReasonsCalls()) + len(d.GetTotalEccErrorsCalls()) +
			len(d.GetRemappedRowsCalls()) + len(d.GetRetiredPagesPendingStatusCalls()) +
			len(d.GetComputeRunningProcessesCalls()) + len(d.GetGraphicsRunningProcessesCalls()) +
			len(d.RegisterEventsCalls()) + len(d.GetSupportedEventTypesCalls())
		if n != 0 {
			t.Errorf("go-nvml recorded %d calls on GPU %d made while polling", n, i)
		}
	}
}

// BenchmarkReadTelemetry reads a whole simulated DGX H100 (8 GPUs), as the
// agent does every telemetry interval.
func BenchmarkReadTelemetry(b *testing.B) {
	be, err := OpenMock(BackendMockDGXH100, MockOptions{NodeName: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	defer be.Close()
	for i := range 4 {
		be.Mock.SetProcesses(i, []uint32{uint32(100 + i)})
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ReadTelemetry(be.NVML); err != nil {
			b.Fatal(err)
		}
	}
}
