package model

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

// valid returns a spec that passes validation; cases change one thing.
func valid() JobSpec {
	return JobSpec{Name: "train", Tenant: "acme", Nodes: 2, GPUModel: "H100", GPUsPerNode: 8,
		Command: []string{"python", "train.py"}, Env: map[string]string{"EPOCHS": "3"}, TimeLimit: time.Hour}
}

// violation is an expected FieldViolation: the exact field and a fragment
// of its description.
type violation struct{ field, fragment string }

func TestNormalizeJobSpecRejects(t *testing.T) {
	cases := []struct {
		name   string
		change func(s *JobSpec)
		want   []violation
	}{
		{"zero nodes are rejected", func(s *JobSpec) { s.Nodes = 0 }, []violation{{"spec.nodes", "at least 1, got 0"}}},
		{"negative nodes are rejected", func(s *JobSpec) { s.Nodes = -3 }, []violation{{"spec.nodes", "at least 1, got -3"}}},
		{"more nodes than a job may ask for are rejected", func(s *JobSpec) { s.Nodes = MaxJobNodes + 1 },
			[]violation{{"spec.nodes", fmt.Sprintf("at most %d", MaxJobNodes)}}},
		{"a name longer than the limit is rejected", func(s *JobSpec) { s.Name = strings.Repeat("n", MaxNameLen+1) },
			[]violation{{"spec.name", "at most 128 characters"}}},
		{"a tenant with a slash is rejected", func(s *JobSpec) { s.Tenant = "acme/evil" }, []violation{{"spec.tenant", "letters, digits"}}},
		{"a tenant starting with a dot is rejected", func(s *JobSpec) { s.Tenant = ".acme" }, []violation{{"spec.tenant", "starting with a letter or digit"}}},
		{"a tenant longer than the limit is rejected", func(s *JobSpec) { s.Tenant = strings.Repeat("t", MaxNameLen+1) },
			[]violation{{"spec.tenant", "letters, digits"}}},
		{"an unknown GPU model is rejected and the known ones are listed", func(s *JobSpec) { s.GPUModel = "H1000" },
			[]violation{{"spec.gpu_model", `unknown GPU model "H1000" (known: `}}},
		{"negative GPUs per node are rejected", func(s *JobSpec) { s.GPUsPerNode = -1 },
			[]violation{{"spec.gpus_per_node", "between 0 and 64, got -1"}}},
		{"more GPUs per node than any machine has are rejected", func(s *JobSpec) { s.GPUsPerNode = MaxGPUsPerNode + 1 },
			[]violation{{"spec.gpus_per_node", "between 0 and 64, got 65"}}},
		{"an unknown topology is rejected", func(s *JobSpec) { s.Topology = "same-row" },
			[]violation{{"spec.topology", `must be "same-rack" or "same-switch", got "same-row"`}}},
		{"required and preferred topology together are rejected", func(s *JobSpec) { s.Topology, s.PreferTopology = TopologySameRack, TopologySameSwitch },
			[]violation{{"spec.prefer_topology", "must not be set together with spec.topology"}}},
		{"a selector key with a space is rejected", func(s *JobSpec) { s.Selector = map[string]string{"po ol": "x"} },
			[]violation{{"spec.selector", `key "po ol"`}}},
		{"a selector value with a comma is rejected", func(s *JobSpec) { s.Selector = map[string]string{"pool": "a,b"} },
			[]violation{{"spec.selector", `value "a,b" of "pool"`}}},
		{"a priority above the maximum is rejected", func(s *JobSpec) { s.Priority = MaxPriority + 1 },
			[]violation{{"spec.priority", "between -1000 and 1000, got 1001"}}},
		{"a queue name with a slash is rejected", func(s *JobSpec) { s.Queue = "a/b" },
			[]violation{{"spec.queue", "letters, digits"}}},
		{"negative max retries are rejected", func(s *JobSpec) { s.MaxRetries = -1 },
			[]violation{{"spec.max_retries", "between 0 and 100, got -1"}}},
		{"too many max retries are rejected", func(s *JobSpec) { s.MaxRetries = MaxRetries + 1 },
			[]violation{{"spec.max_retries", "between 0 and 100, got 101"}}},
		{"a missing command is rejected", func(s *JobSpec) { s.Command = nil }, []violation{{"spec.command", "must not be empty"}}},
		{"a blank program is rejected", func(s *JobSpec) { s.Command = []string{"  ", "x"} },
			[]violation{{"spec.command", "program (first word) must not be empty"}}},
		{"a NUL byte in an argument is rejected", func(s *JobSpec) { s.Command = []string{"sh", "a\x00b"} },
			[]violation{{"spec.command", "NUL"}}},
		{"a command larger than the limit is rejected", func(s *JobSpec) { s.Command = []string{"sh", strings.Repeat("x", MaxCommandBytes)} },
			[]violation{{"spec.command", "at most 65536 bytes"}}},
		{"a negative time limit is rejected", func(s *JobSpec) { s.TimeLimit = -time.Second },
			[]violation{{"spec.time_limit", "must not be negative, got -1s"}}},
		{"a time limit over a year is rejected", func(s *JobSpec) { s.TimeLimit = MaxTimeLimit + time.Hour },
			[]violation{{"spec.time_limit", "must be at most"}}},
		{"too many env entries are rejected", func(s *JobSpec) {
			s.Env = map[string]string{}
			for i := 0; i <= MaxEnvEntries; i++ {
				s.Env[fmt.Sprintf("V%d", i)] = "x"
			}
		}, []violation{{"spec.env", "at most 256 entries"}}},
		{"an env key that is not a variable name is rejected", func(s *JobSpec) { s.Env = map[string]string{"1BAD": "x"} },
			[]violation{{"spec.env", `key "1BAD" is not a valid variable name`}}},
		{"an env key with a dash is rejected", func(s *JobSpec) { s.Env = map[string]string{"MY-VAR": "x"} },
			[]violation{{"spec.env", `key "MY-VAR" is not a valid variable name`}}},
		{"CUDA_VISIBLE_DEVICES is reserved for the agent", func(s *JobSpec) { s.Env = map[string]string{"CUDA_VISIBLE_DEVICES": "0"} },
			[]violation{{"spec.env", `key "CUDA_VISIBLE_DEVICES" is set by gpusched itself`}}},
		{"GPUSCHED_ variables are reserved for the agent", func(s *JobSpec) { s.Env = map[string]string{"GPUSCHED_RANK": "3"} },
			[]violation{{"spec.env", `key "GPUSCHED_RANK" is set by gpusched itself`}}},
		{"several bad env keys are each reported, in key order", func(s *JobSpec) {
			s.Env = map[string]string{"GPUSCHED_X": "1", "0X": "2", "CUDA_VISIBLE_DEVICES": "3", "OK": "4"}
		}, []violation{
			{"spec.env", `key "0X" is not a valid variable name`},
			{"spec.env", `key "CUDA_VISIBLE_DEVICES" is set by gpusched itself`},
			{"spec.env", `key "GPUSCHED_X" is set by gpusched itself`},
		}},
		{"every violation of one request is reported at once, in field order", func(s *JobSpec) {
			*s = JobSpec{Name: strings.Repeat("n", 200), Tenant: "bad tenant", Nodes: 0, GPUModel: "Z9",
				GPUsPerNode: 99, TimeLimit: -time.Minute, Env: map[string]string{"GPUSCHED_JOB": "x"}}
		}, []violation{
			{"spec.name", "at most"},
			{"spec.tenant", "letters"},
			{"spec.nodes", "at least 1"},
			{"spec.gpu_model", "unknown GPU model"},
			{"spec.gpus_per_node", "between 0 and 64"},
			{"spec.command", "must not be empty"},
			{"spec.time_limit", "must not be negative"},
			{"spec.env", "set by gpusched itself"},
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := valid()
			c.change(&s)
			_, err := NormalizeJobSpec(s)
			checkViolations(t, err, c.want)
		})
	}
}

func checkViolations(t *testing.T, err error, want []violation) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error; want violations %v", want)
	}
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("errors.Is(%v, ErrInvalid) = false", err)
	}
	var verr *ValidationError
	if !errors.As(err, &verr) {
		t.Fatalf("error %T %v is not a *ValidationError", err, err)
	}
	if len(verr.Violations) != len(want) {
		t.Fatalf("got %d violations %+v; want %d %v", len(verr.Violations), verr.Violations, len(want), want)
	}
	for i, w := range want {
		got := verr.Violations[i]
		if got.Field != w.field || !strings.Contains(got.Description, w.fragment) {
			t.Errorf("violation %d = %s: %q; want %s: ...%q...", i, got.Field, got.Description, w.field, w.fragment)
		}
		if !strings.Contains(err.Error(), got.Field+": "+got.Description) {
			t.Errorf("Error() = %q does not name violation %d", err.Error(), i)
		}
	}
}

func TestNormalizeJobSpecAccepts(t *testing.T) {
	cases := []struct {
		name   string
		change func(s *JobSpec)
		want   func(s *JobSpec) // the canonical form, from valid()
	}{
		{"a valid spec comes back unchanged", func(*JobSpec) {}, func(*JobSpec) {}},
		{"an empty tenant becomes the default tenant", func(s *JobSpec) { s.Tenant = "" }, func(s *JobSpec) { s.Tenant = "default" }},
		{"a lower-case GPU model is canonicalised", func(s *JobSpec) { s.GPUModel = "h100" }, func(s *JobSpec) { s.GPUModel = "H100" }},
		{"a GPU model with spaces around it is canonicalised", func(s *JobSpec) { s.GPUModel = " a100 " }, func(s *JobSpec) { s.GPUModel = "A100" }},
		{"an empty GPU model means any and stays empty", func(s *JobSpec) { s.GPUModel = "" }, func(s *JobSpec) { s.GPUModel = "" }},
		{"zero GPUs per node means any", func(s *JobSpec) { s.GPUsPerNode = 0 }, func(s *JobSpec) { s.GPUsPerNode = 0 }},
		{"zero time limit means none", func(s *JobSpec) { s.TimeLimit = 0 }, func(s *JobSpec) { s.TimeLimit = 0 }},
		{"the limits themselves are allowed", func(s *JobSpec) {
			s.Nodes, s.GPUsPerNode, s.TimeLimit, s.Name = MaxJobNodes, MaxGPUsPerNode, MaxTimeLimit, strings.Repeat("n", MaxNameLen)
		}, func(s *JobSpec) {
			s.Nodes, s.GPUsPerNode, s.TimeLimit, s.Name = MaxJobNodes, MaxGPUsPerNode, MaxTimeLimit, strings.Repeat("n", MaxNameLen)
		}},
		{"a name may contain any characters", func(s *JobSpec) { s.Name = "my job / v2 ✓" }, func(s *JobSpec) { s.Name = "my job / v2 ✓" }},
		{"env keys merely containing GPUSCHED are allowed", func(s *JobSpec) { s.Env = map[string]string{"MY_GPUSCHED_X": "1", "_x9": ""} },
			func(s *JobSpec) { s.Env = map[string]string{"MY_GPUSCHED_X": "1", "_x9": ""} }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in, want := valid(), valid()
			want.Queue = DefaultQueue // an empty queue is the default one
			c.change(&in)
			c.want(&want)
			got, err := NormalizeJobSpec(in)
			if err != nil {
				t.Fatalf("NormalizeJobSpec: %v", err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("NormalizeJobSpec = %+v; want %+v", got, want)
			}
		})
	}
}

func TestValidateID(t *testing.T) {
	cases := []struct {
		name, field, id string
		fragment        string // empty: valid
	}{
		{"a decimal job ID is valid", "id", "42", ""},
		{"a node name with dots and dashes is valid", "id", "gpu-node-01.rack3", ""},
		{"an ID at the length limit is valid", "id", strings.Repeat("a", MaxNameLen), ""},
		{"an empty ID is rejected", "id", "", "must not be empty"},
		{"an ID longer than the limit is rejected", "id", strings.Repeat("a", MaxNameLen+1), "is not a valid ID"},
		{"an ID with a slash is rejected", "id", "../etc", `"../etc" is not a valid ID`},
		{"an ID starting with a dash is rejected", "node_id", "-x", "is not a valid ID"},
		{"an ID with a space is rejected", "hello.node_id", "a b", "is not a valid ID"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := ValidateID(c.field, c.id)
			if c.fragment == "" {
				if err != nil {
					t.Fatalf("ValidateID(%q) = %v; want nil", c.id, err)
				}
				return
			}
			checkViolations(t, err, []violation{{c.field, c.fragment}})
		})
	}
}

func TestErrorfKeepsTheSentinelWithoutRepeatingIt(t *testing.T) {
	err := Errorf(ErrNotFound, "job %s not found", "9")
	if err.Error() != "job 9 not found" {
		t.Errorf("Error() = %q", err.Error())
	}
	if !errors.Is(err, ErrNotFound) || errors.Is(err, ErrInvalid) {
		t.Errorf("errors.Is does not see exactly ErrNotFound in %v", err)
	}
	if errors.Is(error(&ValidationError{}), ErrNotFound) {
		t.Error("a validation error must not match ErrNotFound")
	}
}

func TestStateNames(t *testing.T) {
	cases := []struct {
		name string
		got  fmt.Stringer
		want string
	}{
		{"an unknown job state is UNKNOWN", JobState(0), "UNKNOWN"},
		{"an out-of-range job state is UNKNOWN", JobState(99), "UNKNOWN"},
		{"an unknown node state is UNKNOWN", NodeState(0), "UNKNOWN"},
		{"timed out is spelled with an underscore", JobTimedOut, "TIMED_OUT"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if s := c.got.String(); s != c.want {
				t.Fatalf("String() = %q; want %q", s, c.want)
			}
		})
	}
	terminal := map[JobState]bool{JobSucceeded: true, JobFailed: true, JobCancelled: true, JobTimedOut: true}
	for s := JobPending; s <= JobTimedOut; s++ {
		if s.Terminal() != terminal[s] {
			t.Errorf("%s.Terminal() = %v", s, s.Terminal())
		}
	}
}

func TestCloneDoesNotAlias(t *testing.T) {
	j := &Job{ID: "1", Spec: JobSpec{Command: []string{"a"}, Env: map[string]string{"K": "v"}}, Nodes: []string{"n1"},
		Exits: []NodeExit{{Node: "n1"}}}
	c := j.Clone()
	c.Spec.Command[0], c.Spec.Env["K"], c.Nodes[0], c.Exits[0].Node = "x", "x", "x", "x"
	if j.Spec.Command[0] != "a" || j.Spec.Env["K"] != "v" || j.Nodes[0] != "n1" || j.Exits[0].Node != "n1" {
		t.Errorf("Job.Clone aliases the original: %+v", j)
	}
	n := &Node{ID: "n", Labels: map[string]string{"rack": "1"}, Inventory: Inventory{GPUs: []GPU{{UUID: "u"}}}}
	nc := n.Clone()
	nc.Labels["rack"], nc.Inventory.GPUs[0].UUID = "2", "x"
	if n.Labels["rack"] != "1" || n.Inventory.GPUs[0].UUID != "u" {
		t.Errorf("Node.Clone aliases the original: %+v", n)
	}
	l := &Lease{ID: "1.1", Nodes: []LeaseNode{{Node: "n", GPUUUIDs: []string{"u"}}}}
	lc := l.Clone()
	lc.Nodes[0].Node, lc.Nodes[0].GPUUUIDs[0] = "x", "x"
	if l.Nodes[0].Node != "n" || l.Nodes[0].GPUUUIDs[0] != "u" {
		t.Errorf("Lease.Clone aliases the original: %+v", l)
	}
	if got := LeaseID("42", 3); got != "42.3" {
		t.Errorf("LeaseID = %q", got)
	}
	if got := l.NodeNames(); !reflect.DeepEqual(got, []string{"n"}) {
		t.Errorf("NodeNames = %v", got)
	}
}

func TestValidateLabelChange(t *testing.T) {
	cases := []struct {
		name   string
		set    map[string]string
		remove []string
		field  string // "" = valid
	}{
		{"setting a rack label is valid", map[string]string{"rack": "r1"}, nil, ""},
		{"removing a label is valid", nil, []string{"pool"}, ""},
		{"a change with nothing in it is rejected", nil, nil, "set"},
		{"a bad key to remove is rejected", nil, []string{"a b"}, "remove[0]"},
		{"an empty value is allowed", map[string]string{"gpu-fabric": ""}, nil, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := ValidateLabelChange(c.set, c.remove)
			var verr *ValidationError
			switch {
			case c.field == "" && err != nil:
				t.Fatalf("unexpected error %v", err)
			case c.field != "" && (!errors.As(err, &verr) || verr.Violations[0].Field != c.field):
				t.Fatalf("error %v; want a violation of %s", err, c.field)
			}
		})
	}
}

func TestEffectiveLabelsLetOperatorsWin(t *testing.T) {
	n := &Node{Labels: map[string]string{"rack": "r1", "zone": "z1"}, OperatorLabels: map[string]string{"rack": "r9"}}
	got := n.EffectiveLabels()
	if got["rack"] != "r9" || got["zone"] != "z1" || len(got) != 2 {
		t.Fatalf("effective labels = %v", got)
	}
}
