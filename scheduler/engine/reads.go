package engine

import (
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
	j, ok := e.jobs[id]
	if !ok {
		return nil, model.Errorf(model.ErrNotFound, "job %s not found", id)
	}
	return j.Clone(), nil
}

// JobFilter selects jobs for ListJobs.
type JobFilter struct {
	States    []model.JobState // empty: all
	PageSize  int
	PageToken string // the last job ID of the previous page
}

// ListJobs returns jobs in ID (submission) order, a page at a time.
func (e *Engine) ListJobs(f JobFilter) ([]*model.Job, string, error) {
	size := f.PageSize
	switch {
	case size < 0:
		return nil, "", &model.ValidationError{Violations: []model.FieldViolation{{Field: "page_size", Description: "must not be negative"}}}
	case size == 0:
		size = DefaultPageSize
	case size > MaxPageSize:
		size = MaxPageSize
	}
	var after uint64
	if f.PageToken != "" {
		var err error
		if after, err = strconv.ParseUint(f.PageToken, 10, 64); err != nil {
			return nil, "", &model.ValidationError{Violations: []model.FieldViolation{{Field: "page_token", Description: "is not a token from a previous response"}}}
		}
	}
	want := map[model.JobState]bool{}
	for _, s := range f.States {
		want[s] = true
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	i := sort.Search(len(e.order), func(i int) bool { return e.order[i].Seq > after })
	var out []*model.Job
	for ; i < len(e.order) && len(out) < size; i++ {
		if j := e.order[i]; len(want) == 0 || want[j.State] {
			out = append(out, j.Clone())
		}
	}
	// Hand out a token only if another matching job exists, so a client
	// never fetches a final, empty page.
	next := ""
	for ; i < len(e.order) && len(out) == size; i++ {
		if len(want) == 0 || want[e.order[i].State] {
			next = out[len(out)-1].ID
			break
		}
	}
	return out, next, nil
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
	if le := e.leases[v.LeaseID]; le != nil {
		v.JobID = le.lease.JobID
	}
	return v
}
