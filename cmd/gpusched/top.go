package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpusched/gpusched/client"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// topFields are the GpuSample fields top shows; the stream carries only
// these.
var topFields = []string{"gpu_util", "fb_used_bytes", "fb_free_bytes", "gpu_temp", "power_usage_milliwatts", "last_xid"}

func newTopCmd() *cobra.Command {
	var (
		req   pb.StreamTelemetryRequest
		every time.Duration
		once  bool
		gpus  bool
	)
	cmd := &cobra.Command{
		Use:   "top",
		Short: "Live view of every node and GPU: utilization, memory, temperature, power, job, tenant",
		Long: `A live terminal view of the cluster's GPUs, refreshed from the telemetry
stream: one row per node (a bar per GPU, then averages and totals), or one row
per GPU with --gpus. Press q (or Ctrl-C) to quit; the terminal is restored.
Works over SSH (plain ANSI escapes, no mouse). When stdout is not a terminal,
or with --once, it prints one frame and exits.`,
		Example: `  gpusched top
  gpusched top --gpus --node gpu-01,gpu-02
  gpusched top --tenant acme --every 5s
  gpusched top --once > snapshot.txt`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if every > 0 {
				req.Every = durationpb.New(every)
			}
			req.Nodes = splitList(req.Nodes)
			req.JobIds = splitList(req.JobIds)
			req.Fields = topFields
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			out := cmd.OutOrStdout()
			f, isFile := out.(*os.File)
			interactive := !once && isFile && term.IsTerminal(int(f.Fd())) && term.IsTerminal(int(os.Stdin.Fd()))
			t := &topView{gpus: gpus}
			if !interactive {
				return t.once(cmd.Context(), c, &req, out)
			}
			return t.live(cmd.Context(), c, &req, f)
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&req.Nodes, "node", nil, "only these nodes")
	f.StringSliceVar(&req.JobIds, "job", nil, "only the nodes of these jobs")
	f.StringVar(&req.Tenant, "tenant", "", "only nodes leased by this tenant")
	f.DurationVar(&every, "every", time.Second, "at most one sample per GPU per interval")
	f.BoolVar(&once, "once", false, "print one frame and exit")
	f.BoolVar(&gpus, "gpus", false, "one row per GPU instead of per node")
	return cmd
}

// topView is what top knows: the nodes and the latest sample of each GPU.
type topView struct {
	gpus bool

	mu      sync.Mutex
	nodes   map[string]*pb.Node
	samples map[string]map[int32]*pb.TelemetrySample // node -> gpu -> latest
	dropped uint64
	err     error
}

func (t *topView) add(r *pb.StreamTelemetryResponse) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.samples == nil {
		t.samples = map[string]map[int32]*pb.TelemetrySample{}
	}
	for _, s := range r.GetSamples() {
		m := t.samples[s.GetNode()]
		if m == nil {
			m = map[int32]*pb.TelemetrySample{}
			t.samples[s.GetNode()] = m
		}
		m[s.GetSample().GetGpu()] = s
	}
	t.dropped = r.GetDroppedTotal()
}

func (t *topView) setNodes(nodes []*pb.Node) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.nodes = map[string]*pb.Node{}
	for _, n := range nodes {
		t.nodes[n.GetId()] = n
	}
}

// follow streams telemetry into t until ctx ends; snapshot is closed once
// the initial snapshot has arrived.
func (t *topView) follow(ctx context.Context, c *client.Client, req *pb.StreamTelemetryRequest, snapshot chan<- struct{}) {
	var closeOnce sync.Once
	err := c.StreamTelemetry(ctx, req, func(r *pb.StreamTelemetryResponse) error {
		t.add(r)
		if r.GetSnapshotComplete() {
			closeOnce.Do(func() { close(snapshot) })
		}
		return nil
	})
	if err != nil && ctx.Err() == nil {
		t.mu.Lock()
		t.err = err
		t.mu.Unlock()
		closeOnce.Do(func() { close(snapshot) })
	}
}

// once prints a single frame, every row, once the snapshot is in.
func (t *topView) once(ctx context.Context, c *client.Client, req *pb.StreamTelemetryRequest, w io.Writer) error {
	nodes, err := c.Nodes(ctx)
	if err != nil {
		return err
	}
	t.setNodes(nodes)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	snapshot := make(chan struct{})
	go t.follow(ctx, c, req, snapshot)
	select {
	case <-snapshot:
	case <-ctx.Done():
		return ctx.Err()
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.err != nil {
		return t.err
	}
	_, err = io.WriteString(w, strings.Join(t.frame(time.Now(), 0, 0), "\n")+"\n")
	return err
}

// live redraws the screen every second until q, Ctrl-C, or ctx ends.
func (t *topView) live(ctx context.Context, c *client.Client, req *pb.StreamTelemetryRequest, out *os.File) error {
	ctx, stop := signalContext(ctx)
	defer stop()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fd := int(os.Stdin.Fd())
	old, err := term.MakeRaw(fd)
	if err != nil {
		return fmt.Errorf("top: terminal: %w", err)
	}
	// Alternate screen, hidden cursor; both undone however we leave.
	fmt.Fprint(out, "\x1b[?1049h\x1b[?25l")
	defer func() {
		fmt.Fprint(out, "\x1b[?25h\x1b[?1049l")
		_ = term.Restore(fd, old)
	}()
	go func() { // keys: q, Q, Esc, Ctrl-C and Ctrl-D quit
		buf := make([]byte, 16)
		for {
			n, err := os.Stdin.Read(buf)
			if err != nil {
				cancel()
				return
			}
			for _, b := range buf[:n] {
				if b == 'q' || b == 'Q' || b == 3 || b == 4 || b == 27 {
					cancel()
					return
				}
			}
		}
	}()
	snapshot := make(chan struct{})
	go t.follow(ctx, c, req, snapshot)
	refreshNodes := func() {
		nctx, ncancel := context.WithTimeout(ctx, 5*time.Second)
		defer ncancel()
		if nodes, err := c.Nodes(nctx); err == nil {
			t.setNodes(nodes)
		}
	}
	refreshNodes()
	draw := time.NewTicker(time.Second)
	defer draw.Stop()
	nodesTick := time.NewTicker(5 * time.Second)
	defer nodesTick.Stop()
	for {
		width, height, err := term.GetSize(int(out.Fd()))
		if err != nil {
			width, height = 120, 40
		}
		t.mu.Lock()
		lines := t.frame(time.Now(), width, height)
		t.mu.Unlock()
		// Home, draw, clear the rest; \r\n because the terminal is raw.
		fmt.Fprint(out, "\x1b[H"+strings.Join(lines, "\x1b[K\r\n")+"\x1b[K\x1b[J")
		select {
		case <-ctx.Done():
			return nil
		case <-nodesTick.C:
			refreshNodes()
		case <-draw.C:
		case <-snapshot: // draw the snapshot as soon as it is in
			snapshot = nil
		}
	}
}

// frame renders the view: a summary line, a header and rows, cut to
// width×height (0: unbounded). Called with t.mu held.
func (t *topView) frame(now time.Time, width, height int) []string {
	names := map[string]bool{}
	for n := range t.nodes {
		names[n] = true
	}
	for n := range t.samples {
		names[n] = true
	}
	order := make([]string, 0, len(names))
	for n := range names {
		order = append(order, n)
	}
	sort.Strings(order)
	var (
		gpus                int
		utilSum, powerMilli float64
		rows                [][]string
	)
	for _, name := range order {
		node, samples := t.nodes[name], t.samples[name]
		if len(samples) == 0 && (len(t.samples) > 0 || node == nil) {
			continue // filtered out by the stream, or gone
		}
		idx := make([]int32, 0, len(samples))
		for g := range samples {
			idx = append(idx, g)
		}
		sort.Slice(idx, func(a, b int) bool { return idx[a] < idx[b] })
		state, job, tenant := "-", "-", "-"
		if node != nil {
			state = nodeStateName(node.GetState())
			job = orDash(node.GetJobId())
		}
		var (
			bars                 strings.Builder
			util, maxTemp        uint32
			used, total, powerMW uint64
		)
		for _, g := range idx {
			s := samples[g]
			gs := s.GetSample()
			if s.GetJobId() != "" {
				job, tenant = s.GetJobId(), orDash(s.GetTenant())
			}
			bars.WriteRune(utilBar(gs.GetGpuUtil()))
			util += gs.GetGpuUtil()
			used += gs.GetFbUsedBytes()
			total += gs.GetFbUsedBytes() + gs.GetFbFreeBytes()
			maxTemp = max(maxTemp, gs.GetGpuTemp())
			powerMW += uint64(gs.GetPowerUsageMilliwatts())
			if t.gpus {
				rows = append(rows, []string{name, fmt.Sprint(g), fmt.Sprintf("%d%%", gs.GetGpuUtil()),
					fmt.Sprintf("%.1f/%.0f", gibf(gs.GetFbUsedBytes()), gibf(gs.GetFbUsedBytes()+gs.GetFbFreeBytes())),
					fmt.Sprintf("%dC", gs.GetGpuTemp()), fmt.Sprintf("%.0fW", float64(gs.GetPowerUsageMilliwatts())/1000),
					xid(gs.GetLastXid()), orDash(s.GetJobId()), orDash(s.GetTenant())})
			}
		}
		gpus += len(idx)
		utilSum += float64(util)
		powerMilli += float64(powerMW)
		if t.gpus {
			continue
		}
		avg := "-"
		if len(idx) > 0 {
			avg = fmt.Sprintf("%d%%", util/uint32(len(idx)))
		}
		rows = append(rows, []string{name, state, job, tenant, orDash(bars.String()), avg,
			fmt.Sprintf("%.0f/%.0f", gibf(used), gibf(total)), fmt.Sprintf("%dC", maxTemp), fmt.Sprintf("%.0fW", float64(powerMW)/1000)})
	}
	header := []string{"NODE", "STATE", "JOB", "TENANT", "GPU UTIL", "AVG", "MEM GiB", "TEMP", "POWER"}
	if t.gpus {
		header = []string{"NODE", "GPU", "UTIL", "MEM GiB", "TEMP", "POWER", "XID", "JOB", "TENANT"}
	}
	avgUtil := 0.0
	if gpus > 0 {
		avgUtil = utilSum / float64(gpus)
	}
	summary := fmt.Sprintf("gpusched top  %s  nodes %d  GPUs %d  avg util %.0f%%  power %.1f kW",
		now.Format("15:04:05"), len(order), gpus, avgUtil, powerMilli/1e6)
	if t.dropped > 0 {
		summary += fmt.Sprintf("  dropped %d", t.dropped)
	}
	if t.err != nil {
		summary += "  error: " + t.err.Error()
	}
	if height > 0 {
		summary += "  (q quits)"
	}
	lines := append([]string{summary, ""}, alignColumns(append([][]string{header}, rows...))...)
	if height > 0 && len(lines) > height {
		more := len(lines) - height + 1
		lines = append(lines[:height-1], fmt.Sprintf("... %d more rows (narrow it with --node, --job or --tenant)", more))
	}
	if width > 0 {
		for i, l := range lines {
			if r := []rune(l); len(r) > width {
				lines[i] = string(r[:width])
			}
		}
	}
	return lines
}

// alignColumns pads cells into columns two spaces apart.
func alignColumns(rows [][]string) []string {
	var widths []int
	for _, r := range rows {
		for i, c := range r {
			if i >= len(widths) {
				widths = append(widths, 0)
			}
			widths[i] = max(widths[i], len([]rune(c)))
		}
	}
	out := make([]string, len(rows))
	for i, r := range rows {
		var b strings.Builder
		for j, c := range r {
			b.WriteString(c)
			if j < len(r)-1 {
				b.WriteString(strings.Repeat(" ", widths[j]-len([]rune(c))+2))
			}
		}
		out[i] = b.String()
	}
	return out
}

// utilBar draws a utilization percentage as one block character.
func utilBar(util uint32) rune {
	bars := []rune(" ▁▂▃▄▅▆▇█")
	return bars[min(int(util)*(len(bars)-1)/100, len(bars)-1)]
}

// gibf is b in GiB, with fractions.
func gibf(b uint64) float64 { return float64(b) / (1 << 30) }

func xid(x uint64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprint(x)
}
