package metrics

import (
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"

	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/telemetry"
)

// Job and node states, in lifecycle order: every one is exported, at 0
// when no job or node is in it, so dashboards see a steady set of series.
var (
	jobStates  = []model.JobState{model.JobPending, model.JobScheduled, model.JobRunning, model.JobSucceeded, model.JobFailed, model.JobCancelled, model.JobTimedOut}
	nodeStates = []model.NodeState{model.NodeReady, model.NodeLeased, model.NodeCleaning, model.NodeDraining, model.NodeDrained, model.NodeUnhealthy, model.NodeLost}
)

// stateLabel is a state's label value: its API name in lower case
// ("succeeded", "timed_out").
func stateLabel(s interface{ String() string }) string { return strings.ToLower(s.String()) }

// SchedulerConfig configures a replica's metrics.
type SchedulerConfig struct {
	// Leader returns the engine of the current term, or an error when this
	// replica does not lead. Required. Leader-only series (jobs, nodes,
	// leases, agents, GPUs) are exported only by the leader.
	Leader func() (*engine.Engine, error)
	// Telemetry is the replica's telemetry hub: the GPU series are its
	// newest sample per GPU. Nil: no GPU series.
	Telemetry *telemetry.Hub
	// StaleAfter drops GPUs whose newest sample is older. Default
	// DefaultStaleAfter.
	StaleAfter time.Duration
}

// Scheduler holds one replica's metrics: a private registry with the GPU
// series, the replica's gauges (read at scrape time) and the histograms
// and counters the engine and the gRPC interceptors feed. It implements
// engine.Observer and api.RPCObserver.
type Scheduler struct {
	cfg SchedulerConfig
	reg *prometheus.Registry

	scheduleCycle    prometheus.Histogram
	submitToLease    prometheus.Histogram
	commit           prometheus.Histogram
	requests         *prometheus.CounterVec
	requestDuration  *prometheus.HistogramVec
	telemetrySamples prometheus.Counter
	telemetryDropped prometheus.Counter
}

// NewScheduler returns a replica's metrics in a registry of their own,
// with the Go runtime and process collectors.
func NewScheduler(cfg SchedulerConfig) *Scheduler {
	m := &Scheduler{
		cfg: cfg,
		reg: NewRegistry(),
		scheduleCycle: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "gpusched_schedule_cycle_duration_seconds",
			Help:    "Wall time of one placement cycle of the leader's loop.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16), // 100µs .. 3.3s
		}),
		submitToLease: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "gpusched_submit_to_lease_seconds",
			Help:    "Time from a job's creation to its first lease.",
			Buckets: []float64{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400},
		}),
		commit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "gpusched_commit_duration_seconds",
			Help:    "Wall time of one fenced batch commit to etcd.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 15), // 0.5ms .. 8.2s
		}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gpusched_api_requests_total",
			Help: "gRPC requests this replica handled, by full method name and status code.",
		}, []string{"method", "code"}),
		requestDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "gpusched_api_request_duration_seconds",
			Help:    "Time this replica took to handle a gRPC request (a stream: its whole life), by full method name.",
			Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"method"}),
		telemetrySamples: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "gpusched_telemetry_samples_total",
			Help: "GPU telemetry samples received from node agents.",
		}),
		telemetryDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "gpusched_telemetry_dropped_total",
			Help: "GPU telemetry samples telemetry watchers of this replica missed because they read too slowly.",
		}),
	}
	m.reg.MustRegister(m.scheduleCycle, m.submitToLease, m.commit, m.requests, m.requestDuration,
		m.telemetrySamples, m.telemetryDropped, &replicaCollector{cfg: cfg})
	if cfg.Telemetry != nil {
		m.reg.MustRegister(NewGPUCollector(func() []GPUReading { return schedulerGPUs(cfg) }, cfg.StaleAfter))
	}
	return m
}

// Registry is the replica's registry, for serving and for tests.
func (m *Scheduler) Registry() *prometheus.Registry { return m.reg }

// ScheduleCycle implements engine.Observer.
func (m *Scheduler) ScheduleCycle(d time.Duration) { m.scheduleCycle.Observe(d.Seconds()) }

// SubmitToLease implements engine.Observer.
func (m *Scheduler) SubmitToLease(d time.Duration) { m.submitToLease.Observe(d.Seconds()) }

// Commit implements engine.Observer.
func (m *Scheduler) Commit(d time.Duration) { m.commit.Observe(d.Seconds()) }

// RPCDone implements api.RPCObserver.
func (m *Scheduler) RPCDone(method string, code codes.Code, took time.Duration) {
	m.requests.WithLabelValues(method, code.String()).Inc()
	m.requestDuration.WithLabelValues(method).Observe(took.Seconds())
}

// TelemetryReceived implements api.RPCObserver.
func (m *Scheduler) TelemetryReceived(samples int) { m.telemetrySamples.Add(float64(samples)) }

// TelemetryDropped implements api.RPCObserver.
func (m *Scheduler) TelemetryDropped(samples uint64) { m.telemetryDropped.Add(float64(samples)) }

// replicaCollector reads the replica's gauges at scrape time.
type replicaCollector struct{ cfg SchedulerConfig }

var (
	isLeaderDesc        = prometheus.NewDesc("gpusched_is_leader", "1 when this replica leads (and has loaded its state), else 0.", nil, nil)
	fencingTokenDesc    = prometheus.NewDesc("gpusched_fencing_token", "Fencing token (election revision) of the term this replica leads; exported by the leader only.", nil, nil)
	jobsDesc            = prometheus.NewDesc("gpusched_jobs", "Jobs by current state; exported by the leader only.", []string{"state"}, nil)
	nodesDesc           = prometheus.NewDesc("gpusched_nodes", "Nodes by state; exported by the leader only.", []string{"state"}, nil)
	leasesActiveDesc    = prometheus.NewDesc("gpusched_leases_active", "Leases that have not ended; exported by the leader only.", nil, nil)
	agentsConnectedDesc = prometheus.NewDesc("gpusched_agents_connected", "Node agents holding a stream to this leader; exported by the leader only.", nil, nil)
)

// Describe implements prometheus.Collector.
func (c *replicaCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{isLeaderDesc, fencingTokenDesc, jobsDesc, nodesDesc, leasesActiveDesc, agentsConnectedDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *replicaCollector) Collect(ch chan<- prometheus.Metric) {
	eng, err := c.cfg.Leader()
	if err != nil || eng == nil {
		ch <- prometheus.MustNewConstMetric(isLeaderDesc, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(isLeaderDesc, prometheus.GaugeValue, 1)
	ch <- prometheus.MustNewConstMetric(fencingTokenDesc, prometheus.GaugeValue, float64(eng.Token()))
	st := eng.Stats()
	for _, s := range jobStates {
		ch <- prometheus.MustNewConstMetric(jobsDesc, prometheus.GaugeValue, float64(st.Jobs[s]), stateLabel(s))
	}
	for _, s := range nodeStates {
		ch <- prometheus.MustNewConstMetric(nodesDesc, prometheus.GaugeValue, float64(st.Nodes[s]), stateLabel(s))
	}
	ch <- prometheus.MustNewConstMetric(leasesActiveDesc, prometheus.GaugeValue, float64(st.ActiveLeases))
	ch <- prometheus.MustNewConstMetric(agentsConnectedDesc, prometheus.GaugeValue, float64(st.AgentsConnected))
}

// schedulerGPUs joins the hub's newest sample per GPU with the node
// inventory: only the leader exports GPUs (agents report to it alone).
func schedulerGPUs(cfg SchedulerConfig) []GPUReading {
	eng, err := cfg.Leader()
	if err != nil || eng == nil {
		return nil
	}
	nodes := map[string]*model.Node{}
	for _, n := range eng.ListNodes(nil) {
		nodes[n.ID] = n
	}
	latest := cfg.Telemetry.LatestPerGPU()
	out := make([]GPUReading, 0, len(latest))
	for _, x := range latest {
		r := GPUReading{Node: x.Node, Tenant: x.Tenant, Job: x.JobID, Time: x.Time, Sample: x.Sample}
		if n := nodes[x.Node]; n != nil {
			r.Hostname = n.Inventory.Hostname
			for _, g := range n.Inventory.GPUs {
				if g.Index == int(x.Sample.GetGpu()) {
					r.ModelName, r.PCIBusID = g.Name, g.PCIBusID
					break
				}
			}
		}
		out = append(out, r)
	}
	return out
}
