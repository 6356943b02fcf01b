package model

import (
	"fmt"
	"slices"
)

// JobSelector picks jobs by their attributes. Empty fields match all; a
// job must match every field that is set.
type JobSelector struct {
	IDs     []string
	States  []JobState
	Queues  []string
	Tenants []string
	Labels  map[string]string
	JobSet  string
}

// Validate checks a selector given by a client; field paths start with
// prefix (e.g. "selector").
func (s JobSelector) Validate(prefix string) error {
	var v ValidationError
	for i, id := range s.IDs {
		if err := ValidateID(fmt.Sprintf("%s.ids[%d]", prefix, i), id); err != nil {
			v.Violations = append(v.Violations, err.(*ValidationError).Violations...)
		}
	}
	for i, st := range s.States {
		if _, ok := jobStateNames[st]; !ok {
			v.add(fmt.Sprintf("%s.states[%d]", prefix, i), "unknown job state")
		}
	}
	validateLabels(&v, prefix+".labels", s.Labels)
	return v.err()
}

// Matches reports whether job j is selected, ignoring States (a watch
// applies them to the transition, a list to the job's current state).
func (s JobSelector) Matches(j *Job) bool {
	switch {
	case len(s.IDs) > 0 && !slices.Contains(s.IDs, j.ID):
		return false
	case len(s.Queues) > 0 && !slices.Contains(s.Queues, j.Spec.Queue):
		return false
	case len(s.Tenants) > 0 && !slices.Contains(s.Tenants, j.Spec.Tenant):
		return false
	case s.JobSet != "" && s.JobSet != j.Spec.JobSet:
		return false
	}
	for k, want := range s.Labels {
		if got, ok := j.Spec.Labels[k]; !ok || got != want {
			return false
		}
	}
	return true
}

// MatchesState reports whether state passes the States filter.
func (s JobSelector) MatchesState(state JobState) bool {
	return len(s.States) == 0 || slices.Contains(s.States, state)
}
