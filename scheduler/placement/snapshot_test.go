package placement

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// freeIndices returns where each free node sits in all.
func freeIndices(free, all []Node) []int32 {
	at := map[string]int32{}
	for i, n := range all {
		at[n.ID] = int32(i)
	}
	var idx []int32
	for _, n := range free {
		idx = append(idx, at[n.ID])
	}
	return idx
}

// A builder reused cycle after cycle, over one slice of all nodes and free
// indices into it, must plan exactly what a fresh NewSnapshot of the same
// nodes plans: when it indexes all anew (a new version) and when it reuses
// that index for another set of free nodes (the same version).
func TestBuildFreePlansLikeNewSnapshot(t *testing.T) {
	var sb SnapshotBuilder
	for seed := range 300 {
		free, all, reqs := randomCase(seed, false)
		// randomPolicy rewrites and shuffles the requests, and Schedule
		// adds to the policy's usage: each plan gets fresh ones.
		schedule := func(s *Snapshot) Plan {
			r := slices.Clone(reqs)
			return Schedule(s, randomPolicy(seed, r), r)
		}
		check := func(what string, free []Node, got *Snapshot) {
			t.Helper()
			want, have := schedule(NewSnapshot(free, all)), schedule(got)
			if !reflect.DeepEqual(have.Assignments, want.Assignments) || !reflect.DeepEqual(have.Why, want.Why) {
				t.Fatalf("seed %d, %s: BuildFree planned\n%v %q\nNewSnapshot planned\n%v %q", seed, what, have.Assignments, have.Why, want.Assignments, want.Why)
			}
		}
		version := uint64(seed + 1)
		check("a new version", free, sb.BuildFree(all, version, freeIndices(free, all)))
		fewer := free[:len(free)/2]
		check("the same version, fewer free nodes", fewer, sb.BuildFree(all, version, freeIndices(fewer, all)))
		// Free nodes given in ID order, as the engine keeps them.
		idx := freeIndices(free, all)
		slices.SortFunc(idx, func(a, b int32) int { return strings.Compare(all[a].ID, all[b].ID) })
		ordered := SnapshotBuilder{FreeInIDOrder: true}
		check("free in ID order", free, ordered.BuildFree(all, 1, idx))
	}
}

// A node whose shape changes under the same version would be placed by its
// old bucket: the version is what tells the builder to look again.
func TestBuildFreeReindexesWhenTheVersionChanges(t *testing.T) {
	all := nodes("A100", 8, "n1", "n2")
	var sb SnapshotBuilder
	req := []Request{{JobID: "j", Nodes: 1, GPUModel: "H100"}}
	if plan := Place(sb.BuildFree(all, 1, []int32{0, 1}), req); len(plan.Assignments) != 0 {
		t.Fatalf("placed an H100 job on A100 nodes: %v", plan.Assignments)
	}
	all[1].GPUModel = "H100"
	plan := Place(sb.BuildFree(all, 2, []int32{0, 1}), req)
	if got := fmt.Sprint(plan.Assignments); got != "[{j [n2]}]" {
		t.Fatalf("after relabelling n2 as H100 (new version): %s; want j on n2", got)
	}
}
