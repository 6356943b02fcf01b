package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/gpusched/gpusched/nodeagent"
)

var agentConnectedDesc = prometheus.NewDesc("gpusched_agent_connected",
	"1 while the node agent holds a stream to a scheduler, else 0.", nil, nil)

// NewAgentRegistry returns a private registry for one node agent's
// /metrics: its GPUs under dcgm-exporter's names (from its newest sampling
// round; the tenant label is empty, since agents do not know tenants),
// gpusched_agent_connected, and the Go runtime and process collectors.
func NewAgentRegistry(a *nodeagent.Agent, staleAfter time.Duration) *prometheus.Registry {
	reg := NewRegistry()
	reg.MustRegister(NewGPUCollector(func() []GPUReading { return agentGPUs(a) }, staleAfter), agentCollector{a})
	return reg
}

// agentGPUs joins the agent's newest round with its inventory.
func agentGPUs(a *nodeagent.Agent) []GPUReading {
	b := a.LatestTelemetry()
	if b == nil {
		return nil
	}
	inv := a.Inventory()
	out := make([]GPUReading, 0, len(b.GetSamples()))
	for _, s := range b.GetSamples() {
		r := GPUReading{Node: a.NodeID(), Hostname: a.Hostname(), Job: b.GetJobId(), Time: b.GetTime().AsTime(), Sample: s}
		if i := int(s.GetGpu()); i >= 0 && i < len(inv.GPUs) && inv.GPUs[i].Index == i {
			r.ModelName, r.PCIBusID = inv.GPUs[i].Name, inv.GPUs[i].PCIBusID
		}
		out = append(out, r)
	}
	return out
}

// agentCollector reads the agent's own gauges at scrape time.
type agentCollector struct{ a *nodeagent.Agent }

// Describe implements prometheus.Collector.
func (c agentCollector) Describe(ch chan<- *prometheus.Desc) { ch <- agentConnectedDesc }

// Collect implements prometheus.Collector.
func (c agentCollector) Collect(ch chan<- prometheus.Metric) {
	v := 0.0
	if c.a.Connected() {
		v = 1
	}
	ch <- prometheus.MustNewConstMetric(agentConnectedDesc, prometheus.GaugeValue, v)
}
