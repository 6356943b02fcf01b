package telemetry

import (
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func TestHistory(t *testing.T) {
	h := New(Options{})
	for sec := int64(1); sec <= 6; sec++ {
		h.Publish("n2", "beta", leased(sec, "8.1", 1))
		h.Publish("n1", "acme", leased(sec, "7.1", 2))
	}
	utilOnly, err := ParseFields([]string{"gpu_util"})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name      string
		o         HistoryOptions
		want      []string
		truncated bool
	}{
		{"a node, oldest first", HistoryOptions{Filter: Filter{Nodes: []string{"n1"}}},
			[]string{"n1/0@1", "n1/1@1", "n1/0@2", "n1/1@2", "n1/0@3", "n1/1@3", "n1/0@4", "n1/1@4", "n1/0@5", "n1/1@5", "n1/0@6", "n1/1@6"}, false},
		{"a job", HistoryOptions{Filter: Filter{JobIDs: []string{"8"}}},
			[]string{"n2/0@1", "n2/0@2", "n2/0@3", "n2/0@4", "n2/0@5", "n2/0@6"}, false},
		{"every node: ties by node, then GPU", HistoryOptions{Since: time.Unix(6, 0)},
			[]string{"n1/0@6", "n1/1@6", "n2/0@6"}, false},
		{"since", HistoryOptions{Filter: Filter{LeaseIDs: []string{"7.1"}}, Since: time.Unix(5, 0)},
			[]string{"n1/0@5", "n1/1@5", "n1/0@6", "n1/1@6"}, false},
		{"every 2s", HistoryOptions{Filter: Filter{Nodes: []string{"n2"}}, Every: 2 * time.Second},
			[]string{"n2/0@1", "n2/0@2", "n2/0@4", "n2/0@6"}, false},
		{"a limit keeps the newest", HistoryOptions{Filter: Filter{Nodes: []string{"n1"}}, Limit: 3},
			[]string{"n1/1@5", "n1/0@6", "n1/1@6"}, true},
		{"a job that never ran on the node", HistoryOptions{Filter: Filter{Nodes: []string{"n2"}, JobIDs: []string{"7"}}}, nil, false},
		{"a tenant", HistoryOptions{Filter: Filter{Tenant: "beta"}, Since: time.Unix(5, 0)}, []string{"n2/0@5", "n2/0@6"}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, truncated := h.History(c.o)
			if !slices.Equal(keys(got), c.want) || truncated != c.truncated {
				t.Errorf("History = %v, truncated %v; want %v, truncated %v", keys(got), truncated, c.want, c.truncated)
			}
		})
	}
	got, _ := h.History(HistoryOptions{Filter: Filter{Nodes: []string{"n1"}}, Fields: utilOnly, Limit: 1})
	if want := (&pb.GpuSample{Gpu: 1, GpuUtil: 6}); len(got) != 1 || !proto.Equal(got[0].GetSample(), want) ||
		got[0].GetTenant() != "acme" || got[0].GetLeaseId() != "7.1" || got[0].GetJobId() != "7" {
		t.Errorf("History with fields = %v; want %v of lease 7.1, job 7, tenant acme", got, want)
	}
}

func TestHistoryLimitIsCapped(t *testing.T) {
	h := New(Options{History: MaxHistoryLimit + 10})
	for sec := range int64(MaxHistoryLimit + 10) {
		h.Publish("a", "", batch(sec, "", 1))
	}
	if got, truncated := h.History(HistoryOptions{Limit: MaxHistoryLimit * 2}); len(got) != MaxHistoryLimit || !truncated {
		t.Errorf("History returned %d samples (truncated %v); want %d, truncated", len(got), truncated, MaxHistoryLimit)
	}
	if got, _ := h.History(HistoryOptions{}); len(got) != DefaultHistoryLimit {
		t.Errorf("History without a limit returned %d samples; want %d", len(got), DefaultHistoryLimit)
	}
}
