package store

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/wire"
)

// ErrCompacted means a watch was asked to start at a revision etcd has
// already compacted away: the changes since then are no longer known.
var ErrCompacted = errors.New("store: revision compacted")

// JobChange is one committed write of a job record.
type JobChange struct {
	// Prev is the job before the write; nil when the write created it.
	Prev *model.Job
	Job  *model.Job
}

// JobChanges are the job writes of one stretch of history, in commit order.
// Revision is where that stretch ends: a watch resumed after it continues
// with the next write. A progress note has no changes.
type JobChanges struct {
	Changes  []JobChange
	Revision int64
}

// progressEvery is how often an idle watch asks etcd for a progress note,
// so a watcher's resume point keeps up with the history even when no job
// it cares about changes (and so outlives compaction).
const progressEvery = 5 * time.Second

// Revision returns etcd's current revision.
func (s *Store) Revision(ctx context.Context) (int64, error) {
	resp, err := s.cli.Get(ctx, s.seqKey(), clientv3.WithCountOnly())
	if err != nil {
		return 0, fmt.Errorf("store: read revision: %w", err)
	}
	return resp.Header.Revision, nil
}

// WatchJobs calls fn with every job write committed after revision after,
// in commit order, until ctx ends (nil) or fn fails (its error). jobID,
// when set, narrows the watch to that job. It returns ErrCompacted when
// the history after after is gone.
func (s *Store) WatchJobs(ctx context.Context, after int64, jobID string, fn func(JobChanges) error) error {
	key, opts := s.jobPrefix(), []clientv3.OpOption{clientv3.WithPrefix()}
	if jobID != "" {
		seq, err := strconv.ParseUint(jobID, 10, 64)
		if err != nil {
			return nil // not a job ID we could have written: nothing will ever change
		}
		key, opts = s.jobKey(seq), nil
	}
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	opts = append(opts, clientv3.WithRev(after+1), clientv3.WithPrevKV())
	ch := s.cli.Watch(ctx, key, opts...)
	progress := time.NewTicker(progressEvery)
	defer progress.Stop()
	idle := true
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-progress.C:
			if idle {
				// Best effort: a missed note only delays the next cursor.
				_ = s.cli.RequestProgress(ctx)
			}
			idle = true
		case resp, ok := <-ch:
			if !ok {
				if ctx.Err() != nil {
					return nil
				}
				return errors.New("store: watch closed")
			}
			if resp.CompactRevision != 0 {
				return fmt.Errorf("%w: history before revision %d is gone (asked for %d)", ErrCompacted, resp.CompactRevision, after+1)
			}
			if err := resp.Err(); err != nil {
				return fmt.Errorf("store: watch: %w", err)
			}
			batch, err := s.jobChanges(resp)
			if err != nil {
				return err
			}
			idle = len(resp.Events) == 0
			if batch.Revision <= after {
				continue // a progress note from before our start
			}
			after = batch.Revision
			if err := fn(batch); err != nil {
				return err
			}
		}
	}
}

// jobChanges decodes one watch response.
func (s *Store) jobChanges(resp clientv3.WatchResponse) (JobChanges, error) {
	var out JobChanges
	switch {
	case resp.IsProgressNotify():
		// Every write up to the header's revision has been delivered.
		out.Revision = resp.Header.Revision
	case len(resp.Events) > 0:
		// Later revisions may still be on their way in another response;
		// only the last event's revision is known to be complete.
		out.Revision = resp.Events[len(resp.Events)-1].Kv.ModRevision
	}
	for _, ev := range resp.Events {
		if ev.Type != clientv3.EventTypePut {
			continue // job records are never deleted today
		}
		cur, err := s.decodeJob(ev.Kv.Key, ev.Kv.Value)
		if err != nil {
			return out, err
		}
		c := JobChange{Job: cur}
		if ev.PrevKv != nil {
			if c.Prev, err = s.decodeJob(ev.PrevKv.Key, ev.PrevKv.Value); err != nil {
				return out, err
			}
		}
		out.Changes = append(out.Changes, c)
	}
	return out, nil
}

func (s *Store) decodeJob(key, value []byte) (*model.Job, error) {
	var p pb.Job
	if err := proto.Unmarshal(value, &p); err != nil {
		return nil, fmt.Errorf("store: decode %s: %w", key, err)
	}
	j := wire.JobFromProto(&p)
	seq, err := strconv.ParseUint(strings.TrimPrefix(string(key), s.jobPrefix()), 10, 64)
	if err != nil {
		return nil, fmt.Errorf("store: job key %s: %w", key, err)
	}
	j.Seq = seq
	return j, nil
}
