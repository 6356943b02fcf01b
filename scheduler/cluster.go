package scheduler

import (
	"context"
	"fmt"
	"sort"
	"sync"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
)

// Replicas announce themselves under <prefix>/replicas/<name>, bound to
// their etcd session: a replica that dies disappears with its lease.
func (s *Scheduler) replicaPrefix() string { return s.cfg.Prefix + "/replicas/" }
func (s *Scheduler) leaderPrefix() string  { return s.cfg.Prefix + "/leader" }

// register announces this replica for the life of sess.
func (s *Scheduler) register(ctx context.Context, sess *concurrency.Session) error {
	b, err := proto.Marshal(&pb.Replica{Name: s.cfg.Name, Address: s.cfg.Address, StartTime: timestamppb.New(s.started)})
	if err != nil {
		return err
	}
	if _, err := s.cfg.Etcd.Put(ctx, s.replicaPrefix()+s.cfg.Name, string(b), clientv3.WithLease(sess.Lease())); err != nil {
		return fmt.Errorf("scheduler: register replica: %w", err)
	}
	return nil
}

// leader reads who leads from etcd: the election key with the lowest
// create revision, whose value is the leader's name and whose create
// revision is its fencing token.
func (s *Scheduler) leader(ctx context.Context) (name string, token int64, err error) {
	resp, err := s.cfg.Etcd.Get(ctx, s.leaderPrefix()+"/", clientv3.WithFirstCreate()...)
	if err != nil {
		return "", 0, fmt.Errorf("scheduler: read leader: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return "", 0, nil
	}
	return string(resp.Kvs[0].Value), resp.Kvs[0].CreateRevision, nil
}

// Status lists the live replicas and the leader, from etcd; any replica
// answers the same.
func (s *Scheduler) Status(ctx context.Context) (*pb.GetStatusResponse, error) {
	name, token, err := s.leader(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := s.cfg.Etcd.Get(ctx, s.replicaPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("scheduler: read replicas: %w", err)
	}
	out := &pb.GetStatusResponse{Leader: name, FencingToken: token, AnsweredBy: s.cfg.Name}
	for _, kv := range resp.Kvs {
		var r pb.Replica
		if err := proto.Unmarshal(kv.Value, &r); err != nil {
			return nil, fmt.Errorf("scheduler: corrupt replica record %s: %w", kv.Key, err)
		}
		r.Leader = r.GetName() == name
		out.Replicas = append(out.Replicas, &r)
	}
	sort.Slice(out.Replicas, func(i, j int) bool { return out.Replicas[i].GetName() < out.Replicas[j].GetName() })
	return out, nil
}

// leaderAddr returns the gRPC address of the leading replica, when it is
// another one.
func (s *Scheduler) leaderAddr(ctx context.Context) (string, error) {
	name, _, err := s.leader(ctx)
	if err != nil {
		return "", err
	}
	if name == "" {
		return "", model.Errorf(model.ErrNotLeader, "no leader elected yet")
	}
	if name == s.cfg.Name {
		return "", model.Errorf(model.ErrNotLeader, "this replica was just elected and is still loading")
	}
	resp, err := s.cfg.Etcd.Get(ctx, s.replicaPrefix()+name)
	if err != nil {
		return "", fmt.Errorf("scheduler: read replica %s: %w", name, err)
	}
	if len(resp.Kvs) == 0 {
		return "", model.Errorf(model.ErrNotLeader, "leader %s has not announced its address", name)
	}
	var r pb.Replica
	if err := proto.Unmarshal(resp.Kvs[0].Value, &r); err != nil {
		return "", fmt.Errorf("scheduler: corrupt replica record %s: %w", name, err)
	}
	return r.GetAddress(), nil
}

// leaderConn returns a connection to the leading replica, for forwarding.
func (s *Scheduler) leaderConn(ctx context.Context) (*grpc.ClientConn, error) {
	addr, err := s.leaderAddr(ctx)
	if err != nil {
		return nil, err
	}
	return s.peers.get(addr)
}

// peerConns caches one client connection per peer replica address.
type peerConns struct {
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

func (p *peerConns) get(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[addr]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("scheduler: dial leader %s: %w", addr, err)
	}
	if p.conns == nil {
		p.conns = map[string]*grpc.ClientConn{}
	}
	p.conns[addr] = c
	return c, nil
}

func (p *peerConns) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.conns = nil
}
