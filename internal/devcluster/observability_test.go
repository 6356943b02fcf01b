package devcluster_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"

	"github.com/gpusched/gpusched/client"
	"github.com/gpusched/gpusched/internal/devcluster"
	"github.com/gpusched/gpusched/internal/metrics"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// dashboardPath is the Grafana dashboard every panel of which must query
// series a real scrape has.
const dashboardPath = "../../docs/grafana/gpusched.json"

// scrape GETs http://addr/metrics and parses it with Prometheus' text parser.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := get(t, addr, metrics.Path)
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %.300s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

func labelsOf(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// value is the value of the series of fam whose labels include want; ok
// is false when there is none.
func value(fams map[string]*dto.MetricFamily, fam string, want map[string]string) (float64, bool) {
	for _, m := range fams[fam].GetMetric() {
		l := labelsOf(m)
		match := true
		for k, v := range want {
			match = match && l[k] == v
		}
		if match {
			return m.GetGauge().GetValue() + m.GetCounter().GetValue() + m.GetUntyped().GetValue() +
				float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

func newClient(t *testing.T, c *devcluster.Cluster) *client.Client {
	t.Helper()
	cl, err := client.New(context.Background(), client.Config{Endpoints: []string{c.Endpoint}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// submit submits a job, retrying while the scheduler is still electing.
func submit(t *testing.T, cl *client.Client, spec *pb.JobSpec) *pb.Job {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		j, err := cl.Submit(ctx, spec)
		cancel()
		if err == nil {
			return j
		}
		if time.Now().After(deadline) || !errors.Is(err, client.ErrUnavailable) {
			t.Fatalf("submit: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestMetricsEndpoint runs jobs on a dev cluster and checks its /metrics
// as Prometheus reads them: DCGM series per simulated GPU with
// dcgm-exporter's labels, the scheduler's series, and that the Grafana
// dashboard queries only series that exist.
func TestMetricsEndpoint(t *testing.T) {
	const nodes, gpusPerNode = 2, 8
	c, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: nodes, MetricsListen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	addr := c.MetricsAddr()
	if addr == "" || strings.HasSuffix(addr, ":0") {
		t.Fatalf("MetricsAddr %q, want the bound address", addr)
	}
	cl := newClient(t, c)

	done := submit(t, cl, &pb.JobSpec{Nodes: 1, Command: []string{"true"}})
	wctx, wcancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer wcancel()
	if j, err := cl.Wait(wctx, done.GetId()); err != nil || j.GetState() != pb.JobState_JOB_STATE_SUCCEEDED {
		t.Fatalf("job %s: %v, %v; want SUCCEEDED", done.GetId(), j.GetState(), err)
	}
	// A job that holds a node while we scrape: its GPUs carry its labels.
	running := submit(t, cl, &pb.JobSpec{Nodes: 1, Command: []string{"sleep", "300"}, Tenant: "vision"})
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, _ = cl.Cancel(ctx, running.GetId(), "test over")
	}()

	// Poll until the cluster's state shows in a scrape.
	var fams map[string]*dto.MetricFamily
	deadline := time.Now().Add(3 * time.Minute)
	for {
		fams = scrape(t, addr)
		var why []string
		if n := len(fams["DCGM_FI_DEV_GPU_UTIL"].GetMetric()); n != nodes*gpusPerNode {
			why = append(why, fmt.Sprintf("%d DCGM_FI_DEV_GPU_UTIL series", n))
		}
		if _, ok := value(fams, "DCGM_FI_DEV_GPU_UTIL", map[string]string{"job": running.GetId(), "tenant": "vision"}); !ok {
			why = append(why, "no GPU of the running job")
		}
		if v, _ := value(fams, "gpusched_jobs", map[string]string{"state": "succeeded"}); v < 1 {
			why = append(why, "no succeeded job")
		}
		if v, _ := value(fams, "gpusched_is_leader", nil); v != 1 {
			why = append(why, "not leader")
		}
		if v, _ := value(fams, "gpusched_agents_connected", nil); v != nodes {
			why = append(why, fmt.Sprintf("%v agents connected", v))
		}
		if why == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics never showed the cluster: %s", strings.Join(why, "; "))
		}
		time.Sleep(200 * time.Millisecond)
	}

	t.Run("DCGM", func(t *testing.T) {
		uuids := map[string]bool{}
		perNode := map[string]int{}
		for _, m := range fams["DCGM_FI_DEV_GPU_UTIL"].GetMetric() {
			l := labelsOf(m)
			for _, k := range []string{"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "node"} {
				if l[k] == "" {
					t.Errorf("DCGM_FI_DEV_GPU_UTIL %v: no %s label", l, k)
				}
			}
			if !strings.HasPrefix(l["UUID"], "GPU-") || l["device"] != "nvidia"+l["gpu"] || !strings.Contains(l["modelName"], "H100") {
				t.Errorf("DCGM_FI_DEV_GPU_UTIL labels %v: want UUID GPU-..., device nvidia<gpu>, an H100 modelName", l)
			}
			if (l["job"] == running.GetId()) != (l["tenant"] == "vision") {
				t.Errorf("DCGM_FI_DEV_GPU_UTIL labels %v: job and tenant disagree", l)
			}
			uuids[l["UUID"]] = true
			perNode[l["node"]]++
		}
		if len(uuids) != nodes*gpusPerNode {
			t.Errorf("%d distinct GPU UUIDs, want %d", len(uuids), nodes*gpusPerNode)
		}
		for n, k := range perNode {
			if k != gpusPerNode {
				t.Errorf("node %s: %d GPUs exported, want %d", n, k, gpusPerNode)
			}
		}
		for _, name := range metrics.DCGMNames() {
			fam := fams[name]
			if len(fam.GetMetric()) != nodes*gpusPerNode {
				t.Errorf("%s: %d series, want %d", name, len(fam.GetMetric()), nodes*gpusPerNode)
			}
		}
		for name, typ := range map[string]dto.MetricType{
			"DCGM_FI_DEV_GPU_UTIL": dto.MetricType_GAUGE, "DCGM_FI_DEV_FB_USED": dto.MetricType_GAUGE,
			"DCGM_FI_DEV_POWER_USAGE": dto.MetricType_GAUGE, "DCGM_FI_DEV_XID_ERRORS": dto.MetricType_GAUGE,
			"DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": dto.MetricType_COUNTER, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": dto.MetricType_COUNTER,
		} {
			if got := fams[name].GetType(); got != typ {
				t.Errorf("%s is a %s, want %s", name, got, typ)
			}
		}
		// Framebuffer in MiB: an 80 GB GPU's used+free is about 80k, not 8e10.
		for _, m := range fams["DCGM_FI_DEV_FB_USED"].GetMetric() {
			free, _ := value(fams, "DCGM_FI_DEV_FB_FREE", map[string]string{"UUID": labelsOf(m)["UUID"]})
			if total := m.GetGauge().GetValue() + free; total < 70_000 || total > 200_000 {
				t.Errorf("FB used+free %v MiB, want an H100's ~80 GiB in MiB", total)
			}
		}
	})

	t.Run("Scheduler", func(t *testing.T) {
		want := map[string]dto.MetricType{
			"gpusched_jobs": dto.MetricType_GAUGE, "gpusched_nodes": dto.MetricType_GAUGE,
			"gpusched_leases_active": dto.MetricType_GAUGE, "gpusched_is_leader": dto.MetricType_GAUGE,
			"gpusched_fencing_token": dto.MetricType_GAUGE, "gpusched_agents_connected": dto.MetricType_GAUGE,
			"gpusched_schedule_cycle_duration_seconds": dto.MetricType_HISTOGRAM,
			"gpusched_submit_to_lease_seconds":         dto.MetricType_HISTOGRAM,
			"gpusched_commit_duration_seconds":         dto.MetricType_HISTOGRAM,
			"gpusched_api_requests_total":              dto.MetricType_COUNTER,
			"gpusched_api_request_duration_seconds":    dto.MetricType_HISTOGRAM,
			"gpusched_telemetry_samples_total":         dto.MetricType_COUNTER,
			"gpusched_telemetry_dropped_total":         dto.MetricType_COUNTER,
			"go_goroutines":                            dto.MetricType_GAUGE,
			"process_cpu_seconds_total":                dto.MetricType_COUNTER,
		}
		for name, typ := range want {
			if fams[name] == nil {
				t.Errorf("%s: missing", name)
			} else if got := fams[name].GetType(); got != typ {
				t.Errorf("%s is a %s, want %s", name, got, typ)
			}
		}
		for _, name := range []string{"gpusched_schedule_cycle_duration_seconds", "gpusched_submit_to_lease_seconds", "gpusched_commit_duration_seconds"} {
			if v, _ := value(fams, name, nil); v < 2 {
				t.Errorf("%s: %v observations, want at least 2 (two jobs leased)", name, v)
			}
		}
		if v, _ := value(fams, "gpusched_fencing_token", nil); v <= 0 {
			t.Errorf("gpusched_fencing_token = %v, want the term's revision", v)
		}
		if v, _ := value(fams, "gpusched_leases_active", nil); v != 1 {
			t.Errorf("gpusched_leases_active = %v, want 1 (the running job)", v)
		}
		if v, _ := value(fams, "gpusched_nodes", map[string]string{"state": "leased"}); v != 1 {
			t.Errorf(`gpusched_nodes{state="leased"} = %v, want 1`, v)
		}
		states := map[string]bool{}
		for _, m := range fams["gpusched_jobs"].GetMetric() {
			states[labelsOf(m)["state"]] = true
		}
		for _, s := range []string{"pending", "scheduled", "running", "succeeded", "failed", "cancelled", "timed_out"} {
			if !states[s] {
				t.Errorf("gpusched_jobs has no state=%q series", s)
			}
		}
		if v, _ := value(fams, "gpusched_api_requests_total", map[string]string{"method": "/gpusched.v1.JobService/SubmitJob", "code": "OK"}); v < 2 {
			t.Errorf(`gpusched_api_requests_total{method="/gpusched.v1.JobService/SubmitJob",code="OK"} = %v, want >= 2`, v)
		}
		if v, _ := value(fams, "gpusched_api_request_duration_seconds", map[string]string{"method": "/gpusched.v1.JobService/SubmitJob"}); v < 2 {
			t.Errorf("gpusched_api_request_duration_seconds for SubmitJob: %v observations, want >= 2", v)
		}
		if v, _ := value(fams, "gpusched_telemetry_samples_total", nil); v < nodes*gpusPerNode {
			t.Errorf("gpusched_telemetry_samples_total = %v, want at least a round from every node", v)
		}
		// gpusched's own series follow Prometheus' naming conventions.
		var own []*dto.MetricFamily
		for name, fam := range fams {
			if strings.HasPrefix(name, "gpusched_") {
				own = append(own, fam)
			}
		}
		problems, err := promlint.NewWithMetricFamilies(own).Lint()
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			t.Errorf("promlint: %s: %s", p.Metric, p.Text)
		}
	})

	t.Run("NoPprofWithoutTheFlag", func(t *testing.T) {
		if code, _ := get(t, addr, metrics.PprofPath); code != http.StatusNotFound {
			t.Errorf("GET %s without Pprof: %d, want 404", metrics.PprofPath, code)
		}
	})

	t.Run("Dashboard", func(t *testing.T) {
		names := dashboardMetrics(t)
		if len(names) < 10 {
			t.Fatalf("dashboard queries %d metrics: %v; the extractor is broken", len(names), names)
		}
		for _, n := range names {
			if !scraped(fams, n) {
				t.Errorf("dashboard queries %s, which /metrics does not export", n)
			}
		}
	})
}

// scraped reports whether a series name exists in fams: a family, or a
// histogram's _bucket, _sum or _count.
func scraped(fams map[string]*dto.MetricFamily, name string) bool {
	if f := fams[name]; f != nil && len(f.GetMetric()) > 0 {
		return true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok {
			if f := fams[base]; f != nil && (f.GetType() == dto.MetricType_HISTOGRAM || f.GetType() == dto.MetricType_SUMMARY) {
				return true
			}
		}
	}
	return false
}

// dashboard is the part of a Grafana dashboard that holds queries.
type dashboard struct {
	Panels []struct {
		Title   string
		Targets []struct{ Expr string }
		Panels  []json.RawMessage
	}
	Templating struct {
		List []struct {
			Name  string
			Type  string
			Query json.RawMessage
		}
	}
}

// dashboardMetrics returns every metric name the dashboard's PromQL and
// its template variables' label_values queries mention, sorted.
func dashboardMetrics(t *testing.T) []string {
	t.Helper()
	raw, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw), "${DS_PROMETHEUS}") {
		t.Errorf("%s does not use the ${DS_PROMETHEUS} data source variable", dashboardPath)
	}
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	set := map[string]bool{}
	for _, p := range d.Panels {
		if len(p.Panels) > 0 {
			t.Errorf("panel %q nests panels: flatten it so this test sees its queries", p.Title)
		}
		for _, tg := range p.Targets {
			for _, n := range promqlMetrics(tg.Expr) {
				set[n] = true
			}
		}
	}
	labelValues := regexp.MustCompile(`label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)`)
	for _, v := range d.Templating.List {
		for _, m := range labelValues.FindAllStringSubmatch(string(v.Query), -1) {
			set[m[1]] = true
		}
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

var (
	promqlStrings   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|` + "`[^`]*`")
	promqlMatchers  = regexp.MustCompile(`\{[^}]*\}`)
	promqlRanges    = regexp.MustCompile(`\[[^\]]*\]`)
	promqlGrouping  = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promqlIdent     = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	promqlFuncCall  = regexp.MustCompile(`^\s*\(`)
	promqlKeywords  = []string{"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "atan2", "inf", "nan", "Inf", "NaN"}
	promqlIsNumeric = regexp.MustCompile(`^[0-9]`)
)

// promqlMetrics extracts metric names from a PromQL expression: the
// identifiers left once strings, label matchers, ranges and grouping
// clauses are removed, that are not function calls or keywords.
func promqlMetrics(expr string) []string {
	e := promqlStrings.ReplaceAllString(expr, `""`)
	e = promqlMatchers.ReplaceAllString(e, " ")
	e = promqlRanges.ReplaceAllString(e, " ")
	e = promqlGrouping.ReplaceAllString(e, " ")
	var out []string
	for _, loc := range promqlIdent.FindAllStringIndex(e, -1) {
		id := e[loc[0]:loc[1]]
		if slices.Contains(promqlKeywords, id) || promqlIsNumeric.MatchString(id) || promqlFuncCall.MatchString(e[loc[1]:]) {
			continue
		}
		if loc[0] > 0 && (e[loc[0]-1] == '$' || (e[loc[0]-1] >= '0' && e[loc[0]-1] <= '9') || e[loc[0]-1] == '.') {
			continue // a variable ($node) or part of a number (1e3)
		}
		out = append(out, id)
	}
	return out
}

func TestPromQLMetrics(t *testing.T) {
	for expr, want := range map[string][]string{
		`histogram_quantile(0.99, sum by (le) (rate(gpusched_schedule_cycle_duration_seconds_bucket[$__rate_interval])))`: {"gpusched_schedule_cycle_duration_seconds_bucket"},
		`avg by (tenant, job) (DCGM_FI_DEV_GPU_UTIL{tenant!="", node=~"$node"})`:                                          {"DCGM_FI_DEV_GPU_UTIL"},
		`DCGM_FI_DEV_XID_ERRORS{node=~"$node"} > 0 and on (UUID) DCGM_FI_DEV_GPU_TEMP`:                                    {"DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_GPU_TEMP"},
		`max(gpusched_fencing_token) / 1e3 offset 5m`:                                                                     {"gpusched_fencing_token"},
	} {
		if got := promqlMetrics(expr); !slices.Equal(got, want) {
			t.Errorf("promqlMetrics(%s) = %v, want %v", expr, got, want)
		}
	}
}

// TestHealthReflectionAndPprof checks what grpcurl and a profiler see on a
// dev cluster started with pprof: the gRPC health checking protocol,
// server reflection listing every service, and /debug/pprof/.
func TestHealthReflectionAndPprof(t *testing.T) {
	c, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: 1, MetricsListen: "127.0.0.1:0", Pprof: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if code, body := get(t, c.MetricsAddr(), metrics.PprofPath); code != http.StatusOK || !strings.Contains(body, "goroutine") {
		t.Errorf("GET %s with Pprof: %d %.200s", metrics.PprofPath, code, body)
	}
	if code, _ := get(t, c.MetricsAddr(), metrics.PprofPath+"cmdline"); code != http.StatusOK {
		t.Errorf("GET %scmdline with Pprof: %d", metrics.PprofPath, code)
	}

	conn, err := grpc.NewClient(c.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	hc := healthpb.NewHealthClient(conn)
	for _, svc := range []string{"", "gpusched.v1.JobService", "gpusched.v1.NodeService", "gpusched.v1.AgentService"} {
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health Check(%q): %v, %v; want SERVING", svc, resp.GetStatus(), err)
		}
	}
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "no.such.Service"}); err == nil {
		t.Error("health Check of an unknown service succeeded, want NotFound")
	}

	// What `grpcurl -plaintext ADDR list` and `describe` do.
	rc := reflectionpb.NewServerReflectionClient(conn)
	stream, err := rc.ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var services []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		services = append(services, s.GetName())
	}
	for _, want := range []string{"gpusched.v1.JobService", "gpusched.v1.NodeService", "gpusched.v1.ClusterService",
		"gpusched.v1.TelemetryService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} {
		if !slices.Contains(services, want) {
			t.Errorf("reflection lists %v, want %s among them", services, want)
		}
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{
		FileContainingSymbol: "gpusched.v1.JobService"}}); err != nil {
		t.Fatal(err)
	}
	resp, err = stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
		t.Errorf("reflection: no file descriptor for gpusched.v1.JobService: %v", resp.GetErrorResponse())
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		t.Errorf("reflection stream after CloseSend: %v, want EOF", err)
	}
}

func TestPprofNeedsMetricsListen(t *testing.T) {
	_, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: 1, Pprof: true})
	if !errors.Is(err, devcluster.ErrConfig) {
		t.Errorf("Start with Pprof and no MetricsListen: %v, want ErrConfig", err)
	}
}
