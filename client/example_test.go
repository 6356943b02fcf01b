package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gpusched/gpusched/client"
	"github.com/gpusched/gpusched/internal/devcluster"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// TestMain runs the examples against a real dev cluster (embedded etcd,
// a scheduler, two simulated H100 nodes), found the way programs find
// theirs: through GPUSCHED_SERVER.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "gpusched-client-test")
	if err != nil {
		log.Fatal(err)
	}
	cl, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: 2, DataDir: dir})
	if err != nil {
		log.Fatal(err)
	}
	os.Setenv("GPUSCHED_SERVER", cl.Endpoint)
	code := m.Run()
	cl.Close()
	os.RemoveAll(dir)
	os.Exit(code)
}

// connect returns a client for the cluster in GPUSCHED_SERVER.
func connect(ctx context.Context) *client.Client {
	c, err := client.New(ctx, client.Config{Endpoints: strings.Split(os.Getenv("GPUSCHED_SERVER"), ",")})
	if err != nil {
		log.Fatal(err)
	}
	return c
}

// Submit a job on two whole nodes and wait for it to end.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := client.New(ctx, client.Config{Endpoints: strings.Split(os.Getenv("GPUSCHED_SERVER"), ",")})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	job, err := c.Submit(ctx, &pb.JobSpec{
		Nodes:   2,
		Command: []string{"sh", "-c", "echo rank $GPUSCHED_NODE_RANK of $GPUSCHED_NUM_NODES"},
	})
	if err != nil {
		log.Fatal(err)
	}
	job, err = c.Wait(ctx, job.GetId())
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(job.GetState(), len(job.GetNodes()), "nodes")
	// Output: JOB_STATE_SUCCEEDED 2 nodes
}

// A retried submit with the same idempotency key returns the job the
// first one created: a queue that delivers a message twice still makes
// one job.
func ExampleWithIdempotencyKey() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := connect(ctx)
	defer c.Close()

	spec := &pb.JobSpec{Nodes: 1, Command: []string{"true"}}
	first, err := c.Submit(ctx, spec, client.WithIdempotencyKey("orders/1732662000000-0"))
	if err != nil {
		log.Fatal(err)
	}
	again, err := c.Submit(ctx, spec, client.WithIdempotencyKey("orders/1732662000000-0"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(first.GetId() == again.GetId())
	// Output: true
}

// Submit many jobs in one call; each item succeeds or fails on its own.
func ExampleClient_SubmitBatch() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := connect(ctx)
	defer c.Close()

	results, err := c.SubmitBatch(ctx, []client.BatchItem{
		{Spec: &pb.JobSpec{Nodes: 1, Command: []string{"true"}, JobSet: "example-batch"}},
		{Spec: &pb.JobSpec{Nodes: 0, Command: []string{"true"}, JobSet: "example-batch"}},
	})
	if err != nil {
		log.Fatal(err)
	}
	for i, r := range results {
		var e *client.Error
		switch {
		case errors.As(r.Err, &e) && errors.Is(r.Err, client.ErrInvalid):
			fmt.Printf("item %d invalid: %s\n", i, e.Violations[0].Field)
		case r.Err != nil:
			log.Fatal(r.Err)
		default:
			fmt.Printf("item %d accepted\n", i)
		}
	}
	// Output:
	// item 0 accepted
	// item 1 invalid: spec.nodes
}

// Follow the jobs of a job set: the current ones first, then every state
// change, with nothing missed or repeated even across failovers.
func ExampleClient_ListAndWatch() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := connect(ctx)
	defer c.Close()

	set := &pb.JobSelector{JobSet: "example-watch"}
	job, err := c.Submit(ctx, &pb.JobSpec{Nodes: 1, Command: []string{"true"}, JobSet: "example-watch"})
	if err != nil {
		log.Fatal(err)
	}
	wctx, stop := context.WithCancel(ctx)
	err = c.ListAndWatch(wctx, set, func(jobs []*pb.Job) error {
		fmt.Println("listed", len(jobs), "job")
		return nil
	}, func(ev *pb.JobEvent) error {
		if ev.GetJobId() == job.GetId() && client.Terminal(ev.GetTransition().GetState()) {
			fmt.Println("ended:", ev.GetTransition().GetState())
			stop()
		}
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	// Output:
	// listed 1 job
	// ended: JOB_STATE_SUCCEEDED
}

// List with filters, a page at a time.
func ExampleClient_List() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := connect(ctx)
	defer c.Close()

	for range 3 {
		if _, err := c.Submit(ctx, &pb.JobSpec{Nodes: 1, Command: []string{"true"}, Labels: map[string]string{"example": "list"}}); err != nil {
			log.Fatal(err)
		}
	}
	req := &pb.ListJobsRequest{PageSize: 2, Selector: &pb.JobSelector{Labels: map[string]string{"example": "list"}}}
	for page := 1; ; page++ {
		resp, err := c.List(ctx, req)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("page %d: %d jobs\n", page, len(resp.GetJobs()))
		if req.PageToken = resp.GetNextPageToken(); req.PageToken == "" {
			break
		}
	}
	// Output:
	// page 1: 2 jobs
	// page 2: 1 jobs
}
