package model

import (
	"fmt"
	"sort"
	"strings"

	"github.com/gpusched/gpusched/internal/gpumodel"
)

// DefaultQueue always exists; jobs that name no queue wait in it.
const DefaultQueue = "default"

// Limits on policy settings.
const (
	MinPriority = -1000
	MaxPriority = 1000
	MaxWeight   = 1000
)

// Tenant is who pays: its fair-share weight and hard node limits.
type Tenant struct {
	Name             string
	MaxNodes         int            // 0: unlimited
	MaxNodesPerModel map[string]int // canonical model -> cap
	Weight           float64        // > 0
}

// Queue orders jobs; a paused queue starts none.
type Queue struct {
	Name     string
	Priority int
	Weight   float64
	Paused   bool
}

// NormalizeTenant validates a tenant and fills defaults (weight 1,
// canonical model names).
func NormalizeTenant(t Tenant) (Tenant, error) {
	var v ValidationError
	if !nameRE.MatchString(t.Name) || len(t.Name) > MaxNameLen {
		v.add("tenant.name", "must be letters, digits, '.', '_' or '-', starting with a letter or digit")
	}
	if t.MaxNodes < 0 {
		v.add("tenant.max_nodes", fmt.Sprintf("must not be negative, got %d", t.MaxNodes))
	}
	t.Weight = normalizeWeight(&v, "tenant.weight", t.Weight)
	if len(t.MaxNodesPerModel) > 0 {
		caps := make(map[string]int, len(t.MaxNodesPerModel))
		keys := make([]string, 0, len(t.MaxNodesPerModel))
		for k := range t.MaxNodesPerModel {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			m, err := gpumodel.Parse(k)
			switch {
			case err != nil:
				v.add("tenant.max_nodes_per_model", fmt.Sprintf("unknown GPU model %q (known: %s)", k, strings.Join(gpumodel.Known(), ", ")))
			case t.MaxNodesPerModel[k] < 0:
				v.add("tenant.max_nodes_per_model", fmt.Sprintf("%s: must not be negative, got %d", k, t.MaxNodesPerModel[k]))
			default:
				caps[m] = t.MaxNodesPerModel[k]
			}
		}
		t.MaxNodesPerModel = caps
	}
	return t, v.err()
}

// NormalizeQueue validates a queue and fills defaults (weight 1).
func NormalizeQueue(q Queue) (Queue, error) {
	var v ValidationError
	if !nameRE.MatchString(q.Name) || len(q.Name) > MaxNameLen {
		v.add("queue.name", "must be letters, digits, '.', '_' or '-', starting with a letter or digit")
	}
	if q.Priority < MinPriority || q.Priority > MaxPriority {
		v.add("queue.priority", fmt.Sprintf("must be between %d and %d, got %d", MinPriority, MaxPriority, q.Priority))
	}
	q.Weight = normalizeWeight(&v, "queue.weight", q.Weight)
	return q, v.err()
}

func normalizeWeight(v *ValidationError, field string, w float64) float64 {
	switch {
	case w == 0:
		return 1
	case w < 0 || w > MaxWeight || w != w: // w != w: NaN
		v.add(field, fmt.Sprintf("must be between 0 and %d, got %v", MaxWeight, w))
	}
	return w
}
