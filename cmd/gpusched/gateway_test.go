package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/gpusched/gpusched/internal/embedetcd"
	"github.com/gpusched/gpusched/scheduler"
)

// TestServeSchedulerWithGateway runs `gpusched scheduler --http-listen` the
// way the command does: a replica on a real etcd and the gateway in front of
// it, stopped together.
func TestServeSchedulerWithGateway(t *testing.T) {
	etcd, err := embedetcd.Start(embedetcd.Config{Dir: filepath.Join(t.TempDir(), "etcd"), NoFsync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer etcd.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cli, err := etcd.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	// The gRPC listener on every interface: the gateway dials it on loopback.
	lis, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	hlis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() {
		served <- serveScheduler(ctx, zap.NewNop(), scheduler.New(scheduler.Config{Etcd: cli}), lis, hlis)
	}()

	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: time.Minute}
	deadline := time.Now().Add(90 * time.Second)
	for {
		resp, err := hc.Get("http://" + hlis.Addr().String() + "/v1/status")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var status struct{ Replicas []struct{ Leader bool } }
		if resp.StatusCode == http.StatusOK && json.Unmarshal(body, &status) == nil &&
			len(status.Replicas) == 1 && status.Replicas[0].Leader {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET /v1/status: %d %s", resp.StatusCode, body)
		}
		time.Sleep(50 * time.Millisecond)
	}

	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("serveScheduler: %v", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("serveScheduler did not return after its context ended")
	}
}
