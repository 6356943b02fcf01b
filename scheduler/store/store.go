package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	etcdpb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
	"github.com/gpusched/gpusched/scheduler/wire"
)

// MaxOpsPerTxn is etcd's default --max-txn-ops; a Commit never exceeds it.
const MaxOpsPerTxn = 128

// loadPageSize bounds one range read while loading, so a cold start on a
// large cluster streams its state instead of asking for one huge response.
const loadPageSize = 5000

// ErrFenced means the leader key no longer has the expected create revision:
// this replica has been deposed and must stop writing.
var ErrFenced = errors.New("store: fenced out (no longer leader)")

// Fence identifies the current leader's election key and its create
// revision; writes commit only while that key still exists unchanged.
type Fence struct {
	Key      string
	Revision int64
}

// Change is a set of records that must land atomically (in one
// transaction), e.g. a placed job and its new lease. Nil fields are skipped.
type Change struct {
	Job    *model.Job
	Lease  *model.Lease
	Node   *model.Node
	Tenant *model.Tenant
	Queue  *model.Queue
	// Idem records an idempotency key with the job it created (same
	// transaction as the job); ExpireIdem deletes an expired one.
	Idem       *model.Idempotency
	ExpireIdem *model.Idempotency

	// JobRecord and LeaseRecord are set by Commit: the Job's and Lease's
	// records as written (when the same record is in the commit twice,
	// both get the one value). A caller may keep them, e.g. to hold an
	// ended job encoded without marshalling it again.
	JobRecord, LeaseRecord []byte
}

func (c Change) ops() int {
	n := 0
	if c.Job != nil {
		n++
	}
	if c.Lease != nil {
		n++
	}
	if c.Node != nil {
		n++
	}
	if c.Tenant != nil {
		n++
	}
	if c.Queue != nil {
		n++
	}
	if c.Idem != nil {
		n++
	}
	if c.ExpireIdem != nil {
		n++
	}
	return n
}

// Store reads and writes the scheduler's records in etcd.
type Store struct {
	cli *clientv3.Client
	// kv takes the commits as etcd's own request types: clientv3's Op
	// API would copy every record twice more on its way out, and a busy
	// leader writes thousands of records a second.
	kv      etcdpb.KVClient
	prefix  string
	commits atomic.Uint64
	// scratch holds encoding buffers (*[]byte) between commits, so a
	// commit's records are encoded without growing a new one each time.
	scratch sync.Pool
}

// New returns a store over cli using keys under prefix (e.g. "/gpusched").
func New(cli *clientv3.Client, prefix string) *Store {
	return &Store{cli: cli, kv: clientv3.RetryKVClient(cli), prefix: strings.TrimSuffix(prefix, "/")}
}

// commitKey marks the context of each of a Commit's transactions.
type commitKey struct{}

// CommitOf reports which Commit (numbered from 1 per Store) the etcd call
// with context ctx belongs to, for tools that observe the transactions
// on the wire (the simulator groups a loop turn's transactions by it).
func CommitOf(ctx context.Context) (uint64, bool) {
	n, ok := ctx.Value(commitKey{}).(uint64)
	return n, ok
}

func (s *Store) jobKey(seq uint64) string { return fmt.Sprintf("%s/jobs/%020d", s.prefix, seq) }
func (s *Store) nodeKey(id string) string { return s.prefix + "/nodes/" + id }
func (s *Store) seqKey() string           { return s.prefix + "/meta/job_seq" }

// WriterKey holds the fencing token of the leader that wrote last; every
// transaction puts it.
func (s *Store) WriterKey() string         { return s.prefix + "/meta/writer" }
func (s *Store) leaseKey(id string) string { return s.prefix + "/leases/" + padLeaseID(id) }
func (s *Store) leasePrefix() string       { return s.prefix + "/leases/" }
func (s *Store) jobPrefix() string         { return s.prefix + "/jobs/" }
func (s *Store) tenantPrefix() string      { return s.prefix + "/tenants/" }
func (s *Store) idemPrefix() string        { return s.prefix + "/idem/" }

// idemKey keys a record by tenant and key; the key is length-prefixed so
// no choice of key can collide with another tenant's.
func (s *Store) idemKey(r *model.Idempotency) string {
	return fmt.Sprintf("%s%s/%d/%s", s.idemPrefix(), r.Tenant, len(r.Key), r.Key)
}
func (s *Store) queuePrefix() string { return s.prefix + "/queues/" }
func (s *Store) nodePrefix() string  { return s.prefix + "/nodes/" }

// padLeaseID pads the job part of "42.1" so leases sort by job.
func padLeaseID(id string) string {
	job, attempt, ok := strings.Cut(id, ".")
	seq, err := strconv.ParseUint(job, 10, 64)
	if !ok || err != nil {
		return id
	}
	return fmt.Sprintf("%020d.%s", seq, attempt)
}

// State is everything Load read, at one etcd revision.
type State struct {
	Jobs []*model.Job
	// EndedRecords holds, by Seq, the record of each job in Jobs that has
	// ended, as etcd stores it: the leader keeps ended jobs encoded and
	// need not encode them again. EndedLeaseRecords does the same for
	// leases that are no longer active, by lease ID.
	EndedRecords      map[uint64][]byte
	EndedLeaseRecords map[string][]byte
	Nodes             []*model.Node
	Leases            []*model.Lease
	Tenants           []model.Tenant
	Queues            []model.Queue
	Idem              []model.Idempotency
	JobSeq            uint64
	Revision          int64
}

// Load reads the whole durable state at a single revision.
func (s *Store) Load(ctx context.Context) (*State, error) {
	st := &State{EndedRecords: map[uint64][]byte{}, EndedLeaseRecords: map[string][]byte{}}
	resp, err := s.cli.Get(ctx, s.seqKey())
	if err != nil {
		return nil, fmt.Errorf("store: load job seq: %w", err)
	}
	st.Revision = resp.Header.Revision
	if len(resp.Kvs) == 1 {
		if st.JobSeq, err = strconv.ParseUint(string(resp.Kvs[0].Value), 10, 64); err != nil {
			return nil, fmt.Errorf("store: corrupt job seq %q: %w", resp.Kvs[0].Value, err)
		}
	}
	err = s.scan(ctx, s.jobPrefix(), st.Revision, func(key string, v []byte) error {
		j, err := s.decodeJob([]byte(key), v)
		if err != nil {
			return err
		}
		st.Jobs = append(st.Jobs, j)
		if j.State.Terminal() {
			// v is the value's own copy (protobuf decoding of the
			// response copies bytes fields), so keeping it pins nothing.
			st.EndedRecords[j.Seq] = v
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = s.scan(ctx, s.nodePrefix(), st.Revision, func(_ string, v []byte) error {
		var p pb.Node
		if err := proto.Unmarshal(v, &p); err != nil {
			return err
		}
		st.Nodes = append(st.Nodes, wire.NodeFromProto(&p))
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = s.scan(ctx, s.leasePrefix(), st.Revision, func(_ string, v []byte) error {
		var p pb.Lease
		if err := proto.Unmarshal(v, &p); err != nil {
			return err
		}
		l := wire.LeaseFromProto(&p)
		st.Leases = append(st.Leases, l)
		if !l.Active {
			st.EndedLeaseRecords[l.ID] = v
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = s.scan(ctx, s.tenantPrefix(), st.Revision, func(_ string, v []byte) error {
		var p pb.Tenant
		if err := proto.Unmarshal(v, &p); err != nil {
			return err
		}
		st.Tenants = append(st.Tenants, wire.TenantFromProto(&p))
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = s.scan(ctx, s.idemPrefix(), st.Revision, func(_ string, v []byte) error {
		var p pb.IdempotencyRecord
		if err := proto.Unmarshal(v, &p); err != nil {
			return err
		}
		st.Idem = append(st.Idem, wire.IdempotencyFromProto(&p))
		return nil
	})
	if err != nil {
		return nil, err
	}
	err = s.scan(ctx, s.queuePrefix(), st.Revision, func(_ string, v []byte) error {
		var p pb.Queue
		if err := proto.Unmarshal(v, &p); err != nil {
			return err
		}
		st.Queues = append(st.Queues, wire.QueueFromProto(&p))
		return nil
	})
	if err != nil {
		return nil, err
	}
	return st, nil
}

// scan reads every key under prefix at rev, page by page.
func (s *Store) scan(ctx context.Context, prefix string, rev int64, fn func(key string, value []byte) error) error {
	end := clientv3.GetPrefixRangeEnd(prefix)
	from := prefix
	for {
		resp, err := s.cli.Get(ctx, from, clientv3.WithRange(end), clientv3.WithRev(rev),
			clientv3.WithLimit(loadPageSize), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
		if err != nil {
			return fmt.Errorf("store: load %s: %w", prefix, err)
		}
		for _, kv := range resp.Kvs {
			if err := fn(string(kv.Key), kv.Value); err != nil {
				return fmt.Errorf("store: decode %s: %w", kv.Key, err)
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// Commit writes changes in as few fenced transactions as possible, sent
// to etcd concurrently (at most MaxConcurrentTxns at a time): one after
// another, a turn's transactions were the bulk of the leader's loop. Each
// Change lands atomically, and no key is written by two of the
// transactions, so the order in which they apply does not matter. jobSeq,
// when non-zero, is written in every transaction, so whichever of them
// commits, no job ID it holds can ever be handed out again. Commit returns
// ErrFenced if the fence no longer holds. On any error the caller must
// assume an unknown subset of the transactions committed and rebuild from
// etcd. On success it returns the highest etcd revision of the
// transactions (0 when there was nothing to write): every change is
// visible at that revision.
func (s *Store) Commit(ctx context.Context, fence Fence, changes []Change, jobSeq uint64) (int64, error) {
	ctx = context.WithValue(ctx, commitKey{}, s.commits.Add(1))
	// Every transaction also records its writer's token, so etcd's history
	// shows which leader made each revision (see internal/invariants).
	keys := map[string][]byte{} // shared: a key lands in one transaction only
	scratch, _ := s.scratch.Get().(*[]byte)
	if scratch == nil {
		scratch = new([]byte)
	}
	defer s.scratch.Put(scratch)
	writer := putOp(s.WriterKey(), []byte(strconv.FormatInt(fence.Revision, 10)))
	var seq *etcdpb.RequestOp
	if jobSeq > 0 {
		seq = putOp(s.seqKey(), []byte(strconv.FormatUint(jobSeq, 10)))
	}
	newBatch := func() batch {
		b := batch{keys: keys, scratch: scratch}
		b.ops = append(b.ops, writer)
		if seq != nil {
			b.ops = append(b.ops, seq)
		}
		return b
	}
	base := len(newBatch().ops)
	var batches [][]*etcdpb.RequestOp
	b := newBatch()
	for i := range changes {
		c := &changes[i]
		if len(b.ops)+c.ops() > MaxOpsPerTxn && len(b.ops) > base {
			batches = append(batches, b.ops)
			b = newBatch()
		}
		if err := s.appendOps(&b, c); err != nil {
			return 0, err
		}
	}
	if len(b.ops) > base || (jobSeq > 0 && len(batches) == 0) {
		batches = append(batches, b.ops)
	}
	switch len(batches) {
	case 0: // nothing changed
		return 0, nil
	case 1:
		return s.txn(ctx, fence, batches[0])
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		rev   int64
		first error
		slots = make(chan struct{}, MaxConcurrentTxns)
	)
	for _, ops := range batches {
		wg.Add(1)
		slots <- struct{}{}
		go func() {
			defer func() { <-slots; wg.Done() }()
			r, err := s.txn(ctx, fence, ops)
			mu.Lock()
			defer mu.Unlock()
			rev = max(rev, r)
			if err != nil && (first == nil || errors.Is(err, ErrFenced)) {
				first = err
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return 0, first
	}
	return rev, nil
}

// MaxConcurrentTxns bounds the transactions one Commit has in flight.
const MaxConcurrentTxns = 4

// batch is the ops of one transaction; keys is shared by every batch of a
// Commit. etcd rejects a key put twice in one transaction, and concurrent
// transactions must not race on a key; a record changed twice in one turn
// is the same object, so its first put already carries the final value and
// later ones are dropped.
type batch struct {
	ops []*etcdpb.RequestOp
	// keys holds each key in the commit and the value put (nil: deleted).
	keys map[string][]byte
	// scratch is shared too: records are encoded into it, then copied
	// once into the op's value.
	scratch *[]byte
}

func putOp(key string, value []byte) *etcdpb.RequestOp {
	return &etcdpb.RequestOp{Request: &etcdpb.RequestOp_RequestPut{RequestPut: &etcdpb.PutRequest{Key: []byte(key), Value: value}}}
}

func (b *batch) del(key string) {
	if _, ok := b.keys[key]; ok {
		return
	}
	b.keys[key] = nil
	b.ops = append(b.ops, &etcdpb.RequestOp{Request: &etcdpb.RequestOp_RequestDeleteRange{
		RequestDeleteRange: &etcdpb.DeleteRangeRequest{Key: []byte(key)}}})
}

// put adds a put of key with the record enc appends to its argument,
// unless the key is already in the commit: then its first put carries the
// final value, and the encoding (the costly part: a gang's lease changes
// once per node in a turn) is skipped. It returns the value put, which
// the caller may keep: etcd's client does not retain it.
func (b *batch) put(key string, enc func([]byte) ([]byte, error)) ([]byte, error) {
	if v, ok := b.keys[key]; ok {
		return v, nil
	}
	scratch, err := enc((*b.scratch)[:0])
	if err != nil {
		return nil, fmt.Errorf("store: encode %s: %w", key, err)
	}
	*b.scratch = scratch
	v := bytes.Clone(scratch) // one allocation of the exact size
	b.keys[key] = v
	b.ops = append(b.ops, putOp(key, v))
	return v, nil
}

// message encodes the proto msg returns.
func message(msg func() proto.Message) func([]byte) ([]byte, error) {
	return func(b []byte) ([]byte, error) { return proto.MarshalOptions{}.MarshalAppend(b, msg()) }
}

func (s *Store) appendOps(b *batch, c *Change) error {
	var err error
	if j := c.Job; j != nil {
		c.JobRecord, err = b.put(s.jobKey(j.Seq), func(b []byte) ([]byte, error) { return wire.AppendJobRecord(b, j), nil })
	}
	if l := c.Lease; l != nil && err == nil {
		c.LeaseRecord, err = b.put(s.leaseKey(l.ID), func(b []byte) ([]byte, error) { return wire.AppendLeaseRecord(b, l), nil })
	}
	if n := c.Node; n != nil && err == nil {
		_, err = b.put(s.nodeKey(n.ID), message(func() proto.Message {
			// Connected and the lease fields are derived in memory;
			// persisting them would only go stale.
			n := n.Clone()
			n.Connected, n.LeaseID, n.JobID = false, "", ""
			return wire.NodeToProto(n)
		}))
	}
	if t := c.Tenant; t != nil && err == nil {
		_, err = b.put(s.tenantPrefix()+t.Name, message(func() proto.Message { return wire.TenantToProto(*t) }))
	}
	if r := c.Idem; r != nil && err == nil {
		_, err = b.put(s.idemKey(r), message(func() proto.Message { return wire.IdempotencyToProto(*r) }))
	}
	if q := c.Queue; q != nil && err == nil {
		_, err = b.put(s.queuePrefix()+q.Name, message(func() proto.Message { return wire.QueueToProto(*q) }))
	}
	if c.ExpireIdem != nil && err == nil {
		b.del(s.idemKey(c.ExpireIdem))
	}
	return err
}

func (s *Store) txn(ctx context.Context, fence Fence, ops []*etcdpb.RequestOp) (int64, error) {
	resp, err := s.kv.Txn(ctx, &etcdpb.TxnRequest{
		Compare: []*etcdpb.Compare{{
			Key: []byte(fence.Key), Target: etcdpb.Compare_CREATE, Result: etcdpb.Compare_EQUAL,
			TargetUnion: &etcdpb.Compare_CreateRevision{CreateRevision: fence.Revision},
		}},
		Success: ops,
	}, grpc.WaitForReady(true)) // as clientv3's Txn calls it
	if err != nil {
		return 0, fmt.Errorf("store: commit %d ops: %w", len(ops), clientv3.ContextError(ctx, err))
	}
	if !resp.Succeeded {
		return 0, ErrFenced
	}
	return resp.Header.Revision, nil
}
