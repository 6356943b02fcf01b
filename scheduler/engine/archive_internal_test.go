package engine

import (
	"bytes"
	"testing"
)

func TestParseSeqAndLeaseIDAcceptOnlyWhatTheEngineWrites(t *testing.T) {
	for _, tc := range []struct {
		id      string
		seq     uint64
		isJobID bool
	}{
		{"1", 1, true},
		{"42", 42, true},
		{"18446744073709551615", 1<<64 - 1, true},
		{"0", 0, true},
		{"", 0, false},
		{"007", 0, false},
		{"-1", 0, false},
		{"+1", 0, false},
		{"4 2", 0, false},
		{"18446744073709551616", 0, false},
	} {
		seq, ok := parseSeq(tc.id)
		if ok != tc.isJobID || (ok && seq != tc.seq) {
			t.Errorf("parseSeq(%q) = %d, %v; want %d, %v", tc.id, seq, ok, tc.seq, tc.isJobID)
		}
	}
	for _, tc := range []struct {
		id   string
		key  leaseKey
		okay bool
	}{
		{"42.1", leaseKey{42, 1}, true},
		{"7.12", leaseKey{7, 12}, true},
		{"42.0", leaseKey{}, false},
		{"42.01", leaseKey{}, false},
		{"042.1", leaseKey{}, false},
		{"42", leaseKey{}, false},
		{"42.1.1", leaseKey{}, false},
		{".1", leaseKey{}, false},
		{"lease-a", leaseKey{}, false},
		{"1.99999999999", leaseKey{}, false},
	} {
		key, ok := parseLeaseID(tc.id)
		if ok != tc.okay || key != tc.key {
			t.Errorf("parseLeaseID(%q) = %v, %v; want %v, %v", tc.id, key, ok, tc.key, tc.okay)
		}
	}
}

func TestTheRecordArenaReturnsEveryRecordAsAdded(t *testing.T) {
	var a recordArena
	records := [][]byte{
		[]byte("first"),
		{},
		bytes.Repeat([]byte{'x'}, arenaChunk-3), // no longer fits the first chunk
		bytes.Repeat([]byte{'y'}, 2*arenaChunk), // a chunk of its own size
		[]byte("after the big one"),
	}
	var refs []recordRef
	for _, r := range records {
		refs = append(refs, a.add(r))
	}
	for i, r := range records {
		got := a.get(refs[i])
		if !bytes.Equal(got, r) {
			t.Errorf("record %d: got %d bytes, want %d", i, len(got), len(r))
		}
		if cap(got) != len(got) {
			t.Errorf("record %d: capacity %d beyond its length %d lets an append overwrite the next record", i, cap(got), len(got))
		}
	}
	if len(a.chunks) != 4 {
		t.Errorf("%d chunks; want 4 (small ones share, the big one alone, the next in a new chunk)", len(a.chunks))
	}
}

func TestLabelSetsAreSharedByContent(t *testing.T) {
	ls := newLabelSets()
	a := ls.id(map[string]string{"team": "vision", "run": "7"})
	b := ls.id(map[string]string{"run": "7", "team": "vision"})
	c := ls.id(map[string]string{"team": "vision"})
	// Length prefixes keep "a=b,c" and "a,b=c" apart.
	d := ls.id(map[string]string{"a:1": "b"})
	e := ls.id(map[string]string{"a": "1:b"})
	switch {
	case a != b:
		t.Errorf("the same labels got sets %d and %d", a, b)
	case a == c || d == e:
		t.Errorf("different labels share a set: %d %d %d %d", a, c, d, e)
	case ls.id(nil) != 0 || ls.id(map[string]string{}) != 0 || ls.set(0) != nil:
		t.Errorf("no labels is not set 0")
	case ls.set(c)["team"] != "vision" || len(ls.set(c)) != 1:
		t.Errorf("set %d = %v", c, ls.set(c))
	}
	in := newInterner()
	if in.id("") != 0 || in.id("acme") != in.id("acme") || in.name(in.id("acme")) != "acme" || in.id("acme") == in.id("beta") {
		t.Errorf("interner: %v", in.names)
	}
}
