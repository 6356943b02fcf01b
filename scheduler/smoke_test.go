package scheduler_test

import (
	"testing"
	"time"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestSmoke(t *testing.T) {
	c := schedtest.StartCluster(t, schedtest.ClusterConfig{Agents: 2})
	j := schedtest.Submit(t, c.Replica.Jobs, schedtest.Spec(2))
	schedtest.WaitJobState(t, c.Replica.Jobs, j.Id, pb.JobState_JOB_STATE_RUNNING)
	for _, a := range c.Agents {
		s := a.WaitStart(t, j.Id)
		a.Exit(s.LeaseId, 0, "")
	}
	schedtest.WaitJobState(t, c.Replica.Jobs, j.Id, pb.JobState_JOB_STATE_SUCCEEDED)
}

func TestSmokeStop(t *testing.T) {
	c := schedtest.StartCluster(t, schedtest.ClusterConfig{Agents: 1, Agent: schedtest.AgentConfig{Heartbeat: 100 * time.Millisecond}})
	start := time.Now()
	c.Replica.Stop(t)
	t.Logf("stop took %s", time.Since(start))
}
