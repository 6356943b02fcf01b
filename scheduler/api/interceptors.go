package api

import (
	"context"
	"runtime/debug"
	"time"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// ServerOptions returns the server's options: keepalive policy and the
// interceptor chain every RPC passes, in order: metrics (when obs is
// given; outermost, so it also counts the Internal errors recovered from
// panics), panic recovery, then logging. Authentication and authorization
// join this chain; nothing registers interceptors elsewhere.
func ServerOptions(log *zap.Logger, obs ...RPCObserver) []grpc.ServerOption {
	unary, stream := interceptors(log, obs)
	return []grpc.ServerOption{
		// Agents ping every 10s to detect dead peers; allow it.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
	}
}

// interceptors returns the chain, outermost first.
func interceptors(log *zap.Logger, obs []RPCObserver) ([]grpc.UnaryServerInterceptor, []grpc.StreamServerInterceptor) {
	var unary []grpc.UnaryServerInterceptor
	var stream []grpc.StreamServerInterceptor
	var all observers
	for _, o := range obs {
		if o != nil {
			all = append(all, o)
		}
	}
	// However many observers, one interceptor: each is a frame on every
	// agent stream's goroutine stack, which the GC scans on every cycle,
	// and a wrapper every message passes.
	switch len(all) {
	case 0:
	case 1:
		unary, stream = append(unary, observeUnary(all[0])), append(stream, observeStream(all[0]))
	default:
		unary, stream = append(unary, observeUnary(all)), append(stream, observeStream(all))
	}
	unary = append(unary, recoverUnary(log), logUnary(log))
	stream = append(stream, recoverStream(log), logStream(log))
	return unary, stream
}

// RPCObserver sees every RPC the server handles, for metrics. Its methods
// are called on the RPCs' goroutines and must not block.
type RPCObserver interface {
	// RPCDone is called once per RPC as it ends, with its full method name
	// ("/gpusched.v1.JobService/SubmitJob"), status code and duration
	// (for a stream, its whole life).
	RPCDone(method string, code codes.Code, took time.Duration)
	// TelemetryReceived is called with the GPU samples of each telemetry
	// batch an agent stream delivers.
	TelemetryReceived(samples int)
	// TelemetryDropped is called with the samples a telemetry stream tells
	// its watcher it missed (each message's dropped count).
	TelemetryDropped(samples uint64)
}

// observers is several RPCObservers as one, called in order.
type observers []RPCObserver

var _ RPCObserver = observers(nil)

func (os observers) RPCDone(method string, code codes.Code, took time.Duration) {
	for _, o := range os {
		o.RPCDone(method, code, took)
	}
}

func (os observers) TelemetryReceived(samples int) {
	for _, o := range os {
		o.TelemetryReceived(samples)
	}
}

func (os observers) TelemetryDropped(samples uint64) {
	for _, o := range os {
		o.TelemetryDropped(samples)
	}
}

func observeUnary(o RPCObserver) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := h(ctx, req)
		o.RPCDone(info.FullMethod, status.Code(err), time.Since(start))
		return resp, err
	}
}

func observeStream(o RPCObserver) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		start := time.Now()
		err := h(srv, observedStream{ServerStream: ss, o: o})
		o.RPCDone(info.FullMethod, status.Code(err), time.Since(start))
		return err
	}
}

// observedStream counts the telemetry a stream carries: batches agents
// send (ConnectRequest.telemetry) and drops told to watchers (the dropped
// field of WatchTelemetryResponse and its kin).
type observedStream struct {
	grpc.ServerStream
	o RPCObserver
}

func (s observedStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err == nil {
		if r, ok := m.(interface{ GetTelemetry() *pb.TelemetryBatch }); ok {
			if b := r.GetTelemetry(); b != nil {
				s.o.TelemetryReceived(len(b.GetSamples()))
			}
		}
	}
	return err
}

func (s observedStream) SendMsg(m any) error {
	err := s.ServerStream.SendMsg(m)
	if err == nil {
		if r, ok := m.(interface{ GetDropped() uint64 }); ok {
			if n := r.GetDropped(); n > 0 {
				s.o.TelemetryDropped(n)
			}
		}
	}
	return err
}

func recoverUnary(log *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				log.Error("panic in handler", zap.String("method", info.FullMethod), zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
				err = status.Error(codes.Internal, "internal error")
			}
		}()
		return h(ctx, req)
	}
}

func recoverStream(log *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
		defer func() {
			if r := recover(); r != nil {
				log.Error("panic in stream handler", zap.String("method", info.FullMethod), zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
				err = status.Error(codes.Internal, "internal error")
			}
		}()
		return h(srv, ss)
	}
}

func logUnary(log *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := h(ctx, req)
		if ce := log.Check(zap.DebugLevel, "rpc"); ce != nil || err != nil {
			fields := []zap.Field{zap.String("method", info.FullMethod), zap.Duration("took", time.Since(start)), zap.Stringer("code", status.Code(err))}
			if err != nil {
				log.Info("rpc failed", append(fields, zap.Error(err))...)
			} else {
				ce.Write(fields...)
			}
		}
		return resp, err
	}
}

func logStream(log *zap.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		start := time.Now()
		err := h(srv, ss)
		log.Debug("stream ended", zap.String("method", info.FullMethod), zap.Duration("took", time.Since(start)), zap.Stringer("code", status.Code(err)))
		return err
	}
}
