package client

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// ListAll returns every job sel matches, following pages, and a cursor
// from which Watch delivers every change made since the listing began.
// (Pages are read one after another, so a change that happened while
// listing may show in a later page and arrive from Watch too; ListAndWatch
// drops such repeats.)
func (c *Client) ListAll(ctx context.Context, sel *pb.JobSelector) ([]*pb.Job, string, error) {
	var (
		jobs   []*pb.Job
		cursor string
		token  string
	)
	for {
		page, err := c.List(ctx, &pb.ListJobsRequest{Selector: sel, PageToken: token, PageSize: 5000})
		if err != nil {
			return nil, "", err
		}
		if cursor == "" {
			cursor = page.GetCursor()
		}
		jobs = append(jobs, page.GetJobs()...)
		if token = page.GetNextPageToken(); token == "" {
			return jobs, cursor, nil
		}
	}
}

// Watch streams the state changes of the jobs sel matches, committed after
// cursor ("" means from now on), to fn: in commit order, so in order per
// job. Every response carries the cursor to resume from; Watch itself
// resumes from the last one when the stream breaks or the replica goes
// away, so fn sees no gap and no repeat. It returns when ctx ends (nil),
// when fn fails (its error), or with ErrCursorCompacted when the history
// after the cursor is gone (see ListAndWatch).
func (c *Client) Watch(ctx context.Context, sel *pb.JobSelector, cursor string, fn func(*pb.WatchJobsResponse) error) error {
	backoff := 100 * time.Millisecond
	for {
		var fnErr error
		progressed := false
		err := c.stream(ctx, func(ctx context.Context, conn *grpc.ClientConn) error {
			stream, err := pb.NewJobServiceClient(conn).WatchJobs(ctx, &pb.WatchJobsRequest{Selector: sel, Cursor: cursor})
			if err != nil {
				return err
			}
			return recvAll(stream, func(r *pb.WatchJobsResponse) error {
				progressed = true
				if err := fn(r); err != nil {
					fnErr = err
					return err
				}
				cursor = r.GetCursor()
				return nil
			})
		})
		switch {
		case fnErr != nil:
			return fnErr
		case ctx.Err() != nil:
			return nil
		case err != nil && !errors.Is(err, ErrUnavailable) && !errors.Is(err, ErrInternal):
			return err
		}
		// The stream ended or broke (a replica restarting, etcd failing
		// over, a connection reset): resume from the last cursor.
		if progressed {
			backoff = 100 * time.Millisecond
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// ListAndWatch is re-list-then-watch, the way to follow jobs without
// missing anything: it lists every job sel matches and hands them to
// onList, then watches from the listing's cursor and hands each later
// state change to onEvent, dropping any the listing already showed. When
// the watch's history has been compacted away it lists again, calls
// onList with the fresh listing, and watches on. It returns when ctx ends
// (nil) or a callback fails (its error).
func (c *Client) ListAndWatch(ctx context.Context, sel *pb.JobSelector, onList func([]*pb.Job) error, onEvent func(*pb.JobEvent) error) error {
	for {
		jobs, cursor, err := c.ListAll(ctx, sel)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		// seen[id] is the last transition of the job already delivered.
		seen := make(map[string]int32, len(jobs))
		for _, j := range jobs {
			if ts := j.GetTransitions(); len(ts) > 0 {
				seen[j.GetId()] = ts[len(ts)-1].GetSeq()
			}
		}
		if err := onList(jobs); err != nil {
			return err
		}
		err = c.Watch(ctx, sel, cursor, func(r *pb.WatchJobsResponse) error {
			for _, ev := range r.GetEvents() {
				seq := ev.GetTransition().GetSeq()
				if seq <= seen[ev.GetJobId()] {
					continue
				}
				seen[ev.GetJobId()] = seq
				if err := onEvent(ev); err != nil {
					return err
				}
			}
			return nil
		})
		if !errors.Is(err, ErrCursorCompacted) {
			return err
		}
	}
}
