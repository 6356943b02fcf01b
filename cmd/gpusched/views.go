package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/gpusched/gpusched/client"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func newJobsCmd() *cobra.Command {
	var (
		output string
		states []string
		labels []string
		sel    pb.JobSelector
		follow bool
	)
	cmd := &cobra.Command{
		Use:     "jobs [JOB_ID]",
		Aliases: []string{"job"},
		Short:   "List jobs, or show one job in detail; --watch follows their changes",
		Long: `List jobs (all pages), filtered by state, queue, tenant, labels and job set,
or show one job in detail. With --watch, list and then print every state change
of the matching jobs as it is committed, one line each (with -o json: one JSON
object per line), until interrupted. Nothing is missed or repeated across
scheduler failovers.`,
		Example: `  gpusched jobs
  gpusched jobs --state pending,running
  gpusched jobs --job-set sweep-7 --label team=vision
  gpusched jobs --watch --job-set sweep-7
  gpusched jobs 42
  gpusched jobs 42 -o json`,
		Args: readArgs(&output, "job ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			w := cmd.OutOrStdout()
			if len(args) == 1 {
				if follow {
					sel.Ids = args
				} else {
					job, err := c.Get(cmd.Context(), args[0])
					if err != nil {
						return err
					}
					return printOne(w, output, job, job.GetId(), describeJob)
				}
			}
			for _, st := range splitList(states) {
				v, ok := pb.JobState_value["JOB_STATE_"+strings.ToUpper(st)]
				if !ok || v == 0 {
					return usageError("--state: unknown job state %q", st)
				}
				sel.States = append(sel.States, pb.JobState(v))
			}
			if len(labels) > 0 {
				if sel.Labels, err = parseLabels("--label", labels); err != nil {
					return err
				}
			}
			if follow {
				return watchJobs(cmd, c, &sel, output)
			}
			jobs, _, err := c.ListAll(cmd.Context(), &sel)
			if err != nil {
				return err
			}
			return printJobs(w, output, jobs)
		},
	}
	f := cmd.Flags()
	f.StringVarP(&output, "output", "o", "table", "output format: table, wide, json, yaml or name")
	f.StringSliceVar(&states, "state", nil, "only jobs in these states (pending, running, succeeded, ...)")
	f.StringSliceVar(&sel.Queues, "queue", nil, "only jobs in these queues")
	f.StringSliceVar(&sel.Tenants, "tenant", nil, "only jobs of these tenants")
	f.StringSliceVar(&labels, "label", nil, "only jobs with these labels, k=v[,k=v...]")
	f.StringVar(&sel.JobSet, "job-set", "", "only jobs of this job set")
	f.BoolVarP(&follow, "watch", "w", false, "after listing, print every state change as it happens (until interrupted)")
	return cmd
}

// printJobs renders a job list.
func printJobs(w io.Writer, output string, jobs []*pb.Job) error {
	switch {
	case structured(output):
		return printProto(w, output, &pb.ListJobsResponse{Jobs: jobs})
	case output == "name":
		for _, j := range jobs {
			if err := printNames(w, j.GetId()); err != nil {
				return err
			}
		}
		return nil
	}
	now := time.Now()
	wide := output == "wide"
	header := []string{"ID", "NAME", "TENANT", "STATE", "NODES", "GPU", "AGE"}
	if wide {
		header = append(header, "QUEUE", "PRIORITY", "JOB SET", "LEASE", "ATTEMPTS")
	}
	t := newTable(w, append(header, "NODELIST/REASON")...)
	for _, j := range jobs {
		s := j.GetSpec()
		detail := j.GetReason()
		if len(j.GetNodes()) > 0 && (j.GetState() == pb.JobState_JOB_STATE_SCHEDULED || j.GetState() == pb.JobState_JOB_STATE_RUNNING || detail == "") {
			detail = strings.Join(j.GetNodes(), ",")
		}
		row := []string{j.GetId(), orDash(s.GetName()), s.GetTenant(), stateName(j.GetState()), fmt.Sprint(s.GetNodes()),
			orDash(s.GetGpuModel()), age(j.GetCreateTime(), now)}
		if wide {
			row = append(row, orDash(s.GetQueue()), fmt.Sprint(s.GetPriority()), orDash(s.GetJobSet()), orDash(j.GetLeaseId()), fmt.Sprint(j.GetAttempts()))
		}
		t.row(append(row, orDash(detail))...)
	}
	return t.flush()
}

// watchJobs lists, then prints each later state change: a line per change
// for humans, one JSON object per line for -o json, the job ID for -o name.
func watchJobs(cmd *cobra.Command, c *client.Client, sel *pb.JobSelector, output string) error {
	if output == "yaml" {
		return usageError("--watch prints table, wide, json (one object per line) or name")
	}
	ctx, stop := signalContext(cmd.Context())
	defer stop()
	w := cmd.OutOrStdout()
	err := c.ListAndWatch(ctx, sel, func(jobs []*pb.Job) error {
		if output == "json" || output == "name" {
			return nil // a stream of changes only
		}
		return printJobs(w, output, jobs)
	}, func(ev *pb.JobEvent) error {
		switch output {
		case "json":
			b, err := protojson.Marshal(ev)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(w, "%s\n", b)
			return err
		case "name":
			return printNames(w, ev.GetJobId())
		}
		tr := ev.GetTransition()
		line := fmt.Sprintf("%s  %s  %s", tr.GetTime().AsTime().Local().Format("15:04:05.000"), ev.GetJobId(), stateName(tr.GetState()))
		if nodes := ev.GetJob().GetNodes(); tr.GetState() == pb.JobState_JOB_STATE_SCHEDULED && len(nodes) > 0 {
			line += "  " + strings.Join(nodes, ",")
		}
		if r := tr.GetReason(); r != "" {
			line += "  " + r
		}
		_, err := fmt.Fprintln(w, line)
		return err
	})
	if ctx.Err() != nil && cmd.Context().Err() == nil {
		return nil // interrupted: the normal end of a watch
	}
	return err
}

// readArgs validates the arguments of a read command: at most one name,
// and a known -o format.
func readArgs(output *string, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) > 1 {
			return usageError("%s takes at most one %s", cmd.Name(), what)
		}
		return checkOutput(*output)
	}
}

// printOne shows one object: described for humans, as the API object, or
// its name alone.
func printOne[T proto.Message](w io.Writer, output string, obj T, name string, describe func(io.Writer, T) error) error {
	switch {
	case structured(output):
		return printProto(w, output, obj)
	case output == "name":
		return printNames(w, name)
	}
	return describe(w, obj)
}

func splitList(vals []string) []string {
	var out []string
	for _, v := range vals {
		for _, s := range strings.Split(v, ",") {
			if s = strings.TrimSpace(s); s != "" {
				out = append(out, s)
			}
		}
	}
	return out
}

func describeJob(w io.Writer, j *pb.Job) error {
	s := j.GetSpec()
	t := newTable(w, "ID:", j.GetId())
	t.row("Name:", orDash(s.GetName()))
	t.row("Tenant:", s.GetTenant())
	t.row("State:", stateName(j.GetState()))
	if j.GetReason() != "" {
		label := "Reason:"
		if j.GetState() == pb.JobState_JOB_STATE_PENDING {
			label = "Why pending:"
		}
		t.row(label, j.GetReason())
	}
	req := fmt.Sprintf("%d node(s)", s.GetNodes())
	if s.GetGpuModel() != "" {
		req += ", GPU model " + s.GetGpuModel()
	}
	if s.GetGpusPerNode() > 0 {
		req += fmt.Sprintf(", at least %d GPUs/node", s.GetGpusPerNode())
	}
	if m := s.GetMinGpuMemoryBytes(); m > 0 {
		req += fmt.Sprintf(", at least %.0f GB per GPU", float64(m)/1e9)
	}
	if len(s.GetSelector()) > 0 {
		keys := make([]string, 0, len(s.GetSelector()))
		for k := range s.GetSelector() {
			keys = append(keys, k+"="+s.GetSelector()[k])
		}
		sort.Strings(keys)
		req += ", on " + strings.Join(keys, ",")
	}
	if s.GetTopology() != "" {
		req += ", " + s.GetTopology() + " (required)"
	}
	if s.GetPreferTopology() != "" {
		req += ", " + s.GetPreferTopology() + " (preferred)"
	}
	t.row("Requested:", req)
	if tl := s.GetTimeLimit(); tl != nil {
		t.row("Time limit:", tl.AsDuration().String())
	}
	t.row("Command:", shellQuote(s.GetCommand()))
	if len(s.GetEnv()) > 0 {
		keys := make([]string, 0, len(s.GetEnv()))
		for k := range s.GetEnv() {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for i, k := range keys {
			label := ""
			if i == 0 {
				label = "Env:"
			}
			t.row(label, k+"="+s.GetEnv()[k])
		}
	}
	if js := s.GetJobSet(); js != "" {
		t.row("Job set:", js)
	}
	if len(s.GetLabels()) > 0 {
		keys := make([]string, 0, len(s.GetLabels()))
		for k, v := range s.GetLabels() {
			keys = append(keys, k+"="+v)
		}
		sort.Strings(keys)
		t.row("Labels:", strings.Join(keys, ","))
	}
	t.row("Lease:", orDash(j.GetLeaseId()))
	t.row("Nodes:", orDash(strings.Join(j.GetNodes(), ",")))
	t.row("Attempts:", fmt.Sprint(j.GetAttempts()))
	for i, tr := range j.GetTransitions() {
		label := ""
		if i == 0 {
			label = "History:"
		}
		line := tr.GetTime().AsTime().Local().Format(time.RFC3339) + "  " + stateName(tr.GetState())
		if tr.GetReason() != "" {
			line += "  " + tr.GetReason()
		}
		t.row(label, line)
	}
	for _, ts := range []struct {
		label string
		v     interface{ AsTime() time.Time }
		ok    bool
	}{
		{"Created:", j.GetCreateTime(), j.GetCreateTime() != nil},
		{"Scheduled:", j.GetScheduleTime(), j.GetScheduleTime() != nil},
		{"Started:", j.GetStartTime(), j.GetStartTime() != nil},
		{"Ended:", j.GetEndTime(), j.GetEndTime() != nil},
	} {
		if ts.ok {
			t.row(ts.label, ts.v.AsTime().Local().Format(time.RFC3339))
		}
	}
	for i, x := range j.GetExits() {
		label := ""
		if i == 0 {
			label = "Exits:"
		}
		how := fmt.Sprintf("exit code %d", x.GetExitCode())
		if x.GetSignal() != "" {
			how = "killed by " + x.GetSignal()
		}
		if x.GetMessage() != "" && x.GetSignal() == "" && x.GetExitCode() != 0 {
			how += " (" + x.GetMessage() + ")"
		}
		t.row(label, fmt.Sprintf("%s rank %d: %s", x.GetNode(), x.GetRank(), how))
	}
	usageRows(t, j.GetLastLeaseSummary())
	eventRows(t, j.GetEvents())
	return t.flush()
}

// usageRows shows what a job's last ended lease used, under "Usage:".
func usageRows(t *table, u *pb.LeaseSummary) {
	if u == nil {
		return
	}
	t.row("Usage:", fmt.Sprintf("lease %s: %.2f GPU-hours, %.1f Wh", u.GetLeaseId(), u.GetGpuHours(), u.GetEnergyWh()))
	t.row("", fmt.Sprintf("GPU utilization mean %.1f%%, peak %d%%; peak memory used %.1f GiB",
		u.GetMeanGpuUtil(), u.GetPeakGpuUtil(), float64(u.GetPeakFbUsedBytes())/(1<<30)))
	t.row("", fmt.Sprintf("%d XID event(s), %d foreign GPU process event(s)", u.GetXidEvents(), u.GetForeignProcessEvents()))
	if u.GetSamples() > 0 {
		t.row("", fmt.Sprintf("from %d GPU samples, %s to %s", u.GetSamples(),
			u.GetFirstSampleTime().AsTime().Local().Format(time.RFC3339), u.GetLastSampleTime().AsTime().Local().Format(time.RFC3339)))
	} else {
		t.row("", "no GPU samples received by the current leader")
	}
}

// eventRows lists events, one per row, under an "Events:" label.
func eventRows(t *table, events []*pb.NodeEvent) {
	for i, e := range events {
		label := ""
		if i == 0 {
			label = "Events:"
		}
		where := e.GetNode()
		if e.GetGpu() >= 0 {
			where += fmt.Sprintf(" GPU %d", e.GetGpu())
		}
		what := strings.TrimPrefix(e.GetKind().String(), "NODE_EVENT_KIND_")
		line := fmt.Sprintf("%s  %s  %s: %s", e.GetTime().AsTime().Local().Format(time.RFC3339), what, where, e.GetMessage())
		if e.GetAction() != "" {
			line += " [" + e.GetAction() + "]"
		}
		t.row(label, line)
	}
}

// shellQuote renders argv so it can be pasted into a shell.
func shellQuote(argv []string) string {
	out := make([]string, len(argv))
	for i, a := range argv {
		if a != "" && !strings.ContainsAny(a, " \t\n'\"\\$`|&;<>()*?[]{}!#~") {
			out[i] = a
			continue
		}
		out[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(out, " ")
}

func newNodesCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:     "nodes [NODE]",
		Aliases: []string{"node"},
		Short:   "List GPU nodes, or show one node in detail",
		Example: `  gpusched nodes
  gpusched nodes gpu-01
  gpusched nodes -o yaml`,
		Args: readArgs(&output, "node name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			w := cmd.OutOrStdout()
			if len(args) == 1 {
				n, err := c.Node(cmd.Context(), args[0])
				if err != nil {
					return err
				}
				return printOne(w, output, n, n.GetId(), describeNode)
			}
			nodes, err := c.Nodes(cmd.Context())
			if err != nil {
				return err
			}
			switch {
			case structured(output):
				return printProto(w, output, &pb.ListNodesResponse{Nodes: nodes})
			case output == "name":
				for _, n := range nodes {
					if err := printNames(w, n.GetId()); err != nil {
						return err
					}
				}
				return nil
			}
			wide := output == "wide"
			header := []string{"NAME", "STATE", "GPU", "GPUS", "GPU-MEM", "DRIVER", "AGENT", "LEASE", "JOB"}
			if wide {
				header = append(header, "ADDRESS", "LABELS")
			}
			t := newTable(w, header...)
			for _, n := range nodes {
				inv := n.GetInventory()
				agent := "connected"
				if !n.GetConnected() {
					agent = "disconnected"
				}
				row := []string{n.GetId(), nodeStateName(n.GetState()), orDash(inv.GetGpuModel()), fmt.Sprint(inv.GetGpuCount()),
					gib(inv.GetGpuMemoryBytes()), orDash(inv.GetDriverVersion()), agent, orDash(n.GetLeaseId()), orDash(n.GetJobId())}
				if wide {
					row = append(row, orDash(n.GetAddress()), orDash(labelString(n.GetLabels())))
				}
				t.row(row...)
			}
			return t.flush()
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table, wide, json, yaml or name")
	cmd.AddCommand(newNodesLabelCmd())
	return cmd
}

func newNodesLabelCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "label NODE k=v... [k-...]",
		Short: "Set (k=v) or remove (k-) operator labels on a node",
		Long: `Set or remove operator labels on a node. They override the labels the
agent reports (--labels) key by key, and feed placement: --selector, and
--topology same-rack|same-switch group nodes by their "rack" and "switch" labels.`,
		Example: `  gpusched nodes label gpu-01 rack=r1 switch=s3
  gpusched nodes label gpu-01 pool-`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 {
				return usageError("nodes label expects a node and at least one k=v or k- (see 'gpusched nodes label --help')")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			set, remove := map[string]string{}, []string(nil)
			for _, a := range args[1:] {
				if k, ok := strings.CutSuffix(a, "-"); ok && !strings.Contains(a, "=") {
					remove = append(remove, k)
					continue
				}
				k, v, ok := strings.Cut(a, "=")
				if !ok {
					return usageError("label %q: want k=v to set or k- to remove", a)
				}
				set[k] = v
			}
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			n, err := c.Label(cmd.Context(), args[0], set, remove)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "node %s labelled\n", n.GetId())
			return nil
		},
	}
}

// labelString renders labels as sorted k=v,k=v.
func labelString(labels map[string]string) string {
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k+"="+labels[k])
	}
	sort.Strings(keys)
	return strings.Join(keys, ",")
}

func describeNode(w io.Writer, n *pb.Node) error {
	inv := n.GetInventory()
	t := newTable(w, "Name:", n.GetId())
	t.row("State:", nodeStateName(n.GetState()))
	if n.GetReason() != "" {
		t.row("Reason:", n.GetReason())
	}
	if n.GetDrain() {
		t.row("Drained:", n.GetDrainReason())
	}
	t.row("Agent:", map[bool]string{true: "connected", false: "disconnected"}[n.GetConnected()])
	t.row("Address:", orDash(n.GetAddress()))
	t.row("Hostname:", orDash(inv.GetHostname()))
	if n.GetLeaseId() != "" {
		t.row("Lease:", n.GetLeaseId()+" (job "+n.GetJobId()+")")
	}
	keys := make([]string, 0, len(n.GetLabels()))
	for k := range n.GetLabels() {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	labels := make([]string, len(keys))
	for i, k := range keys {
		labels[i] = k + "=" + n.GetLabels()[k]
	}
	t.row("Labels:", orDash(strings.Join(labels, ",")))
	t.row("GPU model:", orDash(inv.GetGpuModel()))
	t.row("Driver:", orDash(inv.GetDriverVersion())+" (CUDA "+orDash(inv.GetCudaVersion())+")")
	for i, g := range inv.GetGpus() {
		label := ""
		if i == 0 {
			label = "GPUs:"
		}
		t.row(label, fmt.Sprintf("%d  %s  %s  %s  %s", g.GetIndex(), g.GetName(), gib(g.GetMemoryBytes()), g.GetPciBusId(), g.GetUuid()))
	}
	eventRows(t, n.GetEvents())
	return t.flush()
}
