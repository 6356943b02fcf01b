package scheduler

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
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

// leaderView is who leads and where it listens, as this replica last saw
// it in etcd.
type leaderView struct {
	name  string // "" while no leader is elected
	token int64  // create revision of the leader's election key
	addr  string // from the leader's replica record; "" until it is seen
}

// currentLeader returns who leads: the view kept by followLeader, or,
// while that has none (before its first read, after a broken watch), a
// read of etcd.
func (s *Scheduler) currentLeader(ctx context.Context) (leaderView, error) {
	if v := s.leaderSeen.Load(); v != nil {
		return *v, nil
	}
	return s.readLeader(ctx)
}

// readLeader reads who leads and its address from etcd.
func (s *Scheduler) readLeader(ctx context.Context) (leaderView, error) {
	name, token, err := s.leader(ctx)
	if err != nil || name == "" {
		return leaderView{}, err
	}
	v := leaderView{name: name, token: token}
	resp, err := s.cfg.Etcd.Get(ctx, s.replicaPrefix()+name)
	if err != nil {
		return leaderView{}, fmt.Errorf("scheduler: read replica %s: %w", name, err)
	}
	if len(resp.Kvs) > 0 {
		if v.addr, err = replicaAddr(resp.Kvs[0].Value); err != nil {
			return leaderView{}, fmt.Errorf("scheduler: corrupt replica record %s: %w", name, err)
		}
	}
	return v, nil
}

func replicaAddr(record []byte) (string, error) {
	var r pb.Replica
	if err := proto.Unmarshal(record, &r); err != nil {
		return "", err
	}
	return r.GetAddress(), nil
}

// peerAddr is the address of the leader named in v when it is another
// replica, or why there is none.
func (s *Scheduler) peerAddr(v leaderView) (string, error) {
	switch {
	case v.name == "":
		return "", model.Errorf(model.ErrNotLeader, "no leader elected yet")
	case v.name == s.cfg.Name:
		return "", model.Errorf(model.ErrNotLeader, "this replica was just elected and is still loading")
	case v.addr == "":
		return "", model.Errorf(model.ErrNotLeader, "leader %s has not announced its address", v.name)
	}
	return v.addr, nil
}

// agentLeaderAddr is where a replica that cannot serve an agent sends it
// (api.Backend.LeaderAddr): the leader's address, or this replica's own
// while it leads but is still loading its state, so the agent comes back
// here after a while. It reads no etcd while the view is kept: every
// refused agent asks, thousands a second during a cold start.
func (s *Scheduler) agentLeaderAddr(ctx context.Context) (string, error) {
	if s.elected.Load() {
		return s.cfg.Address, nil
	}
	v, err := s.currentLeader(ctx)
	if err != nil {
		return "", err
	}
	return s.peerAddr(v)
}

// leaderAddr returns the gRPC address of the leading replica, when it is
// another one, for forwarding. It answers from the view; only when the
// view names no usable leader (an election, or a change etcd has and the
// watch has not delivered yet) does it read etcd, so a client is not
// turned away by a view a few milliseconds old.
func (s *Scheduler) leaderAddr(ctx context.Context) (string, error) {
	if s.elected.Load() {
		return "", model.Errorf(model.ErrNotLeader, "this replica leads and is still loading")
	}
	v, err := s.currentLeader(ctx)
	if err != nil {
		return "", err
	}
	addr, err := s.peerAddr(v)
	if err == nil || s.leaderSeen.Load() == nil {
		return addr, err // answered from the view, or already read
	}
	if v, err = s.readLeader(ctx); err != nil {
		return "", err
	}
	return s.peerAddr(v)
}

// leaderConn returns a connection to the leading replica, for forwarding.
func (s *Scheduler) leaderConn(ctx context.Context) (*grpc.ClientConn, error) {
	addr, err := s.leaderAddr(ctx)
	if err != nil {
		return nil, err
	}
	return s.peers.get(addr)
}

// followLeader keeps s.leaderSeen up to date from one etcd watch of the
// election keys and the replica records, until ctx ends. While it has no
// view (before its first read, after a broken watch) leaderSeen is nil and
// callers read etcd themselves.
func (s *Scheduler) followLeader(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := s.watchLeader(ctx)
		s.leaderSeen.Store(nil)
		if ctx.Err() != nil {
			return
		}
		s.log.Debug("leader watch ended; watching again", zap.Error(err), zap.Duration("retry_in", backoff))
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// watchLeader reads the election keys and replica records at one revision,
// publishes the view and then follows both prefixes from the next
// revision, publishing each change, until the watch fails or ctx ends.
func (s *Scheduler) watchLeader(ctx context.Context) error {
	// WithRequireLeader: a replica cut off from etcd's quorum loses its
	// view (and falls back to reads, which fail) instead of keeping a
	// stale one.
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	elPfx, repPfx := s.leaderPrefix()+"/", s.replicaPrefix()
	resp, err := s.cfg.Etcd.Txn(ctx).Then(
		clientv3.OpGet(elPfx, clientv3.WithPrefix()),
		clientv3.OpGet(repPfx, clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return fmt.Errorf("scheduler: read leader: %w", err)
	}
	t := leaderTracker{candidates: map[string]candidate{}, addrs: map[string]string{}}
	for _, kv := range resp.Responses[0].GetResponseRange().GetKvs() {
		t.candidates[string(kv.Key)] = candidate{name: string(kv.Value), rev: kv.CreateRevision}
	}
	for _, kv := range resp.Responses[1].GetResponseRange().GetKvs() {
		t.putReplica(strings.TrimPrefix(string(kv.Key), repPfx), kv.Value)
	}
	s.leaderSeen.Store(t.view())
	from := clientv3.WithRev(resp.Header.Revision + 1)
	// Both watches share the client's one watch stream (same context).
	elWatch := s.cfg.Etcd.Watch(ctx, elPfx, clientv3.WithPrefix(), from)
	repWatch := s.cfg.Etcd.Watch(ctx, repPfx, clientv3.WithPrefix(), from)
	for {
		var wr clientv3.WatchResponse
		var ok, election bool
		select {
		case wr, ok = <-elWatch:
			election = true
		case wr, ok = <-repWatch:
		}
		if !ok {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return errors.New("scheduler: leader watch closed")
		}
		if err := wr.Err(); err != nil {
			return fmt.Errorf("scheduler: leader watch: %w", err)
		}
		for _, ev := range wr.Events {
			key := string(ev.Kv.Key)
			switch {
			case election && ev.Type == clientv3.EventTypePut:
				t.candidates[key] = candidate{name: string(ev.Kv.Value), rev: ev.Kv.CreateRevision}
			case election:
				delete(t.candidates, key)
			case ev.Type == clientv3.EventTypePut:
				t.putReplica(strings.TrimPrefix(key, repPfx), ev.Kv.Value)
			default:
				delete(t.addrs, strings.TrimPrefix(key, repPfx))
			}
		}
		if len(wr.Events) > 0 {
			s.leaderSeen.Store(t.view())
		}
	}
}

// leaderTracker is the state behind the view: every election key (the one
// created first leads) and every replica's address.
type leaderTracker struct {
	candidates map[string]candidate // election key → campaigner
	addrs      map[string]string    // replica name → address
}

type candidate struct {
	name string
	rev  int64 // create revision
}

func (t *leaderTracker) putReplica(name string, record []byte) {
	if addr, err := replicaAddr(record); err == nil {
		t.addrs[name] = addr
	} else {
		delete(t.addrs, name)
	}
}

func (t *leaderTracker) view() *leaderView {
	v := &leaderView{}
	for _, c := range t.candidates {
		if v.name == "" || c.rev < v.token {
			v.name, v.token = c.name, c.rev
		}
	}
	if v.name != "" {
		v.addr = t.addrs[v.name]
	}
	return v
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
