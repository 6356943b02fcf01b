package e2e

import (
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// TestTheCLIWatchesJobSetsAndFollowsLogs runs `gpusched jobs --watch` and
// `gpusched logs -f` as real processes against a real dev cluster.
func TestTheCLIWatchesJobSetsAndFollowsLogs(t *testing.T) {
	needBinary(t)
	_, server := startDev(t, t.TempDir(), 2)
	watch := start(t, "gpusched jobs --watch", "jobs", "--watch", "-o", "json", "--job-set", "e2e-set", "--server", server)

	other := submit(t, server, "--", "true") // not in the set
	id := submit(t, server, "--job-set", "e2e-set", "--label", "team=e2e", "--",
		"sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.3; done # "+marker)

	// logs -f prints everything and returns when the job ends.
	out := mustCLI(t, server, "logs", "-f", id)
	for _, want := range []string{"| line 1", "| line 2", "| line 3"} {
		if !strings.Contains(out, want) {
			t.Errorf("logs -f output lacks %q:\n%s", want, out)
		}
	}
	if got := getJob(t, server, id).GetState(); got != pb.JobState_JOB_STATE_SUCCEEDED {
		t.Errorf("logs -f returned while the job was %s; want it to follow until the end", got)
	}

	// The watch printed one JSON event per line: all four transitions of
	// the job, in order, and nothing of the job outside the set.
	var states []string
	eventually(t, "the watch to print the job's end", func() (bool, string) {
		states = nil
		for _, line := range strings.Split(strings.TrimSpace(watch.out.String()), "\n") {
			if line == "" {
				continue
			}
			var ev pb.JobEvent
			if err := protojson.Unmarshal([]byte(line), &ev); err != nil {
				return false, "not a JobEvent: " + line
			}
			if ev.GetJobId() == other {
				t.Fatalf("the watch printed job %s, which is not in the job set", other)
			}
			states = append(states, ev.GetTransition().GetState().String())
		}
		return len(states) == 4, watch.out.String()
	})
	if want := "JOB_STATE_PENDING JOB_STATE_SCHEDULED JOB_STATE_RUNNING JOB_STATE_SUCCEEDED"; strings.Join(states, " ") != want {
		t.Errorf("watched transitions %v; want %s", states, want)
	}
	// The filters list what they should.
	if got := strings.TrimSpace(mustCLI(t, server, "jobs", "--label", "team=e2e", "-o", "name")); got != id {
		t.Errorf("jobs --label team=e2e -o name = %q; want %s", got, id)
	}
	watch.stop() // SIGINT: a watch ends cleanly, exit 0
}
