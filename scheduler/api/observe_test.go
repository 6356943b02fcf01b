package api

import (
	"context"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// recorder is an RPCObserver that remembers what it saw.
type recorder struct {
	mu       sync.Mutex
	done     []string // method code
	received int
	dropped  uint64
}

func (r *recorder) RPCDone(method string, code codes.Code, _ time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.done = append(r.done, method+" "+code.String())
}

func (r *recorder) TelemetryReceived(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.received += n
}

func (r *recorder) TelemetryDropped(n uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dropped += n
}

// fakeStream hands out one ConnectRequest and accepts every send.
type fakeStream struct {
	grpc.ServerStream
	in *pb.ConnectRequest
}

func (f *fakeStream) Context() context.Context { return context.Background() }
func (f *fakeStream) SendMsg(any) error        { return nil }
func (f *fakeStream) RecvMsg(m any) error {
	m.(*pb.ConnectRequest).Msg = f.in.Msg
	return nil
}

func TestObserveStreamCountsTelemetry(t *testing.T) {
	rec := &recorder{}
	in := &pb.ConnectRequest{Msg: &pb.ConnectRequest_Telemetry{Telemetry: &pb.TelemetryBatch{Samples: make([]*pb.GpuSample, 8)}}}
	err := observeStream(rec)(nil, &fakeStream{in: in}, &grpc.StreamServerInfo{FullMethod: "/gpusched.v1.AgentService/Connect"},
		func(_ any, ss grpc.ServerStream) error {
			for range 2 {
				if err := ss.RecvMsg(&pb.ConnectRequest{}); err != nil {
					return err
				}
			}
			_ = ss.SendMsg(&pb.WatchTelemetryResponse{Dropped: 3})
			_ = ss.SendMsg(&pb.WatchTelemetryResponse{})
			_ = ss.SendMsg(&pb.ConnectResponse{})
			return status.Error(codes.Unavailable, "gone")
		})
	if status.Code(err) != codes.Unavailable {
		t.Errorf("interceptor returned %v, want the handler's error", err)
	}
	if rec.received != 16 || rec.dropped != 3 {
		t.Errorf("received %d samples, dropped %d; want 16 and 3", rec.received, rec.dropped)
	}
	if len(rec.done) != 1 || rec.done[0] != "/gpusched.v1.AgentService/Connect Unavailable" {
		t.Errorf("RPCDone calls %v, want one with the stream's method and code", rec.done)
	}
}

// A panic becomes Internal inside the chain, and the metrics interceptor,
// outermost, counts it as such.
func TestObserveUnarySeesRecoveredPanics(t *testing.T) {
	rec := &recorder{}
	unary, _ := interceptors(zap.NewNop(), []RPCObserver{rec})
	info := &grpc.UnaryServerInfo{FullMethod: "/gpusched.v1.JobService/GetJob"}
	var h grpc.UnaryHandler = func(context.Context, any) (any, error) { panic("boom") }
	for i := len(unary) - 1; i >= 0; i-- {
		ic, next := unary[i], h
		h = func(ctx context.Context, req any) (any, error) { return ic(ctx, req, info, next) }
	}
	if _, err := h(context.Background(), nil); status.Code(err) != codes.Internal {
		t.Errorf("err %v, want Internal", err)
	}
	if len(rec.done) != 1 || rec.done[0] != "/gpusched.v1.JobService/GetJob Internal" {
		t.Errorf("RPCDone calls %v, want GetJob Internal", rec.done)
	}
}

// Several observers share one interceptor, and each sees every RPC.
func TestSeveralObserversShareOneInterceptor(t *testing.T) {
	a, b := &recorder{}, &recorder{}
	unary, stream := interceptors(zap.NewNop(), []RPCObserver{a, nil, b})
	_, alone := interceptors(zap.NewNop(), nil)
	if len(stream) != len(alone)+1 || len(unary) != len(alone)+1 {
		t.Fatalf("%d stream interceptors with two observers, %d with none; want one more", len(stream), len(alone))
	}
	in := &pb.ConnectRequest{Msg: &pb.ConnectRequest_Telemetry{Telemetry: &pb.TelemetryBatch{Samples: make([]*pb.GpuSample, 2)}}}
	_ = stream[0](nil, &fakeStream{in: in}, &grpc.StreamServerInfo{FullMethod: "/gpusched.v1.AgentService/Connect"},
		func(_ any, ss grpc.ServerStream) error { return ss.RecvMsg(&pb.ConnectRequest{}) })
	for _, r := range []*recorder{a, b} {
		if r.received != 2 || len(r.done) != 1 || r.done[0] != "/gpusched.v1.AgentService/Connect OK" {
			t.Errorf("an observer saw %d samples and RPCs %v; want 2 and one Connect OK", r.received, r.done)
		}
	}
}
