package api

import (
	"errors"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/store"
	"github.com/gpusched/gpusched/scheduler/wire"
)

// idleNoteEvery bounds how long a watcher whose filter matched nothing goes
// without a fresh cursor, so its resume point keeps up with the history.
const idleNoteEvery = 5 * time.Second

// WatchJobs is served by any replica straight from etcd, where every job
// change is committed before anyone hears of it: no forwarding, and a
// leader change does not interrupt it. Each committed job record carries
// its transitions, and the watch compares it with the record before, so
// changes that one group commit merged into a single write still arrive
// one by one.
func (s *jobServer) WatchJobs(req *pb.WatchJobsRequest, stream grpc.ServerStreamingServer[pb.WatchJobsResponse]) error {
	if s.b.Store == nil {
		return status.Error(codes.Unimplemented, "job watch is not served by this replica")
	}
	ctx := stream.Context()
	sel, err := selectorFromProto(req.GetSelector())
	if err != nil {
		return toStatus(err)
	}
	after, err := parseCursor(req.GetCursor())
	if err != nil {
		return toStatus(err)
	}
	if after == 0 {
		if after, err = s.b.Store.Revision(ctx); err != nil {
			return toStatus(model.Errorf(model.ErrNotLeader, "cannot reach etcd: %v", err))
		}
	}
	if err := stream.Send(&pb.WatchJobsResponse{Cursor: formatCursor(after)}); err != nil {
		return err
	}
	jobID := ""
	if len(sel.IDs) == 1 {
		jobID = sel.IDs[0]
	}
	lastSent := time.Now()
	err = s.b.Store.WatchJobs(ctx, after, jobID, func(batch store.JobChanges) error {
		resp := &pb.WatchJobsResponse{Cursor: formatCursor(batch.Revision)}
		for _, c := range batch.Changes {
			if !sel.Matches(c.Job) {
				continue
			}
			var job *pb.Job
			for _, t := range model.NewTransitions(c.Prev, c.Job) {
				if !sel.MatchesState(t.State) {
					continue
				}
				if job == nil {
					job = wire.JobToProto(c.Job)
				}
				resp.Events = append(resp.Events, &pb.JobEvent{JobId: c.Job.ID, Transition: wire.TransitionToProto(t), Job: job})
			}
		}
		if len(resp.Events) == 0 && time.Since(lastSent) < idleNoteEvery {
			return nil
		}
		lastSent = time.Now()
		return stream.Send(resp)
	})
	if errors.Is(err, store.ErrCompacted) {
		return compactedStatus(err)
	}
	if err != nil && ctx.Err() == nil {
		return toStatus(model.Errorf(model.ErrNotLeader, "job watch interrupted: %v", err))
	}
	return nil
}

// Cursors are opaque to clients; today they are etcd revisions.
func formatCursor(rev int64) string { return strconv.FormatInt(rev, 10) }

func parseCursor(c string) (int64, error) {
	if c == "" {
		return 0, nil
	}
	rev, err := strconv.ParseInt(c, 10, 64)
	if err != nil || rev <= 0 {
		return 0, &model.ValidationError{Violations: []model.FieldViolation{{Field: "cursor", Description: "is not a cursor from a previous response"}}}
	}
	return rev, nil
}

// selectorFromProto converts and validates a job selector.
func selectorFromProto(p *pb.JobSelector) (model.JobSelector, error) {
	sel := model.JobSelector{IDs: p.GetIds(), Queues: p.GetQueues(), Tenants: p.GetTenants(), Labels: p.GetLabels(), JobSet: p.GetJobSet()}
	for i, st := range p.GetStates() {
		if st == pb.JobState_JOB_STATE_UNSPECIFIED {
			return sel, &model.ValidationError{Violations: []model.FieldViolation{{Field: fieldIndex("selector.states", i), Description: "unknown job state"}}}
		}
		sel.States = append(sel.States, model.JobState(st))
	}
	return sel, sel.Validate("selector")
}
