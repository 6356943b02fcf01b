package gateway_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/gpusched/gpusched/internal/devcluster"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/engine"
	"github.com/gpusched/gpusched/scheduler/gateway"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// wait is the generous bound on anything a test waits for: a loaded 2-core
// machine may be slow, but nothing here should ever take this long.
const wait = 90 * time.Second

// restClient talks JSON to a gateway over a real socket.
type restClient struct {
	t    *testing.T
	base string
	http *http.Client
}

func newClient(t *testing.T, addr string) *restClient {
	t.Helper()
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &restClient{t: t, base: "http://" + addr, http: &http.Client{Transport: tr, Timeout: wait}}
}

// do sends one request (body marshaled as JSON unless it is a string) and
// returns the status code and the raw response body.
func (c *restClient) do(method, path string, body any) (int, []byte) {
	c.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		buf, err := json.Marshal(b)
		if err != nil {
			c.t.Fatal(err)
		}
		rd = bytes.NewReader(buf)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		c.t.Fatal(err)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return resp.StatusCode, raw
}

// json does one request, wants the status code want and decodes the body.
func (c *restClient) json(method, path string, body any, want int) map[string]any {
	c.t.Helper()
	code, raw := c.do(method, path, body)
	if code != want {
		c.t.Fatalf("%s %s: HTTP %d, want %d: %s", method, path, code, want, raw)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		c.t.Fatalf("%s %s: body is not a JSON object: %v: %s", method, path, err, raw)
	}
	return m
}

// eventually polls f until it returns nil, failing with its last error
// after wait.
func eventually(t *testing.T, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, wait, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// str digs a string out of decoded JSON: str(m, "job", "state").
func str(m map[string]any, path ...string) string {
	var v any = m
	for _, k := range path {
		o, ok := v.(map[string]any)
		if !ok {
			return ""
		}
		v = o[k]
	}
	s, _ := v.(string)
	return s
}

// startCluster runs a dev cluster (real embedded etcd, scheduler, agents)
// with the gateway on a free port, and waits until its nodes are READY.
func startCluster(t *testing.T, nodes int) (*devcluster.Cluster, *restClient) {
	t.Helper()
	c, err := devcluster.Start(context.Background(), devcluster.Config{
		Nodes: nodes, HTTPListen: "127.0.0.1:0", Engine: engine.Config{KillGrace: time.Second},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	if c.HTTPAddr() == "" {
		t.Fatal("HTTPAddr is empty with HTTPListen set")
	}
	rc := newClient(t, c.HTTPAddr())
	eventually(t, "nodes READY over REST", func() error {
		code, raw := rc.do("GET", "/v1/nodes", nil)
		if code != http.StatusOK {
			return fmt.Errorf("HTTP %d: %s", code, raw)
		}
		var resp struct {
			Nodes []struct{ State string }
		}
		if err := json.Unmarshal(raw, &resp); err != nil {
			return err
		}
		ready := 0
		for _, n := range resp.Nodes {
			if n.State == "NODE_STATE_READY" {
				ready++
			}
		}
		if ready != nodes {
			return fmt.Errorf("%d of %d nodes READY: %s", ready, nodes, raw)
		}
		return nil
	})
	return c, rc
}

func TestRESTRoundTrip(t *testing.T) {
	_, rc := startCluster(t, 2)

	if code, raw := rc.do("GET", gateway.HealthPath, nil); code != http.StatusOK || strings.TrimSpace(string(raw)) != "ok" {
		t.Errorf("GET /healthz: HTTP %d %q, want 200 ok", code, raw)
	}

	// Submit: lowerCamel JSON in and out, enums as names, unset fields left out.
	sub := rc.json("POST", "/v1/jobs", `{"spec":{"nodes":1,"command":["true"]}}`, http.StatusOK)
	id := str(sub, "job", "id")
	if id == "" {
		t.Fatalf("submit returned no job ID: %v", sub)
	}
	if st := str(sub, "job", "state"); st != "JOB_STATE_PENDING" {
		t.Errorf("submitted job state %q, want JOB_STATE_PENDING", st)
	}
	if job := sub["job"].(map[string]any); job["leaseId"] != nil || job["lease_id"] != nil || job["endTime"] != nil {
		t.Errorf("unpopulated fields emitted: %v", job)
	}

	// Get, until the command has run.
	eventually(t, "job "+id+" SUCCEEDED", func() error {
		got := rc.json("GET", "/v1/jobs/"+id, nil, http.StatusOK)
		if gid := str(got, "job", "id"); gid != id {
			t.Fatalf("GET /v1/jobs/%s returned job %q", id, gid)
		}
		if st := str(got, "job", "state"); st != "JOB_STATE_SUCCEEDED" {
			return fmt.Errorf("state %s", st)
		}
		return nil
	})

	// A job that cannot be placed (3 nodes on a 2-node cluster) stays PENDING.
	pend := rc.json("POST", "/v1/jobs", map[string]any{"spec": map[string]any{"nodes": 3, "command": []string{"sleep", "600"}}}, http.StatusOK)
	pendID := str(pend, "job", "id")

	// List with a filter, as query parameters.
	q := url.Values{"selector.states": {"JOB_STATE_PENDING"}, "page_size": {"10"}}
	list := rc.json("GET", "/v1/jobs?"+q.Encode(), nil, http.StatusOK)
	var ids []string
	for _, j := range list["jobs"].([]any) {
		ids = append(ids, str(j.(map[string]any), "id"))
	}
	if !slices.Equal(ids, []string{pendID}) {
		t.Errorf("PENDING jobs %v, want [%s]", ids, pendID)
	}
	if str(list, "cursor") == "" {
		t.Errorf("ListJobs response without a cursor: %v", list)
	}

	// Cancel, then cancel again: FAILED_PRECONDITION is HTTP 400.
	can := rc.json("POST", "/v1/jobs/"+pendID+":cancel", `{"reason":"rest test"}`, http.StatusOK)
	if st := str(can, "job", "state"); st != "JOB_STATE_CANCELLED" {
		t.Errorf("cancelled job state %q, want JOB_STATE_CANCELLED", st)
	}
	again := rc.json("POST", "/v1/jobs/"+pendID+":cancel", `{}`, http.StatusBadRequest)
	if code, _ := again["code"].(float64); code != 9 {
		t.Errorf("second cancel: %v, want code 9 (FAILED_PRECONDITION)", again)
	}

	// An invalid submit: 400 with the field violation in the body.
	bad := rc.json("POST", "/v1/jobs", `{"spec":{"nodes":0,"command":["true"]}}`, http.StatusBadRequest)
	if code, _ := bad["code"].(float64); code != 3 {
		t.Errorf("invalid submit: code %v, want 3 (INVALID_ARGUMENT): %v", bad["code"], bad)
	}
	if !hasFieldViolation(bad, "spec.nodes") {
		t.Errorf("invalid submit: no BadRequest field violation for spec.nodes: %v", bad)
	}
	// A misspelt field is refused, not ignored.
	if code, raw := rc.do("POST", "/v1/jobs", `{"spec":{"nodez":1,"command":["true"]}}`); code != http.StatusBadRequest || !strings.Contains(string(raw), "nodez") {
		t.Errorf("unknown field: HTTP %d %s, want 400 naming it", code, raw)
	}
	if code, raw := rc.do("GET", "/v1/jobs/99999", nil); code != http.StatusNotFound {
		t.Errorf("GET unknown job: HTTP %d %s, want 404", code, raw)
	}
	if code, raw := rc.do("GET", "/v1/nope", nil); code != http.StatusNotFound {
		t.Errorf("GET unknown route: HTTP %d %s, want 404", code, raw)
	}

	// Other services answer too.
	if st := rc.json("GET", "/v1/status", nil, http.StatusOK); str(st, "leader") == "" {
		t.Errorf("GET /v1/status: no leader: %v", st)
	}

	// The OpenAPI document.
	doc := rc.json("GET", gateway.OpenAPIPath, nil, http.StatusOK)
	paths, _ := doc["paths"].(map[string]any)
	for _, p := range []string{"/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}:cancel", "/v1/jobs:watch", "/v1/nodes/{id}:drain", "/v1/status"} {
		if paths[p] == nil {
			t.Errorf("OpenAPI document lacks path %s", p)
		}
	}
	if s := fmt.Sprint(doc); strings.Contains(s, "AgentService") || strings.Contains(s, "MockService") {
		t.Error("OpenAPI document mentions AgentService or MockService, which are gRPC only")
	}
}

func hasFieldViolation(status map[string]any, field string) bool {
	details, _ := status["details"].([]any)
	for _, d := range details {
		dm, _ := d.(map[string]any)
		if str(dm, "@type") != "type.googleapis.com/google.rpc.BadRequest" {
			continue
		}
		fvs, _ := dm["fieldViolations"].([]any)
		for _, fv := range fvs {
			if str(fv.(map[string]any), "field") == field {
				return true
			}
		}
	}
	return false
}

// watchLine is one line of a REST stream: a result or an error.
type watchLine struct {
	Result *struct {
		Cursor string
		Events []struct {
			JobID      string
			Transition struct{ State string }
		}
	}
	Error map[string]any
}

// openStream starts a streaming GET and returns a reader of its
// newline-delimited JSON; the stream ends with the test.
func openStream(t *testing.T, rc *restClient, path string) *bufio.Scanner {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, "GET", rc.base+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: rc.http.Transport}).Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != http.StatusOK {
		raw, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: HTTP %d: %s", path, resp.StatusCode, raw)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 16<<20)
	return sc
}

// next reads the next line of a stream; a stream error fails the test.
func next(t *testing.T, sc *bufio.Scanner) watchLine {
	t.Helper()
	if !sc.Scan() {
		t.Fatalf("stream ended: %v", sc.Err())
	}
	var l watchLine
	if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
		t.Fatalf("stream line is not JSON: %v: %s", err, sc.Bytes())
	}
	if l.Error != nil {
		t.Fatalf("stream failed: %v", l.Error)
	}
	if l.Result == nil {
		t.Fatalf("stream line without result: %s", sc.Bytes())
	}
	return l
}

func TestRESTWatchJobs(t *testing.T) {
	_, rc := startCluster(t, 1)

	// Only the labelled job's SUCCEEDED transition matches.
	q := url.Values{"selector.states": {"JOB_STATE_SUCCEEDED"}, "selector.labels[run]": {"w1"}}
	sc := openStream(t, rc, "/v1/jobs:watch?"+q.Encode())
	first := next(t, sc) // every watch opens with a cursor: it is established
	if first.Result.Cursor == "" || len(first.Result.Events) != 0 {
		t.Fatalf("first watch response %+v, want a cursor and no events", first.Result)
	}

	other := rc.json("POST", "/v1/jobs", `{"spec":{"nodes":1,"command":["true"]}}`, http.StatusOK)
	sub := rc.json("POST", "/v1/jobs", `{"spec":{"nodes":1,"command":["true"],"labels":{"run":"w1"}}}`, http.StatusOK)
	id, otherID := str(sub, "job", "id"), str(other, "job", "id")

	waitEvent := func(sc *bufio.Scanner) {
		t.Helper()
		for {
			l := next(t, sc)
			for _, ev := range l.Result.Events {
				if ev.JobID == otherID || ev.Transition.State != "JOB_STATE_SUCCEEDED" {
					t.Errorf("event outside the selector: job %s -> %s", ev.JobID, ev.Transition.State)
				}
				if ev.JobID == id && ev.Transition.State == "JOB_STATE_SUCCEEDED" {
					return
				}
			}
		}
	}
	waitEvent(sc)

	// A watch from the first cursor replays the change.
	q.Set("cursor", first.Result.Cursor)
	waitEvent(openStream(t, rc, "/v1/jobs:watch?"+q.Encode()))
}

// fakeJobs is a JobService that blocks where a test needs it to and
// records the metadata calls arrive with.
type fakeJobs struct {
	pb.UnimplementedJobServiceServer
	mu sync.Mutex
	md metadata.MD
}

// GetJob blocks until its deadline, recording its metadata.
func (f *fakeJobs) GetJob(ctx context.Context, _ *pb.GetJobRequest) (*pb.GetJobResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.mu.Lock()
	f.md = md
	f.mu.Unlock()
	<-ctx.Done()
	return nil, ctx.Err()
}

// WatchJobs sends a cursor, then blocks until the client goes away.
func (f *fakeJobs) WatchJobs(_ *pb.WatchJobsRequest, stream grpc.ServerStreamingServer[pb.WatchJobsResponse]) error {
	if err := stream.Send(&pb.WatchJobsResponse{Cursor: "1"}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return stream.Context().Err()
}

// startFake serves fakeJobs over gRPC on a free port.
func startFake(t *testing.T) (*fakeJobs, string) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeJobs{}
	srv := grpc.NewServer()
	pb.RegisterJobServiceServer(srv, f)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return f, lis.Addr().String()
}

// serveGateway runs a gateway on a free port until the test ends; stop
// ends it early and returns what Serve returned.
func serveGateway(t *testing.T, cfg gateway.Config) (addr string, stop func() error) {
	t.Helper()
	gw, err := gateway.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- gw.Serve(ctx, lis) }()
	var once sync.Once
	var serveErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case serveErr = <-served:
			case <-time.After(wait):
				serveErr = errors.New("Serve did not return")
			}
			_ = gw.Close()
		})
		return serveErr
	}
	t.Cleanup(func() { _ = stop() })
	return lis.Addr().String(), stop
}

func TestGatewayStopCutsStreams(t *testing.T) {
	_, grpcAddr := startFake(t)
	addr, stop := serveGateway(t, gateway.Config{GRPCAddr: grpcAddr})
	rc := newClient(t, addr)
	sc := openStream(t, rc, "/v1/jobs:watch")
	if l := next(t, sc); l.Result.Cursor != "1" {
		t.Fatalf("first line %+v, want cursor 1", l.Result)
	}
	// An endless watch must not hold up the stop; it ends with UNAVAILABLE.
	if err := stop(); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if !sc.Scan() {
		t.Fatalf("stream ended without an error line: %v", sc.Err())
	}
	var l watchLine
	if err := json.Unmarshal(sc.Bytes(), &l); err != nil || l.Error == nil {
		t.Fatalf("last stream line %s (%v), want an error", sc.Bytes(), err)
	}
	if code, _ := l.Error["code"].(float64); code != 14 {
		t.Errorf("stream cut with %v, want code 14 (UNAVAILABLE)", l.Error)
	}
}

func TestGatewayCallDeadlineAndHeaders(t *testing.T) {
	fake, grpcAddr := startFake(t)
	addr, _ := serveGateway(t, gateway.Config{GRPCAddr: grpcAddr, CallTimeout: 100 * time.Millisecond})
	rc := newClient(t, addr)
	req, err := http.NewRequest("GET", rc.base+"/v1/jobs/7", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer t0ken")
	req.Header.Set("Grpc-Metadata-Gpusched-Forwarded", "1")
	req.Header.Set("Grpc-Metadata-X-Trace", "abc")
	resp, err := rc.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	// The call blocks forever in the server: the default deadline ends it.
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Errorf("blocked call: HTTP %d %s, want 504", resp.StatusCode, raw)
	}
	fake.mu.Lock()
	md := fake.md
	fake.mu.Unlock()
	if got := md.Get("authorization"); !slices.Equal(got, []string{"Bearer t0ken"}) {
		t.Errorf("authorization metadata %q, want the header", got)
	}
	// No REST client sets metadata of its choosing, least of all what the
	// replicas exchange among themselves.
	if got := md.Get("gpusched-forwarded"); len(got) != 0 {
		t.Errorf("a REST client set internal metadata gpusched-forwarded=%q", got)
	}
	if got := md.Get("x-trace"); len(got) != 0 {
		t.Errorf("a REST client set metadata x-trace=%q", got)
	}
}

func TestGatewayBodyLimit(t *testing.T) {
	_, grpcAddr := startFake(t)
	addr, _ := serveGateway(t, gateway.Config{GRPCAddr: grpcAddr, MaxBodyBytes: 1024})
	rc := newClient(t, addr)
	big := `{"spec":{"name":"` + strings.Repeat("x", 2048) + `"}}`
	code, raw := rc.do("POST", "/v1/jobs", big)
	if code != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized body: HTTP %d %s, want 413", code, raw)
	}
	var st map[string]any
	if err := json.Unmarshal(raw, &st); err != nil || st["message"] == nil {
		t.Errorf("oversized body: error body %s is not a status (%v)", raw, err)
	}
}

func TestGatewayHealthzFollowsBackend(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := lis.Addr().String()
	lis.Close() // nothing listens there any more
	addr, _ := serveGateway(t, gateway.Config{GRPCAddr: dead})
	rc := newClient(t, addr)
	eventually(t, "healthz 503 with the scheduler unreachable", func() error {
		if code, raw := rc.do("GET", gateway.HealthPath, nil); code != http.StatusServiceUnavailable {
			return fmt.Errorf("HTTP %d %s", code, raw)
		}
		return nil
	})
	if code, raw := rc.do("GET", "/v1/jobs/1", nil); code != http.StatusServiceUnavailable {
		t.Errorf("call with the scheduler unreachable: HTTP %d %s, want 503", code, raw)
	}
}

func TestNewNeedsAddress(t *testing.T) {
	if _, err := gateway.New(gateway.Config{}); !errors.Is(err, gateway.ErrConfig) {
		t.Errorf("New without GRPCAddr: %v, want ErrConfig", err)
	}
}

func TestLoopbackAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0.0.0.0:7070":   "127.0.0.1:7070",
		":7070":          "127.0.0.1:7070",
		"[::]:7070":      "[::1]:7070",
		"127.0.0.1:7070": "127.0.0.1:7070",
		"10.1.2.3:7070":  "10.1.2.3:7070",
		"sched1:7070":    "sched1:7070",
		"no-port":        "no-port",
	} {
		if got := gateway.LoopbackAddr(in); got != want {
			t.Errorf("LoopbackAddr(%q) = %q, want %q", in, got, want)
		}
	}
}
