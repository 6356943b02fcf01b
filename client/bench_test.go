package client_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/gpusched/gpusched/client"
	"github.com/gpusched/gpusched/internal/devcluster"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// benchCluster starts a dev cluster (embedded etcd with fsync, one
// scheduler, 4 simulated nodes) for one benchmark.
func benchCluster(b *testing.B) *client.Client {
	b.Helper()
	cl, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: 4, DataDir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(cl.Close)
	c, err := client.New(context.Background(), client.Config{Endpoints: []string{cl.Endpoint}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	// Wait until the scheduler answers.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		if _, err := c.Status(ctx); err == nil {
			break
		} else if ctx.Err() != nil {
			b.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c
}

// benchSpec asks for a GPU model no node has, so every job stays pending:
// the benchmark measures acceptance, with the queue growing as it would
// under a burst.
func benchSpec() *pb.JobSpec {
	return &pb.JobSpec{Nodes: 1, GpuModel: "B200", Command: []string{"true"}}
}

func reportJobsPerSecond(b *testing.B, jobs int) {
	b.ReportMetric(float64(jobs)/b.Elapsed().Seconds(), "jobs/s")
}

// BenchmarkSubmit: one client submitting one job at a time.
func BenchmarkSubmit(b *testing.B) {
	c := benchCluster(b)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Submit(ctx, benchSpec()); err != nil {
			b.Fatal(err)
		}
	}
	reportJobsPerSecond(b, b.N)
}

// BenchmarkSubmitConcurrent: 64 concurrent single submits, which the
// scheduler group-commits.
func BenchmarkSubmitConcurrent(b *testing.B) {
	c := benchCluster(b)
	b.SetParallelism(64 / max(1, testingProcs()))
	ctx := context.Background()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.Submit(ctx, benchSpec()); err != nil {
				b.Error(err)
				return
			}
		}
	})
	reportJobsPerSecond(b, b.N)
}

// BenchmarkSubmitBatch: batches of 1,000 jobs with idempotency keys, from
// 4 concurrent clients.
func BenchmarkSubmitBatch(b *testing.B) {
	for _, keys := range []bool{false, true} {
		b.Run(fmt.Sprintf("idempotency_keys=%v", keys), func(b *testing.B) {
			c := benchCluster(b)
			ctx := context.Background()
			const size, writers = client.MaxBatch, 4
			b.ResetTimer()
			var wg sync.WaitGroup
			next := make(chan int)
			for range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range next {
						items := make([]client.BatchItem, size)
						for k := range items {
							items[k].Spec = benchSpec()
							if keys {
								items[k].IdempotencyKey = fmt.Sprintf("batch-%d/%d", i, k)
							}
						}
						res, err := c.SubmitBatch(ctx, items)
						if err != nil {
							b.Error(err)
							return
						}
						for _, r := range res {
							if r.Err != nil {
								b.Error(r.Err)
								return
							}
						}
					}
				}()
			}
			for i := 0; i < b.N; i++ {
				next <- i
			}
			close(next)
			wg.Wait()
			reportJobsPerSecond(b, b.N*size)
		})
	}
}

func testingProcs() int { return 2 }
