package gateway

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/grpc-ecosystem/grpc-gateway/v2/runtime"
	"go.uber.org/zap"
	_ "google.golang.org/genproto/googleapis/rpc/errdetails" // error details (BadRequest, ErrorInfo) must resolve in JSON
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	gwpb "github.com/gpusched/gpusched/proto/gateway/gpusched/v1"
	"github.com/gpusched/gpusched/proto/gpusched/v1/openapi"
)

// Defaults for the zero values of Config.
const (
	DefaultCallTimeout       = 30 * time.Second
	DefaultStreamTimeout     = time.Hour
	DefaultMaxBodyBytes      = 16 << 20
	DefaultBodyTimeout       = time.Minute
	DefaultReadHeaderTimeout = 10 * time.Second
	DefaultIdleTimeout       = 2 * time.Minute
	DefaultShutdownTimeout   = 5 * time.Second
)

// Paths the gateway serves besides the API routes under /v1/.
const (
	// OpenAPIPath serves the merged OpenAPI v2 document of every route.
	OpenAPIPath = "/openapi.json"
	// HealthPath answers 200 while the gateway serves and its connection
	// to the scheduler's gRPC server is not failing, 503 otherwise.
	HealthPath = "/healthz"
)

// ErrConfig: the gateway's configuration is unusable.
var ErrConfig = errors.New("gateway: invalid config")

// Config configures a Gateway.
type Config struct {
	// GRPCAddr is the scheduler replica's own gRPC address (host:port),
	// normally its listener's address. The gateway dials it; an
	// unspecified host (0.0.0.0, [::] or none) is dialled on loopback, see
	// LoopbackAddr. Required.
	GRPCAddr string
	// DialOptions are added after the gateway's own: plaintext transport
	// credentials (the loopback hop) and the deadline interceptors. Pass
	// transport credentials here once the gRPC server requires TLS.
	DialOptions []grpc.DialOption
	// CallTimeout is the deadline of a unary call whose request sets none
	// (a client may send a shorter or longer one in the Grpc-Timeout
	// header, e.g. "10S"). Default 30s.
	CallTimeout time.Duration
	// StreamTimeout is the deadline of a streaming call (WatchJobs,
	// GetJobLogs, WatchTelemetry) whose request sets none. A watch that
	// reaches it ends with DEADLINE_EXCEEDED and resumes from its last
	// cursor. Default 1h.
	StreamTimeout time.Duration
	// MaxBodyBytes bounds a request body; a larger one gets 413.
	// Default 16 MiB.
	MaxBodyBytes int64
	// BodyTimeout bounds reading a request body. Default 1m.
	BodyTimeout time.Duration
	// ReadHeaderTimeout bounds reading a request's headers. Default 10s.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes keep-alive connections idle this long. Default 2m.
	IdleTimeout time.Duration
	// ShutdownTimeout bounds the graceful stop once Serve's context ends:
	// streams are cut at once, unary calls in flight get this long to
	// finish. Default 5s.
	ShutdownTimeout time.Duration
	// Logger receives the HTTP server's errors. Default: none.
	Logger *zap.Logger
}

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.CallTimeout, DefaultCallTimeout)
	def(&c.StreamTimeout, DefaultStreamTimeout)
	def(&c.BodyTimeout, DefaultBodyTimeout)
	def(&c.ReadHeaderTimeout, DefaultReadHeaderTimeout)
	def(&c.IdleTimeout, DefaultIdleTimeout)
	def(&c.ShutdownTimeout, DefaultShutdownTimeout)
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
}

// Gateway is the REST/JSON front of one scheduler replica. It is an
// http.Handler; Serve runs it on a listener.
type Gateway struct {
	cfg       Config
	conn      *grpc.ClientConn
	gw        *runtime.ServeMux
	marshaler runtime.Marshaler
	handler   http.Handler
	// closing ends when the gateway stops: every stream still open is cut.
	closing     context.Context
	stopStreams context.CancelFunc
}

var _ http.Handler = (*Gateway)(nil)

// New returns a gateway for the replica at cfg.GRPCAddr. It connects
// lazily: the replica need not serve yet. Close releases the connection.
func New(cfg Config) (*Gateway, error) {
	cfg.setDefaults()
	if cfg.GRPCAddr == "" {
		return nil, fmt.Errorf("%w: GRPCAddr is required", ErrConfig)
	}
	g := &Gateway{cfg: cfg}
	g.closing, g.stopStreams = context.WithCancel(context.Background())
	opts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(g.unaryDeadline),
		grpc.WithChainStreamInterceptor(g.streamDeadline),
	}, cfg.DialOptions...)
	conn, err := grpc.NewClient(LoopbackAddr(cfg.GRPCAddr), opts...)
	if err != nil {
		g.stopStreams()
		return nil, fmt.Errorf("gateway: dial %s: %w", cfg.GRPCAddr, err)
	}
	g.conn = conn
	g.marshaler = &runtime.JSONPb{
		// lowerCamel field names, enums as names, unset fields left out.
		MarshalOptions: protojson.MarshalOptions{EmitUnpopulated: false, UseProtoNames: false},
		// Both field spellings are accepted; an unknown field is a 400,
		// so a typo never goes unnoticed.
		UnmarshalOptions: protojson.UnmarshalOptions{DiscardUnknown: false},
	}
	// Headers reach the server as grpc-gateway's default matcher has it:
	// Authorization as "authorization", the other standard headers as
	// "grpcgateway-<Header>"; arbitrary metadata (Grpc-Metadata-*) is not
	// forwarded, so no REST client can forge what the replicas exchange
	// among themselves (gpusched-forwarded).
	g.gw = runtime.NewServeMux(runtime.WithMarshalerOption(runtime.MIMEWildcard, g.marshaler))
	ctx := context.Background() // only used to register; the handlers use each request's
	for _, register := range []func(context.Context, *runtime.ServeMux, *grpc.ClientConn) error{
		gwpb.RegisterJobServiceHandler,
		gwpb.RegisterNodeServiceHandler,
		gwpb.RegisterClusterServiceHandler,
		gwpb.RegisterTenantServiceHandler,
		gwpb.RegisterQueueServiceHandler,
		gwpb.RegisterTelemetryServiceHandler,
	} {
		if err := register(ctx, g.gw, conn); err != nil {
			_ = g.Close()
			return nil, fmt.Errorf("gateway: register routes: %w", err)
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+OpenAPIPath, serveOpenAPI)
	mux.HandleFunc("GET "+HealthPath, g.serveHealth)
	mux.Handle("/", g.readBody(g.gw))
	g.handler = mux
	return g, nil
}

// ServeHTTP serves one REST request.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) { g.handler.ServeHTTP(w, r) }

// Serve serves HTTP on lis until ctx ends, then stops gracefully within
// Config.ShutdownTimeout: no new requests, open streams cut at once,
// unary calls in flight allowed to finish. It closes lis.
func (g *Gateway) Serve(ctx context.Context, lis net.Listener) error {
	srv := &http.Server{
		Handler:           g,
		ReadHeaderTimeout: g.cfg.ReadHeaderTimeout,
		IdleTimeout:       g.cfg.IdleTimeout,
		// No ReadTimeout or WriteTimeout: they would cut streams. Bodies
		// are bounded by readBody, calls by their deadlines.
		ErrorLog: zap.NewStdLog(g.cfg.Logger.Named("http")),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	select {
	case err := <-served:
		g.stopStreams()
		return fmt.Errorf("gateway: serve: %w", err)
	case <-ctx.Done():
	}
	g.stopStreams()
	sctx, cancel := context.WithTimeout(context.Background(), g.cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		g.cfg.Logger.Warn("gateway: graceful stop timed out; closing connections", zap.Error(err))
		_ = srv.Close()
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("gateway: serve: %w", err)
	}
	return nil
}

// Close cuts open streams and closes the connection to the scheduler.
// Call it after Serve has returned.
func (g *Gateway) Close() error {
	g.stopStreams()
	return g.conn.Close()
}

// LoopbackAddr turns a listener address into one to dial on this machine:
// an unspecified host (0.0.0.0, ::, or none) becomes the loopback address
// of the same family; any other address is returned as is.
func LoopbackAddr(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	switch ip := net.ParseIP(host); {
	case host == "":
		host = "127.0.0.1"
	case ip == nil || !ip.IsUnspecified():
		return addr
	case ip.To4() != nil:
		host = "127.0.0.1"
	default:
		host = "::1"
	}
	return net.JoinHostPort(host, port)
}

// unaryDeadline gives a unary call without a deadline Config.CallTimeout.
func (g *Gateway) unaryDeadline(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, g.cfg.CallTimeout)
		defer cancel()
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

// streamDeadline gives a stream without a deadline Config.StreamTimeout
// and ends it when the gateway stops, so a graceful stop never waits on an
// endless watch.
func (g *Gateway) streamDeadline(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	var cancel context.CancelFunc
	if _, ok := ctx.Deadline(); ok {
		ctx, cancel = context.WithCancel(ctx)
	} else {
		ctx, cancel = context.WithTimeout(ctx, g.cfg.StreamTimeout)
	}
	// The stream lives as long as its HTTP request, whose context net/http
	// cancels when the handler returns; that also unhooks it from closing.
	unhook := context.AfterFunc(g.closing, cancel)
	context.AfterFunc(ctx, func() { unhook() })
	cs, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		cancel()
		return nil, err
	}
	return &cutStream{ClientStream: cs, closing: g.closing}, nil
}

// errStopping ends the streams a stopping gateway cuts: UNAVAILABLE, so
// clients retry (a watch from its last cursor) rather than give up.
var errStopping = status.Error(codes.Unavailable, "gpusched gateway is stopping; retry (a watch: from its last cursor)")

// cutStream reports a stream the stopping gateway cut as errStopping
// instead of a bare CANCELLED.
type cutStream struct {
	grpc.ClientStream
	closing context.Context
}

var _ grpc.ClientStream = (*cutStream)(nil)

// RecvMsg receives the next message of the stream.
func (s *cutStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err != nil && s.closing.Err() != nil && status.Code(err) == codes.Canceled {
		return errStopping
	}
	return err
}

// readBody reads a request's body up front, bounded in size
// (Config.MaxBodyBytes) and time (Config.BodyTimeout), so that a slow or
// huge upload cannot hold a call open; streams keep no read deadline.
func (g *Gateway) readBody(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body == nil || r.Body == http.NoBody {
			next.ServeHTTP(w, r)
			return
		}
		rc := http.NewResponseController(w)
		_ = rc.SetReadDeadline(time.Now().Add(g.cfg.BodyTimeout))
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, g.cfg.MaxBodyBytes))
		_ = rc.SetReadDeadline(time.Time{})
		if err != nil {
			code, httpCode := codes.InvalidArgument, http.StatusBadRequest
			var tooBig *http.MaxBytesError
			var nerr net.Error
			switch {
			case errors.As(err, &tooBig):
				httpCode = http.StatusRequestEntityTooLarge
				err = fmt.Errorf("request body larger than %d bytes", tooBig.Limit)
			case errors.As(err, &nerr) && nerr.Timeout():
				code, httpCode = codes.DeadlineExceeded, http.StatusRequestTimeout
				err = fmt.Errorf("request body not read within %s", g.cfg.BodyTimeout)
			}
			runtime.HTTPError(r.Context(), g.gw, g.marshaler, w, r,
				&runtime.HTTPStatusError{HTTPStatus: httpCode, Err: status.Error(code, err.Error())})
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		next.ServeHTTP(w, r)
	})
}

func serveOpenAPI(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(openapi.JSON())
}

func (g *Gateway) serveHealth(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	switch st := g.conn.GetState(); st {
	case connectivity.TransientFailure, connectivity.Shutdown:
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintf(w, "scheduler gRPC connection: %s\n", st)
	default:
		if st == connectivity.Idle {
			g.conn.Connect()
		}
		fmt.Fprintln(w, "ok")
	}
}
