package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

func TestEtcdFlagErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{}, "--data-dir is required"},
		{[]string{"--data-dir", dir, "--initial-cluster-state", "old"}, "--initial-cluster-state must be new or existing"},
		{[]string{"--data-dir", dir, "--listen-client-urls", "127.0.0.1:2379"}, "--listen-client-urls"},
		{[]string{"--data-dir", dir, "--initial-cluster", "e1"}, "--initial-cluster wants name=URL"},
		{[]string{"--data-dir", dir, "--name", "e9", "--initial-cluster", "e1=http://127.0.0.1:2380"}, "does not name this member"},
		{[]string{"--data-dir", dir, "--log-level", "loud"}, "--log-level"},
		{[]string{"--data-dir", dir, "--heartbeat-interval", "500"}, "--election-timeout"},
		{[]string{"--data-dir", dir, "extra"}, "no arguments"},
	} {
		root := newRootCmd()
		root.SetArgs(append([]string{"etcd"}, tc.args...))
		root.SetOut(&bytes.Buffer{})
		root.SetErr(&bytes.Buffer{})
		err := root.Execute()
		if err == nil || !strings.Contains(err.Error(), tc.want) || exitCode(err) != exitUsage {
			t.Errorf("etcd %v: %v (exit %d); want %q and exit %d", tc.args, err, exitCode(err), tc.want, exitUsage)
		}
	}
}

func TestEtcdFlagDefaults(t *testing.T) {
	f := etcdFlags{
		name: "e1", dataDir: t.TempDir(), listenClientURLs: "http://127.0.0.1:2379", listenPeerURLs: "http://127.0.0.1:2380",
		initialClusterState: "new", initialClusterToken: "t", heartbeatMs: 100, electionMs: 1000, logLevel: "warn",
	}
	ec, err := f.config()
	if err != nil {
		t.Fatal(err)
	}
	if got := urlList(ec.AdvertiseClientUrls); got != "http://127.0.0.1:2379" {
		t.Errorf("advertised client URLs %q, want the listen URLs", got)
	}
	if got := urlList(ec.AdvertisePeerUrls); got != "http://127.0.0.1:2380" {
		t.Errorf("advertised peer URLs %q, want the listen URLs", got)
	}
	if ec.InitialCluster != "e1=http://127.0.0.1:2380" {
		t.Errorf("initial cluster %q, want this member alone", ec.InitialCluster)
	}
}

// TestEtcdServesAndStops runs one member in this process: it serves, and
// ends without error when its context ends (as on SIGTERM).
func TestEtcdServesAndStops(t *testing.T) {
	if testing.Short() {
		t.Skip("starts an etcd server")
	}
	port := func() int {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().(*net.TCPAddr).Port
	}
	client := fmt.Sprintf("http://127.0.0.1:%d", port())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	root := newRootCmd()
	root.SetArgs([]string{"etcd", "--name", "solo", "--data-dir", t.TempDir(), "--unsafe-no-fsync",
		"--listen-client-urls", client, "--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", port())})
	var stderr bytes.Buffer
	root.SetOut(&bytes.Buffer{})
	root.SetErr(&stderr)
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()

	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{client}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	deadline := time.Now().Add(60 * time.Second)
	for {
		pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := cli.Put(pctx, "k", "v")
		pcancel()
		if err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("etcd exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd does not serve: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("etcd returned %v on shutdown", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("etcd did not stop")
	}
	for _, want := range []string{"etcd member solo ready", "etcd member solo stopped"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr.String())
		}
	}
}
