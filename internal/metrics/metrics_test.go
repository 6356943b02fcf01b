package metrics

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/model"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: time.Minute}).Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestPprofIsServedOnlyWhenAsked(t *testing.T) {
	for _, pprof := range []bool{false, true} {
		srv := httptest.NewServer(Handler(ServerConfig{Gatherer: NewRegistry(), Pprof: pprof}))
		if code, body := get(t, srv.URL+Path); code != http.StatusOK || !strings.Contains(body, "go_goroutines") {
			t.Errorf("pprof=%v: GET /metrics: %d %.200s", pprof, code, body)
		}
		for _, p := range []string{PprofPath, PprofPath + "cmdline", PprofPath + "heap?debug=1"} {
			code, _ := get(t, srv.URL+p)
			if want := map[bool]int{false: http.StatusNotFound, true: http.StatusOK}[pprof]; code != want {
				t.Errorf("pprof=%v: GET %s: %d, want %d", pprof, p, code, want)
			}
		}
		srv.Close()
	}
}

func TestServeStopsWhenTheContextEnds(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, lis, ServerConfig{Gatherer: NewRegistry()}) }()
	if code, _ := get(t, "http://"+lis.Addr().String()+Path); code != http.StatusOK {
		t.Errorf("GET /metrics: %d", code)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v, want nil after the context ended", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Serve did not return after the context ended")
	}
}

// gather collects reg's families by name.
func gather(t *testing.T, reg prometheus.Gatherer) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

func labels(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

func TestGPUCollectorExportsDCGMSeries(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	readings := []GPUReading{
		{Node: "gpu-01", Hostname: "host-a", ModelName: "NVIDIA H100 80GB HBM3", PCIBusID: "00000000:18:00.0", Tenant: "vision", Job: "42", Time: now.Add(-time.Second),
			Sample: &pb.GpuSample{Gpu: 3, Uuid: "GPU-3", GpuUtil: 97, FbUsedBytes: 3 << 30, FbFreeBytes: 77<<30 + 12345, PowerUsageMilliwatts: 512_500,
				GpuTemp: 61, LastXid: 79, EccDbeVolatile: 2}},
		// No hostname: the node name stands in.
		{Node: "gpu-02", Time: now, Sample: &pb.GpuSample{Gpu: 0, Uuid: "GPU-0"}},
		// The same GPU twice: only the first is exported.
		{Node: "gpu-02", Time: now, Sample: &pb.GpuSample{Gpu: 0, Uuid: "GPU-0", GpuUtil: 50}},
		// Stale: its agent stopped reporting.
		{Node: "gpu-03", Time: now.Add(-2 * time.Minute), Sample: &pb.GpuSample{Gpu: 0, Uuid: "GPU-old"}},
	}
	c := NewGPUCollector(func() []GPUReading { return readings }, time.Minute)
	c.now = func() time.Time { return now }
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	fams := gather(t, reg)
	for _, name := range DCGMNames() {
		if got := len(fams[name].GetMetric()); got != 2 {
			t.Errorf("%s: %d series, want 2 (one per fresh GPU)", name, got)
		}
	}
	if got := fams["DCGM_FI_DEV_GPU_UTIL"].GetType(); got != dto.MetricType_GAUGE {
		t.Errorf("DCGM_FI_DEV_GPU_UTIL is a %s, want a gauge", got)
	}
	if got := fams["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"].GetType(); got != dto.MetricType_COUNTER {
		t.Errorf("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL is a %s, want a counter", got)
	}
	value := func(name, uuid string) float64 {
		for _, m := range fams[name].GetMetric() {
			if labels(m)[LabelUUID] == uuid {
				return m.GetGauge().GetValue() + m.GetCounter().GetValue()
			}
		}
		t.Fatalf("%s: no series for %s", name, uuid)
		return 0
	}
	for _, tc := range []struct {
		name string
		want float64
	}{
		{"DCGM_FI_DEV_GPU_UTIL", 97},
		{"DCGM_FI_DEV_FB_USED", 3 << 10}, // MiB
		{"DCGM_FI_DEV_FB_FREE", 77 << 10},
		{"DCGM_FI_DEV_POWER_USAGE", 512.5}, // W
		{"DCGM_FI_DEV_GPU_TEMP", 61},
		{"DCGM_FI_DEV_XID_ERRORS", 79},
		{"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 2},
	} {
		if got := value(tc.name, "GPU-3"); got != tc.want {
			t.Errorf("%s = %v, want %v", tc.name, got, tc.want)
		}
	}
	if got := value("DCGM_FI_DEV_GPU_UTIL", "GPU-0"); got != 0 {
		t.Errorf("the repeated GPU exported %v, want the first reading's 0", got)
	}
	for _, m := range fams["DCGM_FI_DEV_GPU_UTIL"].GetMetric() {
		l := labels(m)
		want := map[string]string{LabelGPU: "3", LabelUUID: "GPU-3", LabelPCIBusID: "00000000:18:00.0", LabelDevice: "nvidia3",
			LabelModelName: "NVIDIA H100 80GB HBM3", LabelHostname: "host-a", LabelNode: "gpu-01", LabelTenant: "vision", LabelJob: "42"}
		if l[LabelUUID] == "GPU-0" {
			want = map[string]string{LabelGPU: "0", LabelUUID: "GPU-0", LabelPCIBusID: "", LabelDevice: "nvidia0",
				LabelModelName: "", LabelHostname: "gpu-02", LabelNode: "gpu-02", LabelTenant: "", LabelJob: ""}
		}
		for k, v := range want {
			if got, ok := l[k]; (!ok && v != "") || got != v {
				t.Errorf("%s: label %s=%q, want %q", l[LabelUUID], k, got, v)
			}
		}
	}
}

func TestSchedulerCountsWhatItObserves(t *testing.T) {
	m := NewScheduler(SchedulerConfig{Leader: func() (*engine.Engine, error) { return nil, model.ErrNotLeader }})
	m.ScheduleCycle(3 * time.Millisecond)
	m.SubmitToLease(2 * time.Second)
	m.Commit(4 * time.Millisecond)
	m.RPCDone("/gpusched.v1.JobService/SubmitJob", codes.OK, time.Millisecond)
	m.RPCDone("/gpusched.v1.JobService/SubmitJob", codes.InvalidArgument, time.Millisecond)
	m.TelemetryReceived(8)
	m.TelemetryDropped(5)
	fams := gather(t, m.Registry())
	for name, want := range map[string]uint64{
		"gpusched_schedule_cycle_duration_seconds": 1, "gpusched_submit_to_lease_seconds": 1, "gpusched_commit_duration_seconds": 1,
	} {
		if got := fams[name].GetMetric()[0].GetHistogram().GetSampleCount(); got != want {
			t.Errorf("%s: %d observations, want %d", name, got, want)
		}
	}
	if got := len(fams["gpusched_api_requests_total"].GetMetric()); got != 2 {
		t.Errorf("gpusched_api_requests_total: %d series, want one per code", got)
	}
	if got := fams["gpusched_telemetry_samples_total"].GetMetric()[0].GetCounter().GetValue(); got != 8 {
		t.Errorf("gpusched_telemetry_samples_total = %v, want 8", got)
	}
	if got := fams["gpusched_telemetry_dropped_total"].GetMetric()[0].GetCounter().GetValue(); got != 5 {
		t.Errorf("gpusched_telemetry_dropped_total = %v, want 5", got)
	}
	// A follower exports is_leader 0 and none of the leader's series.
	if got := fams["gpusched_is_leader"].GetMetric()[0].GetGauge().GetValue(); got != 0 {
		t.Errorf("gpusched_is_leader = %v on a follower, want 0", got)
	}
	for _, name := range []string{"gpusched_jobs", "gpusched_nodes", "gpusched_fencing_token", "gpusched_leases_active"} {
		if fams[name] != nil {
			t.Errorf("%s exported by a follower", name)
		}
	}
}
