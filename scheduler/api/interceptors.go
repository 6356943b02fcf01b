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
)

// ServerOptions returns the server's options: keepalive policy and the
// interceptor chain every RPC passes, in order: panic recovery, then logging. Authentication and
// authorization join this chain; nothing registers interceptors elsewhere.
func ServerOptions(log *zap.Logger) []grpc.ServerOption {
	return []grpc.ServerOption{
		// Agents ping every 10s to detect dead peers; allow it.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(recoverUnary(log), logUnary(log)),
		grpc.ChainStreamInterceptor(recoverStream(log), logStream(log)),
	}
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
