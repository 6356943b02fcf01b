package engine

import (
	"slices"
	"sort"
	"strconv"

	"github.com/gpusched/gpusched/scheduler/model"
)

// Page limits for ListJobs.
const (
	DefaultPageSize = 500
	MaxPageSize     = 5000
)

// GetJob returns a copy of one job.
func (e *Engine) GetJob(id string) (*model.Job, error) {
	if err := model.ValidateID("id", id); err != nil {
		return nil, err
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	j, ok := e.findJob(id)
	if !ok {
		return nil, model.Errorf(model.ErrNotFound, "job %s not found", id)
	}
	return e.view(j)
}

// JobFilter selects jobs for ListJobs.
type JobFilter struct {
	Selector  model.JobSelector // States match the job's current state
	PageSize  int
	PageToken string // the last job ID of the previous page
}

// JobPage is one page of ListJobs.
type JobPage struct {
	Jobs []*model.Job
	// NextPageToken is empty on the last page.
	NextPageToken string
	// Revision is the etcd revision the page reflects: watching job changes
	// after it misses nothing and repeats nothing the page already shows.
	Revision int64
}

// ListJobs returns matching jobs in ID (submission) order, a page at a time.
func (e *Engine) ListJobs(f JobFilter) (JobPage, error) {
	size := f.PageSize
	switch {
	case size < 0:
		return JobPage{}, &model.ValidationError{Violations: []model.FieldViolation{{Field: "page_size", Description: "must not be negative"}}}
	case size == 0:
		size = DefaultPageSize
	case size > MaxPageSize:
		size = MaxPageSize
	}
	var after uint64
	if f.PageToken != "" {
		var err error
		if after, err = strconv.ParseUint(f.PageToken, 10, 64); err != nil {
			return JobPage{}, &model.ValidationError{Violations: []model.FieldViolation{{Field: "page_token", Description: "is not a token from a previous response"}}}
		}
	}
	sel := &f.Selector
	var buf [20]byte
	match := func(seq uint64) (jobRef, bool) {
		j, ok := e.jobAt(seq, buf[:])
		return j, ok && e.matches(j, sel)
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	page := JobPage{Revision: e.rev}
	candidates := e.order
	if len(sel.IDs) > 0 {
		// A handful of IDs: look them up instead of scanning every job.
		candidates = nil
		for _, id := range sel.IDs {
			if j, ok := e.findJob(id); ok {
				candidates = append(candidates, j.seq)
			}
		}
		slices.Sort(candidates)
		candidates = slices.Compact(candidates)
	}
	i := sort.Search(len(candidates), func(i int) bool { return candidates[i] > after })
	for ; i < len(candidates) && len(page.Jobs) < size; i++ {
		if j, ok := match(candidates[i]); ok {
			v, err := e.view(j)
			if err != nil {
				return JobPage{}, err
			}
			page.Jobs = append(page.Jobs, v)
		}
	}
	// Hand out a token only if another matching job exists, so a client
	// never fetches a final, empty page.
	for ; i < len(candidates) && len(page.Jobs) == size; i++ {
		if _, ok := match(candidates[i]); ok {
			page.NextPageToken = page.Jobs[len(page.Jobs)-1].ID
			break
		}
	}
	return page, nil
}

// GetNode returns one node as clients see it.
func (e *Engine) GetNode(id string) (*model.Node, error) {
	if err := model.ValidateID("id", id); err != nil {
		return nil, err
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	n, ok := e.nodes[id]
	if !ok {
		return nil, model.Errorf(model.ErrNotFound, "node %s not found", id)
	}
	return e.nodeView(n), nil
}

// ListNodes returns nodes in name order, optionally filtered by state.
func (e *Engine) ListNodes(states []model.NodeState) []*model.Node {
	want := map[model.NodeState]bool{}
	for _, s := range states {
		want[s] = true
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	out := make([]*model.Node, 0, len(e.nodes))
	for _, n := range e.nodes {
		v := e.nodeView(n)
		if len(want) == 0 || want[v.State] {
			out = append(out, v)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// nodeView adds the job holding the node to its view.
func (e *Engine) nodeView(n *nodeEntry) *model.Node {
	v := n.view()
	if l, ok := e.findLease(v.LeaseID); ok {
		v.JobID = l.jobID()
	}
	return v
}
