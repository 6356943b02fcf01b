package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestPprofNeedsMetricsListen: pprof is only ever served on the metrics
// endpoint, so --pprof alone is a usage error on every daemon.
func TestPprofNeedsMetricsListen(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"dev", "--pprof", "--http-listen", ""},
		{"scheduler", "--etcd-endpoints", "http://127.0.0.1:1", "--pprof"},
		{"agent", "--scheduler", "127.0.0.1:1", "--node-id", "n1", "--data-dir", dir, "--gpu-backend", "mock-dgxh100", "--pprof"},
	} {
		root := newRootCmd()
		root.SetArgs(args)
		root.SetOut(&bytes.Buffer{})
		root.SetErr(&bytes.Buffer{})
		err := root.Execute()
		if err == nil || !strings.Contains(err.Error(), "--metrics-listen") || exitCode(err) != exitUsage {
			t.Errorf("%v: %v (exit %d); want a usage error naming --metrics-listen", args, err, exitCode(err))
		}
	}
}
