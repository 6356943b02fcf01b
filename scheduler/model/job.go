package model

import (
	"fmt"
	"time"
)

// JobState is where a job is in its life.
type JobState int

// Job states; see the JobState enum in proto/gpusched/v1/job.proto.
const (
	JobPending JobState = iota + 1
	JobScheduled
	JobRunning
	JobSucceeded
	JobFailed
	JobCancelled
	JobTimedOut
)

var jobStateNames = map[JobState]string{
	JobPending: "PENDING", JobScheduled: "SCHEDULED", JobRunning: "RUNNING",
	JobSucceeded: "SUCCEEDED", JobFailed: "FAILED", JobCancelled: "CANCELLED",
	JobTimedOut: "TIMED_OUT",
}

// String returns the state's API name, e.g. "RUNNING".
func (s JobState) String() string {
	if n, ok := jobStateNames[s]; ok {
		return n
	}
	return "UNKNOWN"
}

// Terminal reports whether the job has ended for good.
func (s JobState) Terminal() bool {
	return s == JobSucceeded || s == JobFailed || s == JobCancelled || s == JobTimedOut
}

// JobSpec is what the tenant asked for. It is immutable once accepted.
type JobSpec struct {
	Name        string
	Tenant      string
	Nodes       int
	GPUModel    string // canonical (gpumodel.Parse) or empty for any
	GPUsPerNode int    // minimum; 0 means any
	Command     []string
	Env         map[string]string
	TimeLimit   time.Duration // 0 means none
	// MaxRetries is how often the job is requeued when it loses a node.
	MaxRetries int
	// MinGPUMemoryBytes is the least memory each GPU must have; 0: any.
	MinGPUMemoryBytes uint64
	// Selector lists node labels every node must carry, exactly.
	Selector map[string]string
	// Topology keeps the gang in one domain: TopologySameRack or
	// TopologySameSwitch, required; PreferTopology the same, preferred.
	Topology       string
	PreferTopology string
	// Queue the job waits in, and its priority there (higher first).
	Queue    string
	Priority int
	// Labels are the tenant's own tags for finding the job again.
	Labels map[string]string
	// JobSet groups the jobs of one workflow run or sweep.
	JobSet string
}

// Gang topologies and the node label each is about.
const (
	TopologySameRack   = "same-rack"
	TopologySameSwitch = "same-switch"
)

// TopologyLabel returns the node label a topology groups by ("rack",
// "switch"), or "" for none.
func TopologyLabel(topology string) string {
	switch topology {
	case TopologySameRack:
		return "rack"
	case TopologySameSwitch:
		return "switch"
	}
	return ""
}

// NodeExit is how the command ended on one node of a lease.
type NodeExit struct {
	Node     string
	Rank     int
	ExitCode int
	Signal   string
	Message  string
	Time     time.Time
}

// Success reports whether the node's command exited 0.
func (e NodeExit) Success() bool { return e.ExitCode == 0 && e.Signal == "" }

// Job is a submitted job. Seq orders jobs by submission (FIFO) and is the
// source of the decimal ID.
type Job struct {
	ID           string
	Seq          uint64
	Spec         JobSpec
	State        JobState
	Reason       string
	LeaseID      string
	Nodes        []string
	CreateTime   time.Time
	ScheduleTime time.Time
	StartTime    time.Time
	EndTime      time.Time
	Exits        []NodeExit
	Attempts     int
	// Retries counts requeues after a lost node.
	Retries int
	// Events on its leases' nodes while they held them, oldest first.
	Events []NodeEvent
	// IdempotencyKey is the key it was submitted with, if any.
	IdempotencyKey string
	// Transitions is every state change, oldest first. Its length is
	// bounded by the retry limit (at most 3 per lease plus the end).
	Transitions []Transition
	// LastLeaseSummary is what its last ended lease used; zero (empty
	// LeaseID) until a lease of the job has ended.
	LastLeaseSummary LeaseSummary
}

// Transition is one state change of a job. Seq counts a job's transitions
// from 1, so a watcher can tell a new one from one it has seen.
type Transition struct {
	Seq    int
	State  JobState
	Time   time.Time
	Reason string
}

// SetState moves the job to state, recording the transition. reason
// becomes the job's Reason too.
func (j *Job) SetState(state JobState, reason string, at time.Time) {
	j.State, j.Reason = state, reason
	j.Transitions = append(j.Transitions, Transition{Seq: j.lastSeq() + 1, State: state, Time: at, Reason: reason})
}

func (j *Job) lastSeq() int {
	if j == nil || len(j.Transitions) == 0 {
		return 0
	}
	return j.Transitions[len(j.Transitions)-1].Seq
}

// NewTransitions returns the transitions cur has that prev (the same job
// at an earlier point, or nil) had not: what happened between the two.
func NewTransitions(prev, cur *Job) []Transition {
	seen := prev.lastSeq()
	i := len(cur.Transitions)
	for i > 0 && cur.Transitions[i-1].Seq > seen {
		i--
	}
	return cur.Transitions[i:]
}

// Idempotency maps a tenant's idempotency key to the job it created.
type Idempotency struct {
	Tenant, Key, JobID string
	CreateTime         time.Time
}

// MaxIdempotencyKeyLen bounds an idempotency key.
const MaxIdempotencyKeyLen = 256

// ValidateIdempotencyKey checks a key: printable, no control characters.
func ValidateIdempotencyKey(key string) error {
	if len(key) > MaxIdempotencyKeyLen {
		return &ValidationError{Violations: []FieldViolation{{Field: "idempotency_key", Description: fmt.Sprintf("must be at most %d characters", MaxIdempotencyKeyLen)}}}
	}
	for _, r := range key {
		if r < 0x20 || r == 0x7f {
			return &ValidationError{Violations: []FieldViolation{{Field: "idempotency_key", Description: "must not contain control characters"}}}
		}
	}
	return nil
}

// Clone returns a deep copy, so snapshots handed out of the scheduler's loop
// never alias its state.
func (j *Job) Clone() *Job {
	c := *j
	c.Spec.Command = append([]string(nil), j.Spec.Command...)
	c.Spec.Selector = cloneMap(j.Spec.Selector)
	c.Spec.Labels = cloneMap(j.Spec.Labels)
	c.Transitions = append([]Transition(nil), j.Transitions...)
	if j.Spec.Env != nil {
		c.Spec.Env = make(map[string]string, len(j.Spec.Env))
		for k, v := range j.Spec.Env {
			c.Spec.Env[k] = v
		}
	}
	c.Nodes = append([]string(nil), j.Nodes...)
	c.Exits = append([]NodeExit(nil), j.Exits...)
	c.Events = append([]NodeEvent(nil), j.Events...)
	return &c
}

// MaxSubmitBatch bounds the jobs of one batch submission.
const MaxSubmitBatch = 1000

// ValidateBatchSize checks the item count of a batch submission.
func ValidateBatchSize(n int) error {
	if n < 1 || n > MaxSubmitBatch {
		return &ValidationError{Violations: []FieldViolation{{Field: "items", Description: fmt.Sprintf("must hold 1 to %d submissions, got %d", MaxSubmitBatch, n)}}}
	}
	return nil
}
