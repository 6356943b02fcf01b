package sim

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// CeilingResult is etcd's batched-write throughput from some clients, each
// committing fenced transactions of OpsPerTxn puts back to back, the shape
// of the scheduler's commits.
type CeilingResult struct {
	Clients    int         `json:"clients"`
	OpsPerTxn  int         `json:"ops_per_txn"`
	ValueBytes int         `json:"value_bytes"`
	Txns       int64       `json:"txns"`
	Keys       int64       `json:"keys"`
	Seconds    float64     `json:"seconds"`
	KeysPerSec float64     `json:"keys_per_sec"`
	Txn        Percentiles `json:"txn"`
}

// MeasureCeiling writes to etcd at endpoints under prefix (which it deletes
// afterwards) from clients separate connections for d. Every transaction is
// guarded, like the scheduler's, by a Compare on a fence key's create
// revision, and puts opsPerTxn new keys of valueBytes each.
func MeasureCeiling(ctx context.Context, endpoints []string, prefix string, clients, opsPerTxn, valueBytes int, d time.Duration) (CeilingResult, error) {
	res := CeilingResult{Clients: clients, OpsPerTxn: opsPerTxn, ValueBytes: valueBytes}
	var clis []*clientv3.Client
	defer func() {
		for _, c := range clis {
			_ = c.Close()
		}
	}()
	for range clients {
		c, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			return res, fmt.Errorf("sim: ceiling: %w", err)
		}
		clis = append(clis, c)
	}
	fence := prefix + "/fence"
	put, err := clis[0].Put(ctx, fence, "x")
	if err != nil {
		return res, fmt.Errorf("sim: ceiling: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, _ = clis[0].Delete(cctx, prefix+"/", clientv3.WithPrefix())
	}()
	fenceRev := put.Header.Revision
	value := make([]byte, valueBytes)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range value {
		value[i] = byte('a' + r.IntN(26)) // incompressible enough, printable
	}
	val := string(value)
	var (
		txns, keys atomic.Int64
		mu         sync.Mutex
		lat        []time.Duration
		firstErr   error
		wg         sync.WaitGroup
	)
	dctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	start := time.Now()
	for ci, c := range clis {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ops := make([]clientv3.Op, opsPerTxn)
			var mine []time.Duration
			for n := 0; dctx.Err() == nil; n++ {
				for k := range ops {
					ops[k] = clientv3.OpPut(fmt.Sprintf("%s/c%02d/%010d", prefix, ci, n*opsPerTxn+k), val)
				}
				t0 := time.Now()
				resp, err := c.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(fence), "=", fenceRev)).Then(ops...).Commit()
				if err != nil || !resp.Succeeded {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("sim: ceiling txn: %v (succeeded=%v)", err, resp != nil && resp.Succeeded)
					}
					mu.Unlock()
					return
				}
				mine = append(mine, time.Since(t0))
				txns.Add(1)
				keys.Add(int64(opsPerTxn))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	res.Txns, res.Keys, res.Seconds = txns.Load(), keys.Load(), elapsed.Seconds()
	res.KeysPerSec = rate(res.Keys, elapsed)
	res.Txn = summarize(lat)
	return res, firstErr
}
