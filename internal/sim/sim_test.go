package sim

import (
	"bytes"
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestSmoke runs a small simulated cluster end to end, in this process:
// 50 hollow agents, a few hundred jobs including gangs of up to 32 nodes,
// both phases, a leader cold start with the agents reconnecting, and a
// short etcd ceiling run. It asserts correctness only, never timing:
// every job placed and SUCCEEDED, no hollow agent ever handed a lease
// while it still held another, and etcd's history passes the invariant
// checker.
func TestSmoke(t *testing.T) {
	var progress bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rep, err := Run(ctx, Config{
		Nodes: 50, AgentsPerConn: 16, TelemetryHz: 2, EtcdNoFsync: true,
		HeartbeatInterval: time.Second,
		OpenRate:          80, OpenDuration: 2 * time.Second, OpenConcurrency: 32,
		OpenMinRun: 10 * time.Millisecond, OpenMaxRun: 60 * time.Millisecond,
		BacklogJobs: 200, BacklogBatch: 50, BacklogConcurrency: 2, BacklogMaxRun: 20 * time.Millisecond,
		BurstJobs: 50, BurstRun: 300 * time.Millisecond,
		ColdStart: true, CeilingClients: []int{1}, CeilingDuration: 200 * time.Millisecond,
		Verify: true, CheckInvariants: true, PhaseTimeout: 90 * time.Second,
		Progress: &progress,
	})
	if err != nil {
		t.Fatalf("Run: %v\nprogress:\n%s", err, progress.String())
	}
	var text bytes.Buffer
	rep.WriteText(&text)
	t.Logf("report:\n%s", text.String())

	if rep.Burst == nil {
		t.Fatalf("no burst in the report")
	}
	submitted := rep.Open.Load.Submitted + rep.Backlog.Load.Submitted + rep.Burst.Load.Submitted
	accepted := rep.Open.Load.Accepted + rep.Backlog.Load.Accepted + rep.Burst.Load.Accepted
	if submitted != 160+200+50 || accepted != submitted {
		t.Errorf("accepted %d of %d jobs; want all of 410 (open: %+v, backlog: %+v, burst: %+v)", accepted, submitted, rep.Open.Load, rep.Backlog.Load, rep.Burst.Load)
	}
	// The burst fills every node at once, ahead of the whole backlog.
	if b := rep.Burst; b.Placed != 50 || b.NodesPlaced != 50 || b.PlacementsPerSec <= 0 {
		t.Errorf("burst: placed %d jobs on %d nodes at %.0f/s; want 50 one-node jobs", b.Placed, b.NodesPlaced, b.PlacementsPerSec)
	}
	if rep.Open.Placed != rep.Open.Load.Accepted || rep.Backlog.Placed != rep.Backlog.Load.Accepted {
		t.Errorf("placed %d open and %d backlog jobs; want %d and %d", rep.Open.Placed, rep.Backlog.Placed, rep.Open.Load.Accepted, rep.Backlog.Load.Accepted)
	}
	var gangs bool
	if rep.Open.NodesPlaced+rep.Backlog.NodesPlaced > rep.Open.Placed+rep.Backlog.Placed {
		gangs = true
	}
	if !gangs {
		t.Errorf("no multi-node job was placed; the mix should include gangs")
	}
	if v := rep.Verify; v == nil || int64(v.Jobs) != accepted || int64(v.States["SUCCEEDED"]) != accepted {
		t.Errorf("jobs at the end: %+v; want all %d SUCCEEDED", rep.Verify, accepted)
	}
	if f := rep.Fleet; f.Violations != 0 {
		t.Errorf("%d hollow agents got a StartLease while holding a lease: %v", f.Violations, f.Examples)
	}
	if f := rep.Fleet; f.Starts != f.Exits || f.Starts != f.Releases {
		t.Errorf("agents saw %d StartLease, reported %d exits and %d releases; want equal", f.Starts, f.Exits, f.Releases)
	}
	if iv := rep.Invariants; iv == nil || len(iv.Violations) > 0 || iv.Jobs != int(accepted) {
		t.Errorf("invariants: %+v", rep.Invariants)
	}
	for _, cs := range []*ColdStartReport{rep.ColdStartQuiet, rep.ColdStart} {
		if cs == nil || cs.Load.Jobs != accepted || cs.Load.Nodes != 50 || cs.AllAgentsBack <= 0 {
			t.Errorf("cold start: %+v; want %d jobs and 50 nodes loaded, agents back", cs, accepted)
		}
	}
	if f := rep.Fleet; f.Welcomes < 3*50 {
		t.Errorf("agents were welcomed %d times; want at least 150 (start and two cold starts)", f.Welcomes)
	}
	if len(rep.Ceiling) != 1 || rep.Ceiling[0].Keys == 0 {
		t.Errorf("ceiling: %+v", rep.Ceiling)
	}
	if !strings.Contains(text.String(), "leader cold start") {
		t.Errorf("text report lacks the cold start row")
	}
}

func TestJobRuntime(t *testing.T) {
	for _, tc := range []struct {
		cmd  []string
		env  map[string]string
		want time.Duration
		code int
	}{
		{[]string{"sleep", "1.5"}, nil, 1500 * time.Millisecond, 0},
		{[]string{"/bin/sleep", "2"}, map[string]string{EnvExitCode: "3"}, 2 * time.Second, 3},
		{[]string{"sleep", "9"}, map[string]string{EnvDuration: "250ms"}, 250 * time.Millisecond, 0},
		{[]string{"train.sh"}, nil, 0, 0},
	} {
		d, code := jobRuntime(&pb.StartLease{Command: tc.cmd, Env: tc.env})
		if d != tc.want || code != tc.code {
			t.Errorf("jobRuntime(%v, %v) = %s, %d; want %s, %d", tc.cmd, tc.env, d, code, tc.want, tc.code)
		}
	}
}

func TestParseMix(t *testing.T) {
	mix, err := ParseMix("70:1,20:2-4,10:8-32")
	if err != nil {
		t.Fatal(err)
	}
	if got := FormatMix(mix); got != "70:1,20:2-4,10:8-32" {
		t.Errorf("FormatMix(ParseMix) = %q", got)
	}
	if m := meanNodes(mix); m < 3.29 || m > 3.31 {
		t.Errorf("meanNodes = %g; want 3.3", m)
	}
	for _, bad := range []string{"", "70", "x:1", "10:0", "10:4-2", "-1:1"} {
		if _, err := ParseMix(bad); err == nil {
			t.Errorf("ParseMix(%q) accepted", bad)
		}
	}
}

func TestSummarize(t *testing.T) {
	var ds []time.Duration
	for i := 1; i <= 1000; i++ {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	p := summarize(ds)
	if p.N != 1000 || p.P50 != 500 || p.P99 != 990 || p.P999 != 999 || p.Max != 1000 {
		t.Errorf("summarize = %+v", p)
	}
}

// The tracker writes each lease's latency, to its last node, in
// submission order, timed from the phase's first submission.
func TestWriteLatencies(t *testing.T) {
	tr := NewTracker()
	t0 := time.Unix(1_800_000_000, 0)
	start := func(lease string, submitted, at time.Duration, nodes ...string) {
		tr.StartLease(nodes[0], &pb.StartLease{LeaseId: lease, Nodes: nodes, Env: map[string]string{
			EnvPhase: PhaseOpen, EnvSubmitNanos: strconv.FormatInt(t0.Add(submitted).UnixNano(), 10),
		}}, t0.Add(at))
	}
	start("2.1", 10*time.Millisecond, 15*time.Millisecond, "n1")
	start("1.1", 0, 20*time.Millisecond, "n2", "n3") // a gang: its last node counts
	start("1.1", 0, 32*time.Millisecond, "n2", "n3")
	var b strings.Builder
	if err := tr.WriteLatencies(&b, PhaseOpen); err != nil {
		t.Fatal(err)
	}
	want := "submitted_s,latency_ms,nodes\n0.0000,32.000,2\n0.0100,5.000,1\n"
	if b.String() != want {
		t.Errorf("WriteLatencies =\n%s\nwant\n%s", b.String(), want)
	}
}
