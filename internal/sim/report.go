package sim

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
)

// Report is everything one run measured.
type Report struct {
	Machine Machine       `json:"machine"`
	Config  ConfigSummary `json:"config"`
	Setup   SetupReport   `json:"setup"`
	Open    *PhaseReport  `json:"open,omitempty"`
	Backlog *PhaseReport  `json:"backlog,omitempty"`
	// Burst is the backlog phase's first step: one-node jobs placed onto
	// idle nodes with the backlog queued behind them.
	Burst     *PhaseReport    `json:"burst,omitempty"`
	Scheduler SchedulerReport `json:"scheduler"`
	Etcd      EtcdReport      `json:"etcd"`
	// ColdStart is with every agent retrying meanwhile (as real agents
	// do); ColdStartQuiet with the agents held back until it serves.
	ColdStart      *ColdStartReport `json:"cold_start,omitempty"`
	ColdStartQuiet *ColdStartReport `json:"cold_start_quiet,omitempty"`
	Ceiling        []CeilingResult  `json:"etcd_ceiling,omitempty"`
	// PlacementsOfCeiling is backlog placements/s over the 1-client
	// ceiling in keys/s (a placement writes two keys, job and lease, in the
	// same transaction; the engine commits from one client, serially).
	PlacementsOfCeiling float64 `json:"placements_of_ceiling,omitempty"`
	// KeysPerPlacement is what the scheduler wrote to etcd per placement
	// while draining the backlog (placement, RUNNING, end: job and lease
	// records, plus the writer record per txn).
	KeysPerPlacement float64 `json:"keys_per_placement,omitempty"`
	// SchedulerOfCeiling is the scheduler's keys/s while draining over the
	// 1-client ceiling: how close its commits came to what etcd can take.
	SchedulerOfCeiling float64 `json:"scheduler_keys_of_ceiling,omitempty"`
	// BurstOfCeiling is burst placements/s over the 1-client ceiling.
	BurstOfCeiling float64           `json:"burst_placements_of_ceiling,omitempty"`
	Fleet          FleetCounts       `json:"fleet"`
	Verify         *VerifyReport     `json:"verify,omitempty"`
	Invariants     *InvariantsReport `json:"invariants,omitempty"`
	Targets        []Target          `json:"targets"`
}

// ConfigSummary is the run's shape.
type ConfigSummary struct {
	Nodes          int     `json:"nodes"`
	GPUsPerNode    int     `json:"gpus_per_node"`
	GPUModel       string  `json:"gpu_model"`
	AgentsPerConn  int     `json:"agents_per_conn"`
	TelemetryHz    float64 `json:"telemetry_hz"`
	Scheduler      string  `json:"scheduler"`
	EtcdEmbedded   bool    `json:"etcd_embedded"`
	EtcdFsync      bool    `json:"etcd_fsync"`
	Mix            string  `json:"mix"`
	MeanNodes      float64 `json:"mean_nodes_per_job"`
	Tenants        int     `json:"tenants"`
	OpenRate       float64 `json:"open_rate"`
	OpenDuration   string  `json:"open_duration"`
	OpenBatch      int     `json:"open_batch"`
	OpenRun        string  `json:"open_run"`
	BacklogJobs    int     `json:"backlog_jobs"`
	BacklogBatch   int     `json:"backlog_batch"`
	BacklogRun     string  `json:"backlog_run"`
	HeartbeatEvery string  `json:"heartbeat_interval"`
}

func summarizeConfig(c Config) ConfigSummary {
	mode := "in-process"
	if c.SchedulerProcess {
		mode = "child process"
	}
	return ConfigSummary{
		Nodes: c.Nodes, GPUsPerNode: 8, GPUModel: c.GPUModel, AgentsPerConn: c.AgentsPerConn, TelemetryHz: c.TelemetryHz,
		Scheduler: mode, EtcdEmbedded: len(c.EtcdEndpoints) == 0, EtcdFsync: len(c.EtcdEndpoints) > 0 || !c.EtcdNoFsync,
		Mix: FormatMix(c.Mix), MeanNodes: meanNodes(c.Mix), Tenants: c.Tenants,
		OpenRate: c.OpenRate, OpenDuration: c.OpenDuration.String(), OpenBatch: c.OpenBatch,
		OpenRun:     c.OpenMinRun.String() + "-" + c.OpenMaxRun.String(),
		BacklogJobs: c.BacklogJobs, BacklogBatch: c.BacklogBatch,
		BacklogRun:     c.BacklogMinRun.String() + "-" + c.BacklogMaxRun.String(),
		HeartbeatEvery: c.HeartbeatInterval.String(),
	}
}

// SetupReport times the start.
type SetupReport struct {
	SchedulerStart    Millis `json:"scheduler_start_ms"`
	AllAgentsWelcomed Millis `json:"all_agents_welcomed_ms"`
}

// PhaseReport is one phase's figures.
type PhaseReport struct {
	Load LoadResult `json:"load"`
	// Placed leases (a job's placement) and the nodes they hold, as the
	// hollow agents received their StartLease (sent only after commit).
	Placed      int64 `json:"placed"`
	NodesPlaced int64 `json:"nodes_placed"`
	// PlacementSeconds: first to last placement (open), resume to last
	// placement (backlog).
	PlacementSeconds     float64 `json:"placement_seconds"`
	PlacementsPerSec     float64 `json:"placements_per_sec"`
	PeakPlacementsPerSec float64 `json:"peak_1s_placements_per_sec"`
	// Latency is submit (the open-loop due time) → StartLease at the last
	// node of the job.
	Latency   Percentiles  `json:"submit_to_start_lease"`
	Scheduler ReplicaStats `json:"scheduler"`
	Wall      Millis       `json:"wall_ms"`
	// SchedulerCPU is the child replica's CPU over the phase (0 in
	// process); SimCPU this process's: agents, etcd, load generator.
	SchedulerCPU float64 `json:"scheduler_cpu_seconds"`
	SimCPU       float64 `json:"sim_cpu_seconds"`
	// Backlog only: the scheduler while the jobs were being queued.
	Queued            *ReplicaStats `json:"queued,omitempty"`
	QueueSchedulerCPU float64       `json:"queue_scheduler_cpu_seconds,omitempty"`
	QueueSimCPU       float64       `json:"queue_sim_cpu_seconds,omitempty"`
}

// SchedulerReport is the scheduler process over the whole run.
type SchedulerReport struct {
	Mode         string       `json:"mode"`
	PeakRSSBytes uint64       `json:"peak_rss_bytes"`
	End          ReplicaStats `json:"end"`
}

// EtcdReport is etcd after the phases.
type EtcdReport struct {
	Endpoints        []string `json:"endpoints"`
	Embedded         bool     `json:"embedded"`
	Fsync            bool     `json:"fsync"`
	DBSizeBytes      int64    `json:"db_size_bytes"`
	DBSizeInUseBytes int64    `json:"db_size_in_use_bytes"`
	Keys             int64    `json:"keys"`
	Revision         int64    `json:"revision"`
}

// ColdStartReport times a fresh leader.
type ColdStartReport struct {
	// AgentsRetrying: every agent kept reconnecting meanwhile; otherwise
	// they were held back until the replica served.
	AgentsRetrying bool `json:"agents_retrying"`
	// Stop is the old leader's graceful shutdown (it resigns at once).
	Stop Millis `json:"stop_ms"`
	// ToServe: start of the fresh replica → it answers a leader-only read
	// (process start, etcd session, election, state rebuilt from etcd).
	ToServe Millis `json:"to_serve_ms"`
	// Load is the engine's own account of rebuilding from etcd.
	Load LoadInfo `json:"load"`
	// AllAgentsBack: start of the fresh replica → every agent welcomed.
	AllAgentsBack Millis `json:"all_agents_back_ms"`
	RSSBytes      uint64 `json:"rss_bytes_after_load"`
}

// VerifyReport counts every job by state once all have ended.
type VerifyReport struct {
	Jobs         int            `json:"jobs"`
	States       map[string]int `json:"states"`
	NotSucceeded []string       `json:"not_succeeded,omitempty"`
}

// InvariantsReport is internal/invariants' replay of etcd's history.
type InvariantsReport struct {
	Revisions    int64    `json:"revisions"`
	Transactions int64    `json:"transactions"`
	Jobs         int      `json:"jobs"`
	Leases       int      `json:"leases"`
	Violations   []string `json:"violations,omitempty"`
}

// Target is one goal of issue 8 with what was measured.
type Target struct {
	Name     string `json:"name"`
	Goal     string `json:"goal"`
	Measured string `json:"measured"`
	Met      bool   `json:"met"`
	Note     string `json:"note,omitempty"`
}

// writeTargets prints the targets table after a blank line.
func writeTargets(w io.Writer, targets []Target) {
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "target\tgoal\tmeasured\tmet")
	for _, t := range targets {
		met := "no"
		if t.Met {
			met = "yes"
		}
		if t.Note != "" {
			met += " (" + t.Note + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", t.Name, t.Goal, t.Measured, met)
	}
	_ = tw.Flush()
}

// finish derives the ratios and checks the targets.
func (r *Report) finish() {
	r.Machine.LoadAvgEnd = loadAvg()
	var one float64
	for _, c := range r.Ceiling {
		if c.Clients == 1 {
			one = c.KeysPerSec
		}
	}
	if b := r.Backlog; b != nil {
		if b.Placed > 0 {
			r.KeysPerPlacement = float64(b.Scheduler.Commit.Ops) / float64(b.Placed)
		}
		if one > 0 {
			r.PlacementsOfCeiling = b.PlacementsPerSec / one
			r.SchedulerOfCeiling = b.Scheduler.Commit.KeysPerSec / one
		}
	}
	if u := r.Burst; u != nil && one > 0 {
		r.BurstOfCeiling = u.PlacementsPerSec / one
	}
	c := r.Config
	inproc := ""
	if c.Scheduler == "in-process" {
		inproc = "in-process: RSS of the whole sim, agents and etcd included"
	}
	if b := r.Backlog; b != nil {
		r.Targets = append(r.Targets, Target{
			Name: "scale", Goal: "10,000 nodes with 100,000 queued jobs",
			Measured: fmt.Sprintf("%d nodes, %d jobs queued", c.Nodes, b.Load.Accepted),
			Met:      c.Nodes >= 10000 && b.Load.Accepted >= 100000,
		})
		t := Target{
			Name: "placements", Goal: ">= 10,000 placements/s committed",
			Measured: fmt.Sprintf("backlog drain %.0f/s (peak 1 s %.0f/s), bound by job turnover", b.PlacementsPerSec, b.PeakPlacementsPerSec),
			Met:      b.PlacementsPerSec >= 10000,
		}
		if u := r.Burst; u != nil {
			// With free nodes, as the anchors measure; the drain figure
			// stays in the report and is what job turnover allows.
			t.Measured = fmt.Sprintf("%.0f/s onto free nodes (%d one-node jobs, %d queued behind); ", u.PlacementsPerSec, u.Placed, b.Load.Accepted) + t.Measured
			t.Met = u.PlacementsPerSec >= 10000
		}
		r.Targets = append(r.Targets, t)
	}
	if o := r.Open; o != nil {
		achieved := o.Load.AcceptedPerSec
		r.Targets = append(r.Targets, Target{
			Name: "latency", Goal: "p99 submit → agent <= 50 ms at 2,000 submissions/s",
			Measured: fmt.Sprintf("p99 %s at %.0f/s accepted", o.Latency.P99, achieved),
			Met:      float64(o.Latency.P99) <= 50 && achieved >= 0.98*2000 && o.Latency.N > 0,
		})
	}
	r.Targets = append(r.Targets, Target{
		Name: "rss", Goal: "scheduler RSS <= 2 GiB", Measured: "peak " + mib(r.Scheduler.PeakRSSBytes),
		Met: r.Scheduler.PeakRSSBytes > 0 && r.Scheduler.PeakRSSBytes <= 2<<30, Note: inproc,
	})
	if cs := r.ColdStart; cs != nil {
		m := fmt.Sprintf("%s with agents retrying (%d jobs, %d nodes loaded)", cs.ToServe, cs.Load.Jobs, cs.Load.Nodes)
		if q := r.ColdStartQuiet; q != nil {
			m += fmt.Sprintf("; %s with agents held back", q.ToServe)
		}
		r.Targets = append(r.Targets, Target{
			Name: "cold start", Goal: "leader cold start <= 10 s", Measured: m,
			Met: float64(cs.ToServe) <= 10000,
		})
	}
}

// WriteText renders the report as tables.
func (r *Report) WriteText(w io.Writer) {
	m, c := r.Machine, r.Config
	fmt.Fprintf(w, "machine: %d CPUs (%s), %s RAM, %s, %s, load %s → %s\n", m.CPUs, m.CPUModel, mib(m.MemBytes), m.OS, m.Go, m.LoadAvg, m.LoadAvgEnd)
	etcd := "external (its own fsync setting)"
	if c.EtcdEmbedded {
		etcd = fmt.Sprintf("embedded, fsync %v", c.EtcdFsync)
	}
	fmt.Fprintf(w, "cluster: %d hollow nodes × %d %s (%d per gRPC connection, telemetry %g Hz); scheduler %s; etcd %s\n",
		c.Nodes, c.GPUsPerNode, c.GPUModel, c.AgentsPerConn, c.TelemetryHz, c.Scheduler, etcd)
	fmt.Fprintf(w, "jobs: mix %s (mean %.2f nodes), %d tenants\n\n", c.Mix, c.MeanNodes, c.Tenants)

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(cells ...string) { fmt.Fprintln(tw, strings.Join(cells, "\t")) }
	row("metric", "value", "detail")
	row("start: all agents welcomed", r.Setup.AllAgentsWelcomed.String(), fmt.Sprintf("scheduler start %s", r.Setup.SchedulerStart))
	if o := r.Open; o != nil {
		row("open: accepted submissions/s", fmt.Sprintf("%.0f", o.Load.AcceptedPerSec),
			fmt.Sprintf("%d of %d at %.0f/s target, %d per call; call %s", o.Load.Accepted, o.Load.Submitted, c.OpenRate, c.OpenBatch, o.Load.Call))
		row("open: placements/s", fmt.Sprintf("%.0f", o.PlacementsPerSec), fmt.Sprintf("%d placed, peak 1 s %.0f/s", o.Placed, o.PeakPlacementsPerSec))
		row("open: submit → StartLease p50", o.Latency.P50.String(), "")
		row("open: submit → StartLease p99", o.Latency.P99.String(), "")
		row("open: submit → StartLease p99.9", o.Latency.P999.String(), fmt.Sprintf("max %s, n=%d", o.Latency.Max, o.Latency.N))
		es := o.Scheduler.Engine
		row("open: in the scheduler p50/p99", es.SubmitRPC.P50.String()+" / "+es.SubmitRPC.P99.String(),
			fmt.Sprintf("SubmitJob as its server timed it; created → lease granted %s / %s", es.SubmitToLease.P50, es.SubmitToLease.P99))
		row("open: placement cycle p50/p99", o.Scheduler.Engine.Cycle.P50.String()+" / "+o.Scheduler.Engine.Cycle.P99.String(),
			fmt.Sprintf("%d cycles, %.0f%% of the time", o.Scheduler.Engine.Cycle.N, 100*o.Scheduler.Engine.CycleBusy))
		row("open: loop turn p50/p99", o.Scheduler.Commit.Turn.P50.String()+" / "+o.Scheduler.Commit.Turn.P99.String(),
			fmt.Sprintf("commit p50/p99 %s / %s, %d commits, etcd %.0f%% of the time", o.Scheduler.Commit.Commit.P50, o.Scheduler.Commit.Commit.P99, o.Scheduler.Commit.Commits, 100*o.Scheduler.Commit.BusyFraction))
		row("open: CPU s scheduler / sim", fmt.Sprintf("%.1f / %.1f", o.SchedulerCPU, o.SimCPU), fmt.Sprintf("over %s wall", o.Wall))
	}
	if b := r.Backlog; b != nil {
		row("backlog: accepted submissions/s", fmt.Sprintf("%.0f", b.Load.AcceptedPerSec),
			fmt.Sprintf("%d queued, %d per SubmitBatch; call %s", b.Load.Accepted, c.BacklogBatch, b.Load.Call))
		if q := b.Queued; q != nil {
			row("backlog: queueing: placement cycle p50/p99", q.Engine.Cycle.P50.String()+" / "+q.Engine.Cycle.P99.String(),
				fmt.Sprintf("loop turn p50/p99 %s / %s; CPU s scheduler/sim %.1f / %.1f", q.Commit.Turn.P50, q.Commit.Turn.P99, b.QueueSchedulerCPU, b.QueueSimCPU))
			row("backlog: scheduler RSS, jobs queued", mib(q.RSSBytes), fmt.Sprintf("Go heap objects %s, %d goroutines", mib(q.HeapBytes), q.Goroutines))
		}
		if u := r.Burst; u != nil {
			cs, es := u.Scheduler.Commit, u.Scheduler.Engine
			row("burst: committed placements/s", fmt.Sprintf("%.0f", u.PlacementsPerSec),
				fmt.Sprintf("%d one-node jobs onto idle nodes in %.2f s, %d queued behind them", u.Placed, u.PlacementSeconds, b.Load.Accepted))
			row("burst: placement cycle p50/max", es.Cycle.P50.String()+" / "+es.Cycle.Max.String(),
				fmt.Sprintf("%d cycles; commit p50/max %s / %s; %.0f keys/s, %d txns", es.Cycle.N, cs.Commit.P50, cs.Commit.Max, cs.KeysPerSec, cs.Txns))
		}
		row("backlog: committed placements/s", fmt.Sprintf("%.0f", b.PlacementsPerSec),
			fmt.Sprintf("%d in %.1f s, peak 1 s %.0f/s, %.0f nodes/s", b.Placed, b.PlacementSeconds, b.PeakPlacementsPerSec, float64(b.NodesPlaced)/max(b.PlacementSeconds, 1e-9)))
		cs, es := b.Scheduler.Commit, b.Scheduler.Engine
		row("backlog: placement cycle p50/p99", es.Cycle.P50.String()+" / "+es.Cycle.P99.String(),
			fmt.Sprintf("%d cycles, %.0f%% of the time", es.Cycle.N, 100*es.CycleBusy))
		row("backlog: loop turn p50/p99", cs.Turn.P50.String()+" / "+cs.Turn.P99.String(),
			fmt.Sprintf("outside etcd p50/p99 %s / %s; commit p50/p99 %s / %s", cs.Outside.P50, cs.Outside.P99, cs.Commit.P50, cs.Commit.P99))
		row("backlog: scheduler etcd writes", fmt.Sprintf("%.0f keys/s", cs.KeysPerSec),
			fmt.Sprintf("%d txns, %.0f ops/txn, txn p50/p99 %s / %s, etcd busy %.0f%% of the loop", cs.Txns, cs.OpsPerTxn, cs.Txn.P50, cs.Txn.P99, 100*cs.BusyFraction))
		row("backlog: CPU s scheduler / sim", fmt.Sprintf("%.1f / %.1f", b.SchedulerCPU, b.SimCPU), fmt.Sprintf("over %s wall", b.Wall))
	}
	row("scheduler peak RSS", mib(r.Scheduler.PeakRSSBytes), r.Scheduler.Mode)
	row("etcd DB size", mib(uint64(r.Etcd.DBSizeBytes)), fmt.Sprintf("%s in use, %d keys, revision %d", mib(uint64(r.Etcd.DBSizeInUseBytes)), r.Etcd.Keys, r.Etcd.Revision))
	for _, cs := range []*ColdStartReport{r.ColdStartQuiet, r.ColdStart} {
		if cs == nil {
			continue
		}
		how := "agents held back"
		if cs.AgentsRetrying {
			how = "agents retrying"
		}
		row("leader cold start, "+how, cs.ToServe.String(), fmt.Sprintf("engine load %s (%d jobs, %d nodes, %d leases); old leader stop %s", cs.Load.Took, cs.Load.Jobs, cs.Load.Nodes, cs.Load.Leases, cs.Stop))
		row("  then all agents back", cs.AllAgentsBack.String(), fmt.Sprintf("from the fresh replica's start; RSS after load %s", mib(cs.RSSBytes)))
	}
	for _, x := range r.Ceiling {
		row(fmt.Sprintf("etcd ceiling, %d client(s)", x.Clients), fmt.Sprintf("%.0f keys/s", x.KeysPerSec),
			fmt.Sprintf("%d puts/txn of %d B, txn p50/p99 %s / %s", x.OpsPerTxn, x.ValueBytes, x.Txn.P50, x.Txn.P99))
	}
	if r.PlacementsOfCeiling > 0 {
		if r.BurstOfCeiling > 0 {
			row("burst placements/s ÷ 1-client ceiling keys/s", fmt.Sprintf("%.3f", r.BurstOfCeiling),
				"a burst placement writes 2 keys (job and lease) in one transaction, plus the writer record per transaction")
		}
		row("placements/s ÷ 1-client ceiling keys/s", fmt.Sprintf("%.3f", r.PlacementsOfCeiling),
			fmt.Sprintf("%.1f keys written per placement; scheduler keys/s = %.0f%% of the ceiling", r.KeysPerPlacement, 100*r.SchedulerOfCeiling))
	}
	f := r.Fleet
	row("agents: violations", fmt.Sprint(f.Violations), fmt.Sprintf("%d StartLease, %d exits, %d releases (+%d of leases not held), %d streams opened, %d stale-token commands", f.Starts, f.Exits, f.Releases, f.Unknown, f.Sessions, f.Refused))
	if v := r.Verify; v != nil {
		keys := make([]string, 0, len(v.States))
		for k := range v.States {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var parts []string
		for _, k := range keys {
			parts = append(parts, fmt.Sprintf("%s %d", k, v.States[k]))
		}
		row("jobs at the end", fmt.Sprint(v.Jobs), strings.Join(parts, ", "))
	}
	if iv := r.Invariants; iv != nil {
		row("invariants (etcd history)", fmt.Sprintf("%d violations", len(iv.Violations)), fmt.Sprintf("%d revisions, %d txns, %d jobs, %d leases", iv.Revisions, iv.Transactions, iv.Jobs, iv.Leases))
	}
	_ = tw.Flush()
	writeTargets(w, r.Targets)
	for _, ex := range f.Examples {
		fmt.Fprintln(w, "violation:", ex)
	}
}
