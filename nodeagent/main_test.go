package nodeagent

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpusched/gpusched/nodeagent/gpu"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// waitLimit bounds every wait. It is generous on purpose: verdicts never
// depend on speed, and a loaded 2-core CI machine is slow.
const waitLimit = 20 * time.Second

// eventually polls cond until it holds, failing the test after waitLimit.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", waitLimit, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------------
// The fake scheduler.

// fakeScheduler plays the scheduler's side of AgentService.Connect over real
// gRPC on loopback. It can serve on several endpoints at once (see listen);
// every stream on any of them, and every message received, is recorded in
// order of arrival. Commands are pushed by the test onto a chosen stream.
type fakeScheduler struct {
	mu sync.Mutex
	// onHello decides, once a stream's hello is in, whether the stream is
	// accepted; a non-nil error ends the stream with it. Nil accepts all.
	onHello func(h *pb.AgentHello) error
	streams []*fakeStream
	msgs    []*pb.ConnectRequest // every message, of every stream
	nextReq uint64               // FetchLogs request ids
	// paused, while not nil, holds every stream's reading until closed:
	// a scheduler too busy to read, so the agent's sends back up.
	paused chan struct{}
}

// fakeStream is one agent stream as the fake scheduler sees it.
type fakeStream struct {
	server   string // endpoint that took it
	hello    *pb.AgentHello
	accepted bool // onHello let it through; set before it is published
	cmds     chan *pb.ConnectResponse
	hangup   chan struct{} // closed by the test to end the stream
	hangOnce sync.Once
}

// endpoint is one listening address of a fakeScheduler.
type endpoint struct {
	pb.UnimplementedAgentServiceServer
	f    *fakeScheduler
	addr string
}

func (e *endpoint) Connect(stream pb.AgentService_ConnectServer) error {
	return e.f.connect(e.addr, stream)
}

func (f *fakeScheduler) connect(addr string, stream pb.AgentService_ConnectServer) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	fs := &fakeStream{
		server: addr, hello: first.GetHello(),
		cmds: make(chan *pb.ConnectResponse, 64), hangup: make(chan struct{}),
	}
	f.mu.Lock()
	onHello := f.onHello
	f.mu.Unlock()
	var reject error
	if fs.hello == nil {
		reject = errors.New("fake scheduler: first message is not a hello")
	} else if onHello != nil {
		reject = onHello(fs.hello)
	}
	fs.accepted = reject == nil
	f.mu.Lock()
	f.msgs = append(f.msgs, first)
	f.streams = append(f.streams, fs)
	f.mu.Unlock()
	if reject != nil {
		return reject
	}

	// Recv returns once the handler has returned, so this never outlives
	// the stream.
	recvErr := make(chan error, 1)
	go func() {
		for {
			f.mu.Lock()
			paused := f.paused
			f.mu.Unlock()
			if paused != nil {
				select {
				case <-paused:
				case <-stream.Context().Done():
					recvErr <- stream.Context().Err()
					return
				}
			}
			m, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			f.mu.Lock()
			f.msgs = append(f.msgs, m)
			f.mu.Unlock()
		}
	}()
	// Heartbeat like the real scheduler, or the agent's watchdog would
	// leave a stream that a test keeps idle.
	heartbeat := time.NewTicker(500 * time.Millisecond)
	defer heartbeat.Stop()
	for {
		select {
		case c := <-fs.cmds:
			if err := stream.Send(c); err != nil {
				return err
			}
		case <-heartbeat.C:
			if err := stream.Send(&pb.ConnectResponse{Msg: &pb.ConnectResponse_Heartbeat{Heartbeat: &pb.Heartbeat{}}}); err != nil {
				return err
			}
		case <-fs.hangup:
			return nil
		case err := <-recvErr:
			return err
		}
	}
}

// newFake returns a fake scheduler with no endpoint yet.
func newFake() *fakeScheduler { return &fakeScheduler{} }

// listen serves f on a fresh loopback port and returns its address and a
// function that stops that endpoint (closing its streams); the endpoint is
// also stopped when the test ends.
func (f *fakeScheduler) listen(t *testing.T) (string, func()) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	srv := grpc.NewServer(grpc.WaitForHandlers(true))
	pb.RegisterAgentServiceServer(srv, &endpoint{f: f, addr: lis.Addr().String()})
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(lis) }()
	var once sync.Once
	stop := func() { once.Do(func() { srv.Stop(); <-served }) }
	t.Cleanup(stop)
	return lis.Addr().String(), stop
}

// setOnHello replaces the accept decision for future streams.
func (f *fakeScheduler) setOnHello(fn func(*pb.AgentHello) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.onHello = fn
}

// pauseReading stops every stream's reading (after at most one more
// message each) until resumeReading.
func (f *fakeScheduler) pauseReading() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.paused == nil {
		f.paused = make(chan struct{})
	}
}

func (f *fakeScheduler) resumeReading() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.paused != nil {
		close(f.paused)
		f.paused = nil
	}
}

// stream waits for the n-th accepted stream (1-based) and returns it.
func (f *fakeScheduler) stream(t *testing.T, n int) *fakeStream {
	t.Helper()
	var got *fakeStream
	eventually(t, "accepted agent stream #"+strconv.Itoa(n), func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		k := 0
		for _, s := range f.streams {
			if s.accepted {
				if k++; k == n {
					got = s
					return true
				}
			}
		}
		return false
	})
	return got
}

// streamCount is how many streams (accepted or not) have said hello.
func (f *fakeScheduler) streamCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.streams)
}

// received returns every message received so far that matches pred.
func (f *fakeScheduler) received(pred func(*pb.ConnectRequest) bool) []*pb.ConnectRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*pb.ConnectRequest
	for _, m := range f.msgs {
		if pred(m) {
			out = append(out, m)
		}
	}
	return out
}

// await waits for the first message matching pred and returns it.
func (f *fakeScheduler) await(t *testing.T, what string, pred func(*pb.ConnectRequest) bool) *pb.ConnectRequest {
	t.Helper()
	var got *pb.ConnectRequest
	eventually(t, what, func() bool {
		if ms := f.received(pred); len(ms) > 0 {
			got = ms[0]
			return true
		}
		return false
	})
	return got
}

func (f *fakeScheduler) awaitStarted(t *testing.T, lease string) *pb.LeaseStarted {
	t.Helper()
	return f.await(t, "LeaseStarted for "+lease, isStarted(lease)).GetLeaseStarted()
}

func (f *fakeScheduler) awaitExited(t *testing.T, lease string) *pb.LeaseExited {
	t.Helper()
	return f.await(t, "LeaseExited for "+lease, isExited(lease)).GetLeaseExited()
}

func (f *fakeScheduler) awaitReleased(t *testing.T, lease string) *pb.LeaseReleased {
	t.Helper()
	return f.await(t, "LeaseReleased for "+lease, isReleased(lease)).GetLeaseReleased()
}

func isStarted(lease string) func(*pb.ConnectRequest) bool {
	return func(m *pb.ConnectRequest) bool {
		return m.GetLeaseStarted() != nil && m.GetLeaseStarted().GetLeaseId() == lease
	}
}

func isExited(lease string) func(*pb.ConnectRequest) bool {
	return func(m *pb.ConnectRequest) bool {
		return m.GetLeaseExited() != nil && m.GetLeaseExited().GetLeaseId() == lease
	}
}

func isReleased(lease string) func(*pb.ConnectRequest) bool {
	return func(m *pb.ConnectRequest) bool {
		return m.GetLeaseReleased() != nil && m.GetLeaseReleased().GetLeaseId() == lease
	}
}

// anyAbout matches every lease message (started, exited, released) of lease.
func anyAbout(lease string) func(*pb.ConnectRequest) bool {
	return func(m *pb.ConnectRequest) bool {
		return isStarted(lease)(m) || isExited(lease)(m) || isReleased(lease)(m)
	}
}

// send pushes a command onto the stream.
func (s *fakeStream) send(t *testing.T, c *pb.ConnectResponse) {
	t.Helper()
	select {
	case s.cmds <- c:
	default:
		t.Fatalf("fake scheduler: command buffer of stream full")
	}
}

// sendWait pushes a command onto the stream, waiting for room.
func (s *fakeStream) sendWait(t *testing.T, c *pb.ConnectResponse) {
	t.Helper()
	select {
	case s.cmds <- c:
	case <-time.After(waitLimit):
		t.Fatalf("fake scheduler: command buffer of stream stayed full for %v", waitLimit)
	}
}

// requestID returns a fresh FetchLogs request id.
func (f *fakeScheduler) requestID() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nextReq++
	return f.nextReq
}

// hangUp ends the stream from the scheduler's side.
func (s *fakeStream) hangUp() { s.hangOnce.Do(func() { close(s.hangup) }) }

// fetchLogs asks for a lease's logs on s with the given token and returns
// the reassembled data and the last chunk (the one with eof). It checks that
// exactly one chunk has eof and that it is the last one so far.
func (f *fakeScheduler) fetchLogs(t *testing.T, s *fakeStream, token int64, lease string) ([]byte, *pb.LogChunk) {
	t.Helper()
	rid := f.requestID()
	s.send(t, fetchCmd(token, rid, lease))
	mine := func(m *pb.ConnectRequest) bool {
		return m.GetLogChunk() != nil && m.GetLogChunk().GetRequestId() == rid
	}
	f.await(t, "the last LogChunk of request "+strconv.Itoa(int(rid)), func(m *pb.ConnectRequest) bool {
		return mine(m) && m.GetLogChunk().GetEof()
	})
	chunks := f.received(mine)
	var data []byte
	for i, m := range chunks {
		c := m.GetLogChunk()
		if c.GetEof() != (i == len(chunks)-1) {
			t.Fatalf("FetchLogs %s: chunk %d of %d has eof=%v; want eof on the last chunk only", lease, i+1, len(chunks), c.GetEof())
		}
		data = append(data, c.GetData()...)
	}
	return data, chunks[len(chunks)-1].GetLogChunk()
}

// barrier proves that every command sent on s before it has been handled:
// the agent handles commands in order and queues every report of a command
// before reading the next, so once the answer to this FetchLogs is in, any
// report of an earlier command is in too.
func (f *fakeScheduler) barrier(t *testing.T, s *fakeStream, token int64) {
	t.Helper()
	if _, last := f.fetchLogs(t, s, token, "barrier"); last.GetError() == "" {
		t.Fatalf("barrier: FetchLogs of an unknown lease gave no error")
	}
}

// ---------------------------------------------------------------------------
// Commands.

func startCmd(token int64, s *pb.StartLease) *pb.ConnectResponse {
	return &pb.ConnectResponse{FencingToken: token, Msg: &pb.ConnectResponse_StartLease{StartLease: s}}
}

func releaseCmd(token int64, lease string, grace time.Duration) *pb.ConnectResponse {
	return &pb.ConnectResponse{FencingToken: token, Msg: &pb.ConnectResponse_ReleaseLease{ReleaseLease: &pb.ReleaseLease{
		LeaseId: lease, Grace: durationpb.New(grace), Reason: "test",
	}}}
}

func fetchCmd(token int64, rid uint64, lease string) *pb.ConnectResponse {
	return &pb.ConnectResponse{FencingToken: token, Msg: &pb.ConnectResponse_FetchLogs{FetchLogs: &pb.FetchLogs{
		RequestId: rid, LeaseId: lease,
	}}}
}

func welcomeCmd(token int64) *pb.ConnectResponse {
	return &pb.ConnectResponse{FencingToken: token, Msg: &pb.ConnectResponse_Welcome{Welcome: &pb.Welcome{
		HeartbeatInterval: durationpb.New(2 * time.Second),
	}}}
}

// shLease is a one-node lease running script under sh -c.
func shLease(id, script string) *pb.StartLease {
	return &pb.StartLease{
		LeaseId: id, JobId: "job-" + id, Command: []string{"sh", "-c", script},
		Nodes: []string{"node-a"}, MasterAddr: "node-a:29500",
	}
}

// ---------------------------------------------------------------------------
// Nodes and agents.

// testNode is one simulated GPU node: a mock DGX H100 and a data dir that
// outlive any one agent process on it.
type testNode struct {
	name string
	gpus *gpu.Backend
	dir  string
}

func newNode(t *testing.T, name string) *testNode {
	t.Helper()
	b, err := gpu.OpenMock(gpu.BackendMockDGXH100, gpu.MockOptions{NodeName: name})
	if err != nil {
		t.Fatalf("OpenMock: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return &testNode{name: name, gpus: b, dir: t.TempDir()}
}

// config is the node's agent configuration for the given endpoints.
func (n *testNode) config(t *testing.T, servers ...string) Config {
	return Config{
		NodeID: n.name, Servers: servers, NVML: n.gpus.NVML, Mock: n.gpus.Mock, DataDir: n.dir,
		Labels:    map[string]string{"pool": "test", "rack": "r1"},
		Address:   n.name + ".test",
		StopGrace: 5 * time.Second,
		Logger:    zaptest.NewLogger(t),
	}
}

// scratchDir and logFile are where the agent keeps a lease's files.
func (n *testNode) scratchDir(lease string) string {
	return filepath.Join(n.dir, "leases", lease, "scratch")
}

func (n *testNode) logFile(lease string) string {
	return filepath.Join(n.dir, "leases", lease, "output.log")
}

// runningAgent is an agent whose Run is in progress.
type runningAgent struct {
	*Agent
	cancel  context.CancelFunc
	done    chan struct{}
	err     error
	stopped sync.Once
}

// runAgent builds an agent from cfg and runs it until stop or the end of
// the test.
func runAgent(t *testing.T, cfg Config) *runningAgent {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &runningAgent{Agent: a, cancel: cancel, done: make(chan struct{})}
	go func() { defer close(r.done); r.err = a.Run(ctx) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels Run and waits for it to return.
func (r *runningAgent) stop(t *testing.T) {
	t.Helper()
	r.stopped.Do(func() {
		r.cancel()
		select {
		case <-r.done:
			if r.err != nil {
				t.Errorf("Run returned %v; want nil after cancel", r.err)
			}
		case <-time.After(waitLimit):
			t.Fatalf("Run did not return within %v of cancel", waitLimit)
		}
	})
}

// ---------------------------------------------------------------------------
// Processes.

// processGone reports whether pid no longer exists (it has been reaped).
func processGone(pid int) bool { return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) }

// processDead reports whether pid is gone or a zombie: an orphan is reaped
// by init, which may take its time, but a zombie runs nothing.
func processDead(pid int) bool {
	if processGone(pid) {
		return true
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	f := bytes.Fields(b[bytes.LastIndexByte(b, ')')+1:])
	return len(f) > 0 && (f[0][0] == 'Z' || f[0][0] == 'X')
}

// readPID reads a pid a command wrote to a file, waiting for it to appear.
func readPID(t *testing.T, path string) int {
	t.Helper()
	var pid int
	eventually(t, "a pid in "+path, func() bool {
		b, err := os.ReadFile(path)
		if err != nil || !bytes.HasSuffix(b, []byte("\n")) {
			return false
		}
		pid, err = strconv.Atoi(string(bytes.TrimSpace(b)))
		return err == nil && pid > 0
	})
	return pid
}

// heldLeaseIDs lists the lease ids of a hello.
func heldLeaseIDs(h *pb.AgentHello) []string {
	var ids []string
	for _, l := range h.GetLeases() {
		ids = append(ids, l.GetLeaseId())
	}
	slices.Sort(ids)
	return ids
}
