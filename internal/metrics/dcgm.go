package metrics

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// GPU labels. The first six are dcgm-exporter's, spelled as it spells
// them; node, tenant and job are gpusched's.
const (
	LabelGPU       = "gpu"        // NVML index, "0"
	LabelUUID      = "UUID"       // "GPU-..."
	LabelPCIBusID  = "pci_bus_id" // "00000000:18:00.0"
	LabelDevice    = "device"     // "nvidia0"
	LabelModelName = "modelName"  // NVML product name, "NVIDIA H100 80GB HBM3"
	LabelHostname  = "Hostname"   // the node's hostname
	LabelNode      = "node"       // the gpusched node name
	LabelTenant    = "tenant"     // tenant of the lease holding the node; empty when idle
	LabelJob       = "job"        // job holding the node; empty when idle
)

// gpuLabels are the labels of every DCGM_FI_* series, in order.
var gpuLabels = []string{LabelGPU, LabelUUID, LabelPCIBusID, LabelDevice, LabelModelName, LabelHostname, LabelNode, LabelTenant, LabelJob}

// DefaultStaleAfter: a GPU whose newest sample is older than this is not
// exported (its agent stopped reporting), as dcgm-exporter drops a GPU it
// can no longer read.
const DefaultStaleAfter = time.Minute

// GPUReading is one GPU's newest sample with what it is exported under.
type GPUReading struct {
	Node      string
	Hostname  string
	ModelName string
	PCIBusID  string
	Tenant    string
	Job       string
	// Time is when the sample was taken.
	Time   time.Time
	Sample *pb.GpuSample
}

// dcgmField is one exported DCGM field: its series and how a sample gives
// its value.
type dcgmField struct {
	name  string
	desc  *prometheus.Desc
	typ   prometheus.ValueType
	value func(*pb.GpuSample) float64
}

const bytesPerMiB = 1 << 20

// dcgmFields are the fields gpusched exports, with dcgm-exporter's names,
// types, units and help (its default-counters.csv).
var dcgmFields = []dcgmField{
	gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", func(s *pb.GpuSample) float64 { return float64(s.GetGpuUtil()) }),
	gauge("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", func(s *pb.GpuSample) float64 { return float64(s.GetMemCopyUtil()) }),
	gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", func(s *pb.GpuSample) float64 { return float64(s.GetFbUsedBytes() / bytesPerMiB) }),
	gauge("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", func(s *pb.GpuSample) float64 { return float64(s.GetFbFreeBytes() / bytesPerMiB) }),
	gauge("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", func(s *pb.GpuSample) float64 { return float64(s.GetGpuTemp()) }),
	gauge("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", func(s *pb.GpuSample) float64 { return float64(s.GetPowerUsageMilliwatts()) / 1000 }),
	gauge("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", func(s *pb.GpuSample) float64 { return float64(s.GetSmClockMhz()) }),
	gauge("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", func(s *pb.GpuSample) float64 { return float64(s.GetMemClockMhz()) }),
	gauge("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "Current clock throttle reasons.", func(s *pb.GpuSample) float64 { return float64(s.GetClockThrottleReasons()) }),
	gauge("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", func(s *pb.GpuSample) float64 { return float64(s.GetLastXid()) }),
	counter("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "Total number of single-bit volatile ECC errors.", func(s *pb.GpuSample) float64 { return float64(s.GetEccSbeVolatile()) }),
	counter("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "Total number of double-bit volatile ECC errors.", func(s *pb.GpuSample) float64 { return float64(s.GetEccDbeVolatile()) }),
	counter("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for correctable errors.", func(s *pb.GpuSample) float64 { return float64(s.GetRemappedRowsCorrectable()) }),
	counter("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "Number of remapped rows for uncorrectable errors.", func(s *pb.GpuSample) float64 { return float64(s.GetRemappedRowsUncorrectable()) }),
}

func gauge(name, help string, v func(*pb.GpuSample) float64) dcgmField {
	return dcgmField{name, prometheus.NewDesc(name, help, gpuLabels, nil), prometheus.GaugeValue, v}
}

func counter(name, help string, v func(*pb.GpuSample) float64) dcgmField {
	return dcgmField{name, prometheus.NewDesc(name, help, gpuLabels, nil), prometheus.CounterValue, v}
}

// DCGMNames lists the DCGM_FI_* series gpusched exports.
func DCGMNames() []string {
	out := make([]string, len(dcgmFields))
	for i, f := range dcgmFields {
		out[i] = f.name
	}
	return out
}

// GPUCollector exports each GPU's newest sample under dcgm-exporter's
// names, read at scrape time: publishing samples touches no metric.
type GPUCollector struct {
	read       func() []GPUReading
	now        func() time.Time
	staleAfter time.Duration
}

// NewGPUCollector returns a collector reading the GPUs with read at every
// scrape. Readings older than staleAfter (default DefaultStaleAfter) are
// left out.
func NewGPUCollector(read func() []GPUReading, staleAfter time.Duration) *GPUCollector {
	if staleAfter <= 0 {
		staleAfter = DefaultStaleAfter
	}
	return &GPUCollector{read: read, now: time.Now, staleAfter: staleAfter}
}

// Describe implements prometheus.Collector.
func (c *GPUCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, f := range dcgmFields {
		ch <- f.desc
	}
}

// Collect implements prometheus.Collector.
func (c *GPUCollector) Collect(ch chan<- prometheus.Metric) {
	now := c.now()
	type key struct {
		node string
		gpu  int32
	}
	seen := map[key]bool{}
	for _, r := range c.read() {
		s := r.Sample
		k := key{r.Node, s.GetGpu()}
		if s == nil || seen[k] || now.Sub(r.Time) > c.staleAfter {
			continue
		}
		seen[k] = true
		idx := strconv.Itoa(int(s.GetGpu()))
		host := r.Hostname
		if host == "" {
			host = r.Node
		}
		labels := []string{idx, s.GetUuid(), r.PCIBusID, "nvidia" + idx, r.ModelName, host, r.Node, r.Tenant, r.Job}
		for _, f := range dcgmFields {
			ch <- prometheus.MustNewConstMetric(f.desc, f.typ, f.value(s), labels...)
		}
	}
}
