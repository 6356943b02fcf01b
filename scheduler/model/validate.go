package model

import (
	"fmt"
	"maps"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/gpusched/gpusched/internal/gpumodel"
)

// Limits on a job spec. They bound what one request can make the scheduler
// hold in memory and etcd, not what a cluster may contain.
const (
	MaxJobNodes     = 10000
	MaxGPUsPerNode  = 64
	MaxNameLen      = 128
	MaxTimeLimit    = 366 * 24 * time.Hour
	MaxCommandBytes = 64 << 10
	MaxEnvEntries   = 256
	MaxRetries      = 100
	// DefaultMaxRetries applies when a job does not say.
	DefaultMaxRetries = 1
	DefaultTenant     = "default"
)

var (
	envKeyRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	nameRE   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)
)

// reservedEnv are variables the agent sets itself for every lease.
func reservedEnv(key string) bool {
	return strings.HasPrefix(key, "GPUSCHED_") || key == "CUDA_VISIBLE_DEVICES"
}

// NormalizeJobSpec validates a submitted spec and returns it in canonical
// form (default tenant, canonical GPU model). Field paths are relative to
// the SubmitJobRequest, e.g. "spec.nodes".
func NormalizeJobSpec(s JobSpec) (JobSpec, error) {
	var v ValidationError
	if len(s.Name) > MaxNameLen {
		v.add("spec.name", fmt.Sprintf("must be at most %d characters", MaxNameLen))
	}
	if s.Tenant == "" {
		s.Tenant = DefaultTenant
	} else if !nameRE.MatchString(s.Tenant) || len(s.Tenant) > MaxNameLen {
		v.add("spec.tenant", "must be letters, digits, '.', '_' or '-', starting with a letter or digit")
	}
	switch {
	case s.Nodes < 1:
		v.add("spec.nodes", fmt.Sprintf("must be at least 1, got %d", s.Nodes))
	case s.Nodes > MaxJobNodes:
		v.add("spec.nodes", fmt.Sprintf("must be at most %d, got %d", MaxJobNodes, s.Nodes))
	}
	if s.GPUModel != "" {
		m, err := gpumodel.Parse(s.GPUModel)
		if err != nil {
			v.add("spec.gpu_model", fmt.Sprintf("unknown GPU model %q (known: %s)", s.GPUModel, strings.Join(gpumodel.Known(), ", ")))
		}
		s.GPUModel = m
	}
	if s.GPUsPerNode < 0 || s.GPUsPerNode > MaxGPUsPerNode {
		v.add("spec.gpus_per_node", fmt.Sprintf("must be between 0 and %d, got %d", MaxGPUsPerNode, s.GPUsPerNode))
	}
	validateCommand(&v, s.Command)
	if s.TimeLimit < 0 {
		v.add("spec.time_limit", fmt.Sprintf("must not be negative, got %s", s.TimeLimit))
	} else if s.TimeLimit > MaxTimeLimit {
		v.add("spec.time_limit", fmt.Sprintf("must be at most %s", MaxTimeLimit))
	}
	validateLabels(&v, "spec.selector", s.Selector)
	validateLabels(&v, "spec.labels", s.Labels)
	if s.JobSet != "" && (len(s.JobSet) > MaxLabelValueLen || !labelValueRE.MatchString(s.JobSet)) {
		v.add("spec.job_set", fmt.Sprintf("must be at most %d letters, digits, '.', '_' or '-', starting and ending with a letter or digit", MaxLabelValueLen))
	}
	for _, t := range []struct{ field, value string }{{"spec.topology", s.Topology}, {"spec.prefer_topology", s.PreferTopology}} {
		if t.value != "" && TopologyLabel(t.value) == "" {
			v.add(t.field, fmt.Sprintf("must be %q or %q, got %q", TopologySameRack, TopologySameSwitch, t.value))
		}
	}
	if s.Topology != "" && s.PreferTopology != "" {
		v.add("spec.prefer_topology", "must not be set together with spec.topology")
	}
	if s.Queue == "" {
		s.Queue = DefaultQueue
	} else if !nameRE.MatchString(s.Queue) || len(s.Queue) > MaxNameLen {
		v.add("spec.queue", "must be letters, digits, '.', '_' or '-', starting with a letter or digit")
	}
	if s.Priority < MinPriority || s.Priority > MaxPriority {
		v.add("spec.priority", fmt.Sprintf("must be between %d and %d, got %d", MinPriority, MaxPriority, s.Priority))
	}
	if s.MaxRetries < 0 || s.MaxRetries > MaxRetries {
		v.add("spec.max_retries", fmt.Sprintf("must be between 0 and %d, got %d", MaxRetries, s.MaxRetries))
	}
	if len(s.Env) > MaxEnvEntries {
		v.add("spec.env", fmt.Sprintf("must have at most %d entries", MaxEnvEntries))
	}
	// Sorted, so the same request always gets the same error.
	for _, k := range slices.Sorted(maps.Keys(s.Env)) {
		switch {
		case !envKeyRE.MatchString(k):
			v.add("spec.env", fmt.Sprintf("key %q is not a valid variable name", k))
		case reservedEnv(k):
			v.add("spec.env", fmt.Sprintf("key %q is set by gpusched itself", k))
		}
	}
	return s, v.err()
}

func validateCommand(v *ValidationError, cmd []string) {
	if len(cmd) == 0 {
		v.add("spec.command", "must not be empty")
		return
	}
	if strings.TrimSpace(cmd[0]) == "" {
		v.add("spec.command", "program (first word) must not be empty")
	}
	size := 0
	for _, a := range cmd {
		size += len(a)
		if strings.IndexByte(a, 0) >= 0 {
			v.add("spec.command", "must not contain NUL bytes")
			return
		}
	}
	if size > MaxCommandBytes {
		v.add("spec.command", fmt.Sprintf("must be at most %d bytes in all", MaxCommandBytes))
	}
}

// Label limits, as Kubernetes has them: keys and values stay short and
// printable so they fit in tables and selectors.
const (
	MaxLabels        = 64
	MaxLabelKeyLen   = 63
	MaxLabelValueLen = 63
)

var (
	labelKeyRE   = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$`)
	labelValueRE = regexp.MustCompile(`^([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?$`)
)

// validateLabels checks a label map (selector or node labels) in key order.
func validateLabels(v *ValidationError, field string, labels map[string]string) {
	if len(labels) > MaxLabels {
		v.add(field, fmt.Sprintf("must have at most %d labels", MaxLabels))
	}
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		switch val := labels[k]; {
		case len(k) > MaxLabelKeyLen || !labelKeyRE.MatchString(k):
			v.add(field, fmt.Sprintf("key %q must be 1-%d letters, digits, '.', '_', '/' or '-', starting and ending with a letter or digit", k, MaxLabelKeyLen))
		case len(val) > MaxLabelValueLen || !labelValueRE.MatchString(val):
			v.add(field, fmt.Sprintf("value %q of %q must be at most %d letters, digits, '.', '_' or '-', starting and ending with a letter or digit", val, k, MaxLabelValueLen))
		}
	}
}

// ValidateLabelChange checks an operator's label update of a node.
func ValidateLabelChange(set map[string]string, remove []string) error {
	var v ValidationError
	validateLabels(&v, "set", set)
	for i, k := range remove {
		if len(k) > MaxLabelKeyLen || !labelKeyRE.MatchString(k) {
			v.add(fmt.Sprintf("remove[%d]", i), fmt.Sprintf("%q is not a label key", k))
		}
	}
	if len(set) == 0 && len(remove) == 0 {
		v.add("set", "give labels to set or keys to remove")
	}
	return v.err()
}

// ValidateID checks a job or node ID given by a client.
func ValidateID(field, id string) error {
	if id == "" {
		return &ValidationError{Violations: []FieldViolation{{field, "must not be empty"}}}
	}
	if len(id) > MaxNameLen || !nameRE.MatchString(id) {
		return &ValidationError{Violations: []FieldViolation{{field, fmt.Sprintf("%q is not a valid ID", id)}}}
	}
	return nil
}
