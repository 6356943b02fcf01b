package metrics_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/zap"

	"github.com/gpusched/gpusched/client"
	"github.com/gpusched/gpusched/internal/devcluster"
	"github.com/gpusched/gpusched/internal/metrics"
	"github.com/gpusched/gpusched/nodeagent"
	"github.com/gpusched/gpusched/nodeagent/gpu"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: time.Minute}).Get(url + metrics.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %.300s", resp.StatusCode, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
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

// TestAgentMetrics runs one more agent, on a simulated DGX H100, beside a
// one-node dev cluster, gives it half of a two-node job, and reads its own
// /metrics: its eight GPUs under dcgm-exporter's names, labelled with the
// job, and the agent connected.
func TestAgentMetrics(t *testing.T) {
	c, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	const node = "extra-01"
	b, err := gpu.OpenMock(gpu.BackendMockDGXH100, gpu.MockOptions{NodeName: node})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	a, err := nodeagent.New(nodeagent.Config{NodeID: node, Servers: []string{c.Endpoint}, NVML: b.NVML, Mock: b.Mock,
		DataDir: t.TempDir(), Address: "127.0.0.1", StopGrace: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- a.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-ran; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("agent: %v", err)
		}
	}()
	srv := httptest.NewServer(metrics.Handler(metrics.ServerConfig{Gatherer: metrics.NewAgentRegistry(a, 0)}))
	defer srv.Close()

	cl, err := client.New(context.Background(), client.Config{Endpoints: []string{c.Endpoint}})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var job *pb.Job
	for deadline := time.Now().Add(2 * time.Minute); ; {
		sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
		job, err = cl.Submit(sctx, &pb.JobSpec{Nodes: 2, Command: []string{"sleep", "300"}})
		scancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) || !errors.Is(err, client.ErrUnavailable) {
			t.Fatalf("submit: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer func() {
		cctx, ccancel := context.WithTimeout(context.Background(), time.Minute)
		defer ccancel()
		_, _ = cl.Cancel(cctx, job.GetId(), "test over")
	}()

	var fams map[string]*dto.MetricFamily
	for deadline := time.Now().Add(3 * time.Minute); ; {
		fams = scrape(t, srv.URL)
		util := fams["DCGM_FI_DEV_GPU_UTIL"].GetMetric()
		connected := fams["gpusched_agent_connected"].GetMetric()
		leased := len(util) > 0
		for _, m := range util {
			leased = leased && labelsOf(m)["job"] == job.GetId()
		}
		if len(util) == 8 && leased && len(connected) == 1 && connected[0].GetGauge().GetValue() == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent metrics never showed 8 GPUs of job %s and a connected agent: %d GPU series (leased %v), connected %v",
				job.GetId(), len(util), leased, connected)
		}
		time.Sleep(200 * time.Millisecond)
	}
	inv := a.Inventory()
	for _, name := range metrics.DCGMNames() {
		if got := len(fams[name].GetMetric()); got != 8 {
			t.Errorf("%s: %d series, want 8", name, got)
		}
	}
	for _, m := range fams["DCGM_FI_DEV_GPU_UTIL"].GetMetric() {
		l := labelsOf(m)
		var g *gpu.GPU
		for i := range inv.GPUs {
			if inv.GPUs[i].UUID == l["UUID"] {
				g = &inv.GPUs[i]
			}
		}
		if g == nil {
			t.Errorf("series %v: UUID not in the node's inventory", l)
			continue
		}
		if l["modelName"] != g.Name || l["pci_bus_id"] != g.PCIBusID || l["device"] != "nvidia"+l["gpu"] ||
			l["node"] != node || l["Hostname"] != a.Hostname() || l["tenant"] != "" {
			t.Errorf("series %v: want modelName %q, pci_bus_id %q, device nvidia<gpu>, node %s, Hostname %s, no tenant",
				l, g.Name, g.PCIBusID, node, a.Hostname())
		}
	}
	if fams["go_goroutines"] == nil {
		t.Error("no Go runtime metrics")
	}
}
