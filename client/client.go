package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Config configures a Client.
type Config struct {
	// Endpoints are scheduler addresses (host:port). Any replica will do;
	// the client moves to the next one when a replica is unavailable.
	Endpoints []string
	// CallTimeout bounds each unary call that has no deadline of its own.
	// Default 30s.
	CallTimeout time.Duration
	// AttemptTimeout bounds one try at one endpoint when there are several,
	// so a replica that froze is left for the next. Default 5s.
	AttemptTimeout time.Duration
	// Token, when set, is sent with every call as "authorization: Bearer
	// <token>" (tenant tokens; the scheduler checks them once
	// authentication is enabled).
	Token string
	// TLS, when set, secures the connections; nil means plaintext, for
	// loopback and trusted networks.
	TLS *tls.Config
	// DialOptions are added to every connection.
	DialOptions []grpc.DialOption
}

// Client talks to a gpusched cluster. It is safe for concurrent use.
type Client struct {
	cfg   Config
	mu    sync.Mutex
	conns []*grpc.ClientConn
	cur   int
}

// New returns a client. Connections are made lazily, so New does not fail
// when the cluster is down; the first call does.
func New(_ context.Context, cfg Config) (*Client, error) {
	var eps []string
	for _, e := range cfg.Endpoints {
		if e = strings.TrimSpace(e); e != "" {
			eps = append(eps, e)
		}
	}
	if len(eps) == 0 {
		return nil, fmt.Errorf("%w: no scheduler endpoint given (set --server or GPUSCHED_SERVER)", ErrInvalid)
	}
	cfg.Endpoints = eps
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = 30 * time.Second
	}
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = 5 * time.Second
	}
	c := &Client{cfg: cfg, conns: make([]*grpc.ClientConn, len(eps))}
	creds := insecure.NewCredentials()
	if cfg.TLS != nil {
		creds = credentials.NewTLS(cfg.TLS)
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if cfg.Token != "" {
		opts = append(opts, grpc.WithChainUnaryInterceptor(tokenUnary(cfg.Token)), grpc.WithChainStreamInterceptor(tokenStream(cfg.Token)))
	}
	opts = append(opts, cfg.DialOptions...)
	for i, ep := range eps {
		conn, err := grpc.NewClient(ep, opts...)
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("%w: endpoint %q: %v", ErrInvalid, ep, err)
		}
		c.conns[i] = conn
	}
	return c, nil
}

// Close releases the connections.
func (c *Client) Close() error {
	var errs []error
	for _, conn := range c.conns {
		if conn != nil {
			errs = append(errs, conn.Close())
		}
	}
	return errors.Join(errs...)
}

// call runs a unary fn against the current endpoint, moving on to the next
// one when it is unavailable or does not answer within AttemptTimeout (a
// frozen replica keeps its connection open but never replies), until every
// endpoint was tried.
func (c *Client) call(ctx context.Context, fn func(ctx context.Context, conn *grpc.ClientConn) error) error {
	return c.invoke(ctx, c.cfg.AttemptTimeout, fn)
}

// stream is call for streaming RPCs: no attempt timeout, since a stream
// may rightly last long.
func (c *Client) stream(ctx context.Context, fn func(ctx context.Context, conn *grpc.ClientConn) error) error {
	return c.invoke(ctx, 0, fn)
}

func (c *Client) invoke(ctx context.Context, attempt time.Duration, fn func(ctx context.Context, conn *grpc.ClientConn) error) error {
	// Unary calls get CallTimeout; a stream lasts as long as its ctx.
	if _, ok := ctx.Deadline(); !ok && attempt > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.cfg.CallTimeout)
		defer cancel()
	}
	backoff := 100 * time.Millisecond
	for {
		electing, err := c.round(ctx, attempt, fn)
		// Ride out an election: some replica answered that no leader is
		// reachable yet. If none answered at all, fail fast: the address is
		// wrong or the whole cluster is down.
		if err == nil || !electing || ctx.Err() != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// round tries each endpoint once, starting with the last one that worked.
// electing reports whether a replica said the cluster is between leaders.
func (c *Client) round(ctx context.Context, attempt time.Duration, fn func(ctx context.Context, conn *grpc.ClientConn) error) (electing bool, err error) {
	c.mu.Lock()
	start := c.cur
	c.mu.Unlock()
	for i := range c.conns {
		idx := (start + i) % len(c.conns)
		actx, cancel := ctx, context.CancelFunc(func() {})
		if attempt > 0 && len(c.conns) > 1 {
			actx, cancel = context.WithTimeout(ctx, attempt)
		}
		err = fromStatus(fn(actx, c.conns[idx]))
		cancel()
		if err == nil {
			c.mu.Lock()
			c.cur = idx
			c.mu.Unlock()
			return false, nil
		}
		var e *Error
		retry := errors.As(err, &e) && (e.Code == codes.Unavailable || e.Code == codes.DeadlineExceeded)
		if !retry || ctx.Err() != nil {
			return false, err
		}
		electing = electing || e.NoLeader
		if e.Code == codes.DeadlineExceeded {
			err = &Error{Code: codes.Unavailable, Message: fmt.Sprintf("unavailable: %s did not answer within %s", c.cfg.Endpoints[idx], attempt)}
		}
	}
	return electing, err
}

// SubmitOption changes how Submit submits.
type SubmitOption func(*pb.SubmitJobRequest)

// WithIdempotencyKey makes the submit safe to retry: the first submit with
// key creates the job, every later one (within the server's retention, at
// least 24h, per tenant) returns that same job.
func WithIdempotencyKey(key string) SubmitOption {
	return func(r *pb.SubmitJobRequest) { r.IdempotencyKey = key }
}

// Submit submits a job; it is PENDING and durable when Submit returns.
func (c *Client) Submit(ctx context.Context, spec *pb.JobSpec, opts ...SubmitOption) (*pb.Job, error) {
	req := &pb.SubmitJobRequest{Spec: spec}
	for _, o := range opts {
		o(req)
	}
	var resp *pb.SubmitJobResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewJobServiceClient(conn).SubmitJob(ctx, req)
		return err
	})
	return resp.GetJob(), err
}

// Get returns one job.
func (c *Client) Get(ctx context.Context, id string) (*pb.Job, error) {
	var resp *pb.GetJobResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewJobServiceClient(conn).GetJob(ctx, &pb.GetJobRequest{Id: id})
		return err
	})
	return resp.GetJob(), err
}

// List returns one page of jobs.
func (c *Client) List(ctx context.Context, req *pb.ListJobsRequest) (*pb.ListJobsResponse, error) {
	var resp *pb.ListJobsResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewJobServiceClient(conn).ListJobs(ctx, req)
		return err
	})
	return resp, err
}

// Cancel cancels a job that has not ended.
func (c *Client) Cancel(ctx context.Context, id, reason string) (*pb.Job, error) {
	var resp *pb.CancelJobResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewJobServiceClient(conn).CancelJob(ctx, &pb.CancelJobRequest{Id: id, Reason: reason})
		return err
	})
	return resp.GetJob(), err
}

// Terminal reports whether a job state is final.
func Terminal(s pb.JobState) bool {
	switch s {
	case pb.JobState_JOB_STATE_SUCCEEDED, pb.JobState_JOB_STATE_FAILED,
		pb.JobState_JOB_STATE_CANCELLED, pb.JobState_JOB_STATE_TIMED_OUT:
		return true
	}
	return false
}

// Wait polls a job until it ends (or ctx does) and returns its final form.
// Transient unavailability (a scheduler restarting) is waited out.
func (c *Client) Wait(ctx context.Context, id string) (*pb.Job, error) {
	delay := 50 * time.Millisecond
	for {
		job, err := c.Get(ctx, id)
		switch {
		case err == nil && Terminal(job.GetState()):
			return job, nil
		case err != nil && !errors.Is(err, ErrUnavailable):
			return nil, err
		}
		select {
		case <-ctx.Done():
			return job, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Second)
	}
}

// Logs streams a job's output; fn gets each chunk with its node and rank.
// With follow, it keeps streaming new output until the job ends.
func (c *Client) Logs(ctx context.Context, id string, follow bool, fn func(*pb.GetJobLogsResponse) error) error {
	return c.stream(ctx, func(ctx context.Context, conn *grpc.ClientConn) error {
		stream, err := pb.NewJobServiceClient(conn).GetJobLogs(ctx, &pb.GetJobLogsRequest{Id: id, Follow: follow})
		if err != nil {
			return err
		}
		return recvAll(stream, fn)
	})
}

// recvAll feeds every message of a server stream to fn until the stream
// ends (nil) or fails.
func recvAll[T any](stream grpc.ServerStreamingClient[T], fn func(*T) error) error {
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := fn(m); err != nil {
			return err
		}
	}
}

// Nodes lists the cluster's nodes.
func (c *Client) Nodes(ctx context.Context) ([]*pb.Node, error) {
	var resp *pb.ListNodesResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewNodeServiceClient(conn).ListNodes(ctx, &pb.ListNodesRequest{})
		return err
	})
	return resp.GetNodes(), err
}

// Node returns one node.
func (c *Client) Node(ctx context.Context, id string) (*pb.Node, error) {
	var resp *pb.GetNodeResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewNodeServiceClient(conn).GetNode(ctx, &pb.GetNodeRequest{Id: id})
		return err
	})
	return resp.GetNode(), err
}

// Status lists the scheduler replicas, which one leads and its fencing
// token.
func (c *Client) Status(ctx context.Context) (*pb.GetStatusResponse, error) {
	var resp *pb.GetStatusResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewClusterServiceClient(conn).GetStatus(ctx, &pb.GetStatusRequest{})
		return err
	})
	return resp, err
}

// Drain stops new leases on a node; with now, its current lease is stopped
// and the job requeued.
func (c *Client) Drain(ctx context.Context, node, reason string, now bool) (*pb.Node, error) {
	var resp *pb.DrainNodeResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewNodeServiceClient(conn).DrainNode(ctx, &pb.DrainNodeRequest{Id: node, Reason: reason, Now: now})
		return err
	})
	return resp.GetNode(), err
}

// Undrain returns a drained node to service.
func (c *Client) Undrain(ctx context.Context, node string) (*pb.Node, error) {
	var resp *pb.UndrainNodeResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewNodeServiceClient(conn).UndrainNode(ctx, &pb.UndrainNodeRequest{Id: node})
		return err
	})
	return resp.GetNode(), err
}

// InjectFault injects a fault into a simulated node (dev and test only).
func (c *Client) InjectFault(ctx context.Context, req *pb.InjectFaultRequest) error {
	return c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) error {
		_, err := pb.NewMockServiceClient(conn).InjectFault(ctx, req)
		return err
	})
}

// Label sets and removes operator labels on a node.
func (c *Client) Label(ctx context.Context, node string, set map[string]string, remove []string) (*pb.Node, error) {
	var resp *pb.LabelNodeResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewNodeServiceClient(conn).LabelNode(ctx, &pb.LabelNodeRequest{Id: node, Set: set, Remove: remove})
		return err
	})
	return resp.GetNode(), err
}

// SetTenant creates or replaces a tenant's limits and weight.
func (c *Client) SetTenant(ctx context.Context, t *pb.Tenant) (*pb.Tenant, error) {
	var resp *pb.SetTenantResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewTenantServiceClient(conn).SetTenant(ctx, &pb.SetTenantRequest{Tenant: t})
		return err
	})
	return resp.GetTenant(), err
}

// Tenants lists tenants with their usage.
func (c *Client) Tenants(ctx context.Context) ([]*pb.TenantUsage, error) {
	var resp *pb.ListTenantsResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewTenantServiceClient(conn).ListTenants(ctx, &pb.ListTenantsRequest{})
		return err
	})
	return resp.GetTenants(), err
}

// Queues lists queues with their job counts.
func (c *Client) Queues(ctx context.Context) ([]*pb.QueueUsage, error) {
	var resp *pb.ListQueuesResponse
	err := c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) (err error) {
		resp, err = pb.NewQueueServiceClient(conn).ListQueues(ctx, &pb.ListQueuesRequest{})
		return err
	})
	return resp.GetQueues(), err
}

// QueueService returns the raw queue API, for create, update, pause and
// resume.
func (c *Client) QueueService(ctx context.Context, fn func(ctx context.Context, q pb.QueueServiceClient) error) error {
	return c.call(ctx, func(ctx context.Context, conn *grpc.ClientConn) error {
		return fn(ctx, pb.NewQueueServiceClient(conn))
	})
}

// tokenUnary and tokenStream attach the bearer token to every call. They
// are interceptors rather than per-RPC credentials so that a token also
// travels over plaintext loopback connections (gRPC refuses per-RPC
// credentials without transport security).
func tokenUnary(token string) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		return invoker(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token), method, req, reply, cc, opts...)
	}
}

func tokenStream(token string) grpc.StreamClientInterceptor {
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		return streamer(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token), desc, cc, method, opts...)
	}
}
