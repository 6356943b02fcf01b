package engine

import (
	"testing"
	"time"
)

func TestHeartbeatIntervalStretchesWithTheCluster(t *testing.T) {
	for _, tc := range []struct {
		name     string
		cfg      Config
		nodes    int64
		interval time.Duration
	}{
		{"a small cluster gets the configured interval", Config{}, 10, 2 * time.Second},
		{"2,000 nodes at 2s are exactly the default rate", Config{}, 2000, 2 * time.Second},
		{"5,000 nodes are stretched to 5s", Config{}, 5000, 5 * time.Second},
		{"10,000 nodes are stretched to 10s", Config{}, 10000, 10 * time.Second},
		{"the stretch stops at the cap", Config{}, 100000, 10 * time.Second},
		{"a longer configured interval wins over the cap", Config{HeartbeatInterval: 30 * time.Second}, 100000, 30 * time.Second},
		{"a higher rate limit stretches later", Config{MaxHeartbeatsPerSecond: 5000}, 10000, 2 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := New(tc.cfg)
			e.nodeCount.Store(tc.nodes)
			if got := e.heartbeatInterval(); got != tc.interval {
				t.Errorf("heartbeatInterval() with %d nodes = %s, want %s", tc.nodes, got, tc.interval)
			}
		})
	}
}
