package devcluster_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/gpusched/gpusched/internal/devcluster"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// get fetches http://addr/path and returns the status code and body.
func get(t *testing.T, addr, path string) (int, string) {
	t.Helper()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: time.Minute}).Get("http://" + addr + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestHTTPGateway(t *testing.T) {
	c, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: 1, HTTPListen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	addr := c.HTTPAddr()
	if addr == "" || strings.HasSuffix(addr, ":0") {
		t.Fatalf("HTTPAddr %q, want the bound address", addr)
	}
	if code, body := get(t, addr, "/healthz"); code != http.StatusOK {
		t.Errorf("GET /healthz: %d %s", code, body)
	}
	// The gateway reaches the scheduler: poll until a leader is elected.
	deadline := time.Now().Add(90 * time.Second)
	for {
		code, body := get(t, addr, "/v1/status")
		if code == http.StatusOK && strings.Contains(body, `"leader"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET /v1/status: %d %s", code, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestNoHTTPGatewayByDefault(t *testing.T) {
	c, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if addr := c.HTTPAddr(); addr != "" {
		t.Errorf("HTTPAddr %q without HTTPListen, want none", addr)
	}
}

func TestHTTPListenTaken(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	taken := busy.Addr().String()

	// Without fallback, a taken address is an error.
	if c, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: 1, HTTPListen: taken}); err == nil {
		c.Close()
		t.Errorf("Start on taken HTTP address %s succeeded", taken)
	} else if !strings.Contains(err.Error(), taken) {
		t.Errorf("Start on taken HTTP address: %v, want it named", err)
	}

	// With fallback, the gateway takes a free port of the same host.
	c, err := devcluster.Start(context.Background(), devcluster.Config{Nodes: 1, HTTPListen: taken, HTTPListenFallback: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	addr := c.HTTPAddr()
	if addr == taken || !strings.HasPrefix(addr, "127.0.0.1:") {
		t.Fatalf("HTTPAddr %q, want another port on 127.0.0.1", addr)
	}
	if code, body := get(t, addr, "/healthz"); code != http.StatusOK {
		t.Errorf("GET /healthz: %d %s", code, body)
	}
}
