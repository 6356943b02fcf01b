package e2e

import (
	"strings"
	"testing"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// TestTopShowsEveryNodeWithItsJob prints one frame of `gpusched top` (stdout
// is not a terminal) from a real dev cluster.
func TestTopShowsEveryNodeWithItsJob(t *testing.T) {
	needBinary(t)
	_, server := startDev(t, t.TempDir(), 2)
	id := submit(t, server, "--tenant", "acme", "--", "sh", "-c", "sleep 600 # "+marker)
	eventually(t, "the job to run", func() (bool, string) {
		j := getJob(t, server, id)
		return j.GetState() == pb.JobState_JOB_STATE_RUNNING, j.String()
	})
	eventually(t, "top to show the job's node and its tenant", func() (bool, string) {
		out := mustCLI(t, server, "top", "--once")
		lines := strings.Split(out, "\n")
		ok := strings.HasPrefix(out, "gpusched top") && strings.Contains(out, "GPUs 16")
		for _, l := range lines {
			if strings.Contains(l, "LEASED") {
				ok = ok && strings.Contains(l, " "+id+" ") && strings.Contains(l, "acme")
			}
		}
		return ok && strings.Count(out, "gpu-0") == 2 && strings.Contains(out, "LEASED"), out
	})
	mustCLI(t, server, "cancel", id)
}
