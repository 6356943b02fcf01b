package telemetry

import (
	"context"
	"sync"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// subscriber is one watcher's bounded queue of matching batches. Publish
// pushes (never blocking); the watcher's own goroutine pops and sends.
// The queue is bounded in GPU samples: when full, the oldest batches are
// dropped and their samples counted, to be reported with the next message.
type subscriber struct {
	m    matcher
	max  int
	wake chan struct{}

	mu     sync.Mutex
	queue  []Entry
	head   int // queue[head:] is pending
	queued int // samples pending
	// ds, when set, downsamples in queue order, both what is delivered
	// and what is dropped, so drops count only samples the watcher would
	// have received.
	ds      *downsampler
	dropped uint64 // since the last pop
}

func newSubscriber(m matcher, max int) *subscriber {
	return &subscriber{m: m, max: max, wake: make(chan struct{}, 1)}
}

// push queues e, dropping the oldest batches while more than max samples
// are pending (the newest batch is always kept).
func (s *subscriber) push(e Entry) {
	s.mu.Lock()
	s.queue = append(s.queue, e)
	s.queued += len(e.Batch.GetSamples())
	for s.queued > s.max && len(s.queue)-s.head > 1 {
		old := &s.queue[s.head]
		s.queued -= len(old.Batch.GetSamples())
		s.dropped += uint64(len(s.ds.filter(old)))
		*old = Entry{}
		s.head++
	}
	if s.head > 64 && s.head*2 >= len(s.queue) {
		n := copy(s.queue, s.queue[s.head:])
		clear(s.queue[n:])
		s.queue, s.head = s.queue[:n], 0
	}
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// popped is one delivered batch with the samples the downsampler kept.
type popped struct {
	e       Entry
	samples []*pb.GpuSample
}

// pop takes queued batches, oldest first, until they hold at least
// maxSamples kept samples or the queue is empty, and returns them with
// the samples dropped since the last pop. Batches whose samples were all
// downsampled away are left out.
func (s *subscriber) pop(maxSamples int) ([]popped, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []popped
	n := 0
	for s.head < len(s.queue) && n < maxSamples {
		e := s.queue[s.head]
		s.queue[s.head] = Entry{}
		s.head++
		s.queued -= len(e.Batch.GetSamples())
		if kept := s.ds.filter(&e); len(kept) > 0 {
			out = append(out, popped{e, kept})
			n += len(kept)
		}
	}
	if s.head == len(s.queue) {
		s.queue, s.head = s.queue[:0], 0
	}
	d := s.dropped
	s.dropped = 0
	return out, d
}

// pending reports whether anything is queued.
func (s *subscriber) pending() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.head < len(s.queue) || s.dropped > 0
}

// next waits until something is queued (or ctx ends) and pops it, as pop.
func (s *subscriber) next(ctx context.Context, maxSamples int) ([]popped, uint64, error) {
	if !s.pending() {
		select {
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-s.wake:
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, 0, err
	}
	batches, dropped := s.pop(maxSamples)
	return batches, dropped, nil
}
