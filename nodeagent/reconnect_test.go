package nodeagent

import (
	"errors"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// noLeaderErr is how a replica refuses an agent for want of a leader.
func noLeaderErr(t *testing.T) error {
	t.Helper()
	st, err := status.New(codes.Unavailable, "not leader").WithDetails(&errdetails.ErrorInfo{Reason: reasonNoLeader, Domain: errorDomain})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

func TestIsNoLeader(t *testing.T) {
	for _, c := range []struct {
		name string
		err  error
		want bool
	}{
		{"NO_LEADER", noLeaderErr(t), true},
		{"plain Unavailable (no replica answered)", status.Error(codes.Unavailable, "connection refused"), false},
		{"another reason", func() error {
			st, _ := status.New(codes.Unavailable, "x").WithDetails(&errdetails.ErrorInfo{Reason: "OTHER", Domain: errorDomain})
			return st.Err()
		}(), false},
		{"not a status", errors.New("boom"), false},
	} {
		if got := isNoLeader(c.err); got != c.want {
			t.Errorf("%s: isNoLeader = %v; want %v", c.name, got, c.want)
		}
	}
}

func TestDialPlan(t *testing.T) {
	const a, b, c = "a:1", "b:1", "c:1"
	top := func(n int64) int64 { return n - 1 } // every wait at its upper bound
	bottom := func(int64) int64 { return 0 }    // every wait at its lower bound

	t.Run("a replica that names another leader is left for it at once", func(t *testing.T) {
		d := newDialPlan([]string{a, b, c}, top)
		if s := d.server(); s != a {
			t.Fatalf("first server %s; want %s", s, a)
		}
		if w := d.ended(a, sessionEnd{leaderHint: c, noLeader: true}); w != 0 {
			t.Errorf("wait %v after a hint; want none", w)
		}
		if s := d.server(); s != c {
			t.Errorf("next server %s; want the hint %s", s, c)
		}
	})

	t.Run("a loading leader is waited for with growing, capped waits, and returned to", func(t *testing.T) {
		d := newDialPlan([]string{a, b}, top)
		var waits []time.Duration
		for range 9 {
			s := d.server()
			if s != a {
				t.Fatalf("server %s; want the loading leader %s every time", s, a)
			}
			waits = append(waits, d.ended(s, sessionEnd{leaderHint: a, noLeader: true}))
		}
		want := []time.Duration{100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000}
		for i := range want {
			if waits[i] != want[i]*time.Millisecond {
				t.Fatalf("waits %v; want (upper bounds) %v ms", waits, want)
			}
		}
		// A welcome starts over.
		d.ended(a, sessionEnd{welcomed: true})
		if w := d.ended(d.server(), sessionEnd{noLeader: true}); w != 100*time.Millisecond {
			t.Errorf("first wait after a welcome %v; want 100ms", w)
		}
	})

	t.Run("waits are jittered within their upper half", func(t *testing.T) {
		d := newDialPlan([]string{a}, bottom)
		for _, want := range []time.Duration{50, 100, 200, 400, 800, 1600, 2500, 2500} {
			if w := d.ended(d.server(), sessionEnd{noLeader: true}); w != want*time.Millisecond {
				t.Fatalf("wait %v; want %v", w, want*time.Millisecond)
			}
		}
	})

	t.Run("no leader known: the next endpoint, after a wait", func(t *testing.T) {
		d := newDialPlan([]string{a, b}, top)
		d.server()
		if w := d.ended(a, sessionEnd{noLeader: true}); w != 100*time.Millisecond {
			t.Errorf("wait %v; want 100ms", w)
		}
		if s := d.server(); s != b {
			t.Errorf("next server %s; want %s", s, b)
		}
	})

	t.Run("unreachable endpoints: the next one soon, backing off per round up to 500ms", func(t *testing.T) {
		d := newDialPlan([]string{a, b}, top)
		var got []time.Duration
		var servers []string
		for range 8 {
			s := d.server()
			servers = append(servers, s)
			got = append(got, d.ended(s, sessionEnd{err: errors.New("connection refused")}))
		}
		want := []time.Duration{100, 200, 200, 400, 400, 500, 500, 500}
		for i := range want {
			if got[i] != want[i]*time.Millisecond || servers[i] != []string{a, b}[i%2] {
				t.Fatalf("servers %v, waits %v; want alternating, waits %v ms", servers, got, want)
			}
		}
	})
}
