package scheduler_test

import (
	"sync"
	"testing"

	"github.com/gpusched/gpusched/client"
	"github.com/gpusched/gpusched/scheduler"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/internal/schedtest"
)

// Retries of one submit race a leader failover: some land on the old
// leader, some wait out the election, some land on the new one. They must
// all get the one job.
func TestConcurrentRetriesAcrossALeaderFailoverMakeOneJob(t *testing.T) {
	c := cluster(t, 0, schedtest.AgentConfig{}, engine.Config{})
	standby := schedtest.StartReplica(t, scheduler.Config{Etcd: c.Etcd.Client, Name: "replica-2", Engine: engine.Config{KillGrace: killGrace}})
	sdk := newClient(t, c.Replica.Addr, standby.Addr)
	ctx := schedtest.Context(t)

	const retriers, rounds = 4, 10
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		ids = map[string]int{}
	)
	start := make(chan struct{})
	for range retriers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for range rounds {
				j, err := sdk.Submit(ctx, schedtest.Spec(1), client.WithIdempotencyKey("order-42"))
				if err != nil {
					t.Errorf("submit: %v", err)
					return
				}
				mu.Lock()
				ids[j.GetId()]++
				mu.Unlock()
			}
		}()
	}
	close(start)
	c.Replica.Stop(t)
	standby.WaitLeader(t)
	wg.Wait()
	// And once more, on the new leader alone.
	j, err := sdk.Submit(ctx, schedtest.Spec(1), client.WithIdempotencyKey("order-42"))
	if err != nil {
		t.Fatal(err)
	}
	ids[j.GetId()]++
	if len(ids) != 1 {
		t.Fatalf("one idempotency key made jobs %v; want one", ids)
	}
	jobs, _, err := sdk.ListAll(ctx, nil)
	if err != nil || len(jobs) != 1 {
		t.Fatalf("%d jobs exist (%v); want 1", len(jobs), err)
	}
}
