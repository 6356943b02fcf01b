// Command queue-worker bridges a Redis stream into gpusched, at least once:
// every stream message becomes exactly one gpusched job, and the message is
// acknowledged (XACK) only once that job has ended.
//
//	queue-worker --redis 127.0.0.1:6379 --server 127.0.0.1:7070 --consumer worker-1
//
// A message carries the job in its fields:
//
//	XADD gpusched:jobs '*' command '["sh","-c","nvidia-smi"]' nodes 2 gpu_model H100
//
// command (a JSON array of argv strings) is required; nodes, gpu_model,
// tenant, queue and name are optional. A message that cannot be turned into
// a job (bad JSON, or a spec the scheduler rejects as invalid) is moved to
// the dead-letter stream <stream>:dead. Every message whose job ended gets
// one entry in <stream>:results (message ID, job ID, final state), written
// in the same atomic step as the XACK.
//
// Why nothing is lost or doubled when the worker dies at any instant, and
// how to run it, is in README.md next to this file.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/gpusched/gpusched/client"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// MessageIDLabel is the job label that names the stream message a job was
// made from. Stream IDs ("1732662000000-0") are valid label values.
const MessageIDLabel = "redis-message-id"

// Message fields.
const (
	fieldCommand  = "command"
	fieldNodes    = "nodes"
	fieldGPUModel = "gpu_model"
	fieldTenant   = "tenant"
	fieldQueue    = "queue"
	fieldName     = "name"
)

type config struct {
	redisAddr string
	stream    string
	group     string
	consumer  string
	servers   []string
	jobSet    string
	batch     int64
	block     time.Duration
	claimIdle time.Duration
}

func main() {
	os.Exit(run())
}

func run() int {
	var cfg config
	var servers string
	host, _ := os.Hostname()
	fs := flag.NewFlagSet("queue-worker", flag.ContinueOnError)
	fs.StringVar(&cfg.redisAddr, "redis", "127.0.0.1:6379", "Redis address (host:port)")
	fs.StringVar(&cfg.stream, "stream", "gpusched:jobs", "stream to read jobs from")
	fs.StringVar(&cfg.group, "group", "gpusched-bridge", "consumer group")
	fs.StringVar(&cfg.consumer, "consumer", host, "consumer name; keep it stable across restarts, so the worker finds its own pending messages again")
	fs.StringVar(&servers, "server", os.Getenv("GPUSCHED_SERVER"), "gpusched endpoints, comma-separated (default $GPUSCHED_SERVER)")
	fs.StringVar(&cfg.jobSet, "job-set", "gpusched-bridge", "job set of the jobs this bridge submits; use one per stream and group")
	fs.Int64Var(&cfg.batch, "batch", 16, "messages read per XREADGROUP")
	fs.DurationVar(&cfg.block, "block", 2*time.Second, "how long one XREADGROUP waits for new messages")
	fs.DurationVar(&cfg.claimIdle, "claim-idle", 0, "take over messages that other consumers left pending this long (XAUTOCLAIM); 0 disables")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	cfg.servers = strings.Split(servers, ",")
	if fs.NArg() > 0 || cfg.consumer == "" || cfg.stream == "" || cfg.group == "" || cfg.batch < 1 || cfg.block < time.Millisecond {
		fmt.Fprintln(os.Stderr, "queue-worker: need --consumer, --stream, --group, --batch >= 1, --block >= 1ms and no arguments")
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("consumer", cfg.consumer)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		stop() // a second signal kills at once
	}()

	gs, err := client.New(ctx, client.Config{Endpoints: cfg.servers})
	if err != nil {
		fmt.Fprintf(os.Stderr, "queue-worker: %v\n", err)
		return 2
	}
	defer gs.Close()
	rdb := redis.NewClient(&redis.Options{Addr: cfg.redisAddr})
	defer rdb.Close()

	w := &worker{cfg: cfg, rdb: rdb, gs: gs, log: log, ready: make(chan struct{})}
	w.run(ctx)
	log.Info("stopped")
	return 0
}

type worker struct {
	cfg       config
	rdb       *redis.Client
	gs        *client.Client
	log       *slog.Logger
	ready     chan struct{} // closed once the first recovery pass is done
	readyOnce sync.Once
}

// run recovers, then bridges until ctx ends. Nothing it leaves undone on
// return (or on a crash) is lost: the next run picks it up.
func (w *worker) run(ctx context.Context) {
	if !w.ensureGroup(ctx) {
		return
	}
	var wg sync.WaitGroup
	wg.Go(func() { w.watchLoop(ctx) })
	select {
	case <-ctx.Done():
	case <-w.ready:
		w.log.Info("recovered; reading new messages", "stream", w.cfg.stream, "group", w.cfg.group)
		w.readLoop(ctx)
	}
	wg.Wait()
}

// ensureGroup creates the consumer group (and the stream) if missing,
// retrying while Redis is unreachable.
func (w *worker) ensureGroup(ctx context.Context) bool {
	return retry(ctx, w.log, "create consumer group", func() error {
		err := w.rdb.XGroupCreateMkStream(ctx, w.cfg.stream, w.cfg.group, "0").Err()
		if err != nil && strings.HasPrefix(err.Error(), "BUSYGROUP") {
			return nil
		}
		return err
	})
}

// watchLoop lists the job set, settles what the list shows ended, recovers
// this consumer's pending messages, then follows the job set's changes and
// settles each message as its job ends. When the watch breaks off for good
// (history compacted, scheduler unreachable, Redis failing), it lists again:
// the fresh list covers whatever the broken watch missed.
func (w *worker) watchLoop(ctx context.Context) {
	sel := &pb.JobSelector{JobSet: w.cfg.jobSet}
	backoff := 100 * time.Millisecond
	for {
		err := w.gs.ListAndWatch(ctx, sel,
			func(jobs []*pb.Job) error { return w.onList(ctx, jobs) },
			func(ev *pb.JobEvent) error { return w.onEvent(ctx, ev) })
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, client.ErrCursorCompacted) {
			w.log.Info("watch history compacted; listing again")
			backoff = 100 * time.Millisecond
			continue
		}
		w.log.Warn("list and watch stopped; listing again", "err", err, "in", backoff)
		if !sleep(ctx, backoff) {
			return
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// onList gets every job of the job set at one point of the history.
func (w *worker) onList(ctx context.Context, jobs []*pb.Job) error {
	byMsg := make(map[string]*pb.Job, len(jobs))
	for _, j := range jobs {
		if id := j.GetSpec().GetLabels()[MessageIDLabel]; id != "" {
			byMsg[id] = j
		}
	}
	// Jobs that ended while no watch was looking (the worker was down, or
	// the watch broke off): settle their messages if the group still holds
	// them. Only pending ones are tried, so a long job set costs one pass.
	pending, err := w.groupPending(ctx)
	if err != nil {
		return err
	}
	settled := 0
	for id := range pending {
		if j := byMsg[id]; j != nil && client.Terminal(j.GetState()) {
			ok, err := w.settle(ctx, id, j)
			if err != nil {
				return err
			}
			if ok {
				settled++
			}
		}
	}
	// This consumer's own pending messages: delivered before a crash or a
	// restart but not acked. Those without a job yet are submitted now;
	// those with one wait for it on the watch that follows this list.
	recovered := 0
	err = w.readOwnPending(ctx, func(m redis.XMessage) error {
		if j := byMsg[m.ID]; j != nil {
			if client.Terminal(j.GetState()) {
				_, err := w.settle(ctx, m.ID, j)
				return err
			}
			return nil
		}
		recovered++
		return w.process(ctx, m, false)
	})
	if err != nil {
		return err
	}
	w.log.Info("listed job set", "job_set", w.cfg.jobSet, "jobs", len(jobs), "group_pending", len(pending), "settled", settled, "resubmitted", recovered)
	w.readyOnce.Do(func() { close(w.ready) })
	return nil
}

// onEvent settles a message when its job ends.
func (w *worker) onEvent(ctx context.Context, ev *pb.JobEvent) error {
	state := ev.GetTransition().GetState()
	if state == pb.JobState_JOB_STATE_UNSPECIFIED {
		state = ev.GetJob().GetState()
	}
	if !client.Terminal(state) {
		return nil
	}
	job := ev.GetJob()
	if job == nil {
		var err error
		if job, err = w.gs.Get(ctx, ev.GetJobId()); err != nil {
			return err
		}
	}
	id := job.GetSpec().GetLabels()[MessageIDLabel]
	if id == "" {
		return nil // not one of ours
	}
	job = cloneWithState(job, state, ev.GetTransition().GetReason())
	_, err := w.settle(ctx, id, job)
	return err
}

func cloneWithState(j *pb.Job, state pb.JobState, reason string) *pb.Job {
	if j.GetState() == state {
		return j
	}
	if reason == "" {
		reason = j.GetReason()
	}
	return &pb.Job{Id: j.GetId(), Spec: j.GetSpec(), State: state, Reason: reason}
}

// readLoop reads messages never delivered before (">") and submits them.
func (w *worker) readLoop(ctx context.Context) {
	var lastClaim time.Time
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		if w.cfg.claimIdle > 0 && time.Since(lastClaim) >= w.cfg.claimIdle/2 {
			if err := w.claim(ctx); err != nil && ctx.Err() == nil {
				w.log.Warn("claiming idle messages", "err", err)
			}
			lastClaim = time.Now()
		}
		res, err := w.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{
			Group: w.cfg.group, Consumer: w.cfg.consumer,
			Streams: []string{w.cfg.stream, ">"}, Count: w.cfg.batch, Block: w.cfg.block,
		}).Result()
		if errors.Is(err, redis.Nil) {
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			w.log.Warn("reading stream", "err", err, "retry_in", backoff)
			if strings.HasPrefix(err.Error(), "NOGROUP") && !w.ensureGroup(ctx) {
				return
			}
			sleep(ctx, backoff)
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		for _, s := range res {
			for _, m := range s.Messages {
				// On shutdown, stop between messages: each one read sits
				// in this consumer's pending list, so what is left undone
				// is picked up again on restart.
				if ctx.Err() != nil {
					return
				}
				if err := w.process(ctx, m, false); err != nil {
					w.log.Warn("message left pending for the next run", "message_id", m.ID, "err", err)
				}
			}
		}
	}
}

// claim takes over messages that some consumer (maybe a dead one) has left
// pending for --claim-idle, and makes sure each has its job.
func (w *worker) claim(ctx context.Context) error {
	start := "0-0"
	for {
		msgs, next, err := w.rdb.XAutoClaim(ctx, &redis.XAutoClaimArgs{
			Stream: w.cfg.stream, Group: w.cfg.group, MinIdle: w.cfg.claimIdle,
			Start: start, Count: w.cfg.batch, Consumer: w.cfg.consumer,
		}).Result()
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if err := w.process(ctx, m, true); err != nil {
				return err
			}
		}
		if next == "0-0" || next == "" {
			return nil
		}
		start = next
	}
}

// readOwnPending calls fn for each message in this consumer's pending
// list, oldest first (XREADGROUP from ID 0).
func (w *worker) readOwnPending(ctx context.Context, fn func(redis.XMessage) error) error {
	after := "0"
	for {
		res, err := w.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{
			Group: w.cfg.group, Consumer: w.cfg.consumer,
			Streams: []string{w.cfg.stream, after}, Count: w.cfg.batch, Block: -1,
		}).Result()
		if errors.Is(err, redis.Nil) {
			return nil
		}
		if err != nil {
			return err
		}
		if len(res) == 0 || len(res[0].Messages) == 0 {
			return nil
		}
		for _, m := range res[0].Messages {
			if err := fn(m); err != nil {
				return err
			}
			after = m.ID
		}
	}
}

// groupPending returns the IDs of every message the group holds unacked.
func (w *worker) groupPending(ctx context.Context) (map[string]bool, error) {
	ids := map[string]bool{}
	start := "-"
	for {
		ps, err := w.rdb.XPendingExt(ctx, &redis.XPendingExtArgs{
			Stream: w.cfg.stream, Group: w.cfg.group, Start: start, End: "+", Count: 1000,
		}).Result()
		if err != nil {
			return nil, err
		}
		for _, p := range ps {
			ids[p.ID] = true
		}
		if len(ps) < 1000 {
			return ids, nil
		}
		start = "(" + ps[len(ps)-1].ID
	}
}

// process makes sure message m has its job. lookup asks whether one
// exists first (a message claimed from another consumer may have one made
// long ago, beyond the server's idempotency retention). A message that
// cannot become a job goes to the dead-letter stream. The returned error
// means m stays pending: ctx ended, or Redis failed.
func (w *worker) process(ctx context.Context, m redis.XMessage, lookup bool) error {
	log := w.log.With("message_id", m.ID)
	spec, err := parseMessage(m, w.cfg.jobSet)
	if err != nil {
		return w.deadLetter(ctx, m, err)
	}
	if lookup {
		j, err := w.findJob(ctx, m.ID)
		if err != nil {
			return err
		}
		if j != nil {
			if client.Terminal(j.GetState()) {
				_, err = w.settle(ctx, m.ID, j)
			}
			return err
		}
	}
	key := idempotencyKey(w.cfg.stream, m.ID)
	var job *pb.Job
	ok := retry(ctx, log, "submit", func() error {
		// A submit already sent is not cut short by shutdown: let it land.
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		job, err = w.gs.Submit(sctx, spec, client.WithIdempotencyKey(key))
		if errors.Is(err, client.ErrInvalid) {
			return nil // permanent: handled below
		}
		return err
	})
	if !ok {
		return ctx.Err()
	}
	if err != nil {
		return w.deadLetter(ctx, m, fmt.Errorf("rejected by gpusched: %w", err))
	}
	log.Info("submitted", "job_id", job.GetId(), "state", stateName(job.GetState()))
	// A redelivered message may get back a job that already ended, whose
	// end the watch reported before; settle it here.
	if client.Terminal(job.GetState()) {
		_, err = w.settle(ctx, m.ID, job)
	}
	return err
}

// findJob returns the job made from message id, if any.
func (w *worker) findJob(ctx context.Context, id string) (*pb.Job, error) {
	resp, err := w.gs.List(ctx, &pb.ListJobsRequest{Selector: &pb.JobSelector{
		JobSet: w.cfg.jobSet, Labels: map[string]string{MessageIDLabel: id},
	}})
	if err != nil {
		return nil, err
	}
	if len(resp.GetJobs()) == 0 {
		return nil, nil
	}
	return resp.GetJobs()[0], nil
}

// settleScript records an outcome and acks a message in one atomic step,
// and only if the group still holds the message unacked: the outcome is
// written first, and exactly once per message however often a job's end is
// reported (a list, a watch event, a redelivery).
//
//	KEYS[1] the stream, KEYS[2] the outcome stream
//	ARGV[1] the group, ARGV[2] the message ID, ARGV[3...] outcome fields
var settleScript = redis.NewScript(`
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
`)

// settle writes the job's outcome to <stream>:results and acks the message.
// It reports false when the message had been acked already.
func (w *worker) settle(ctx context.Context, id string, j *pb.Job) (bool, error) {
	n, err := settleScript.Run(ctx, w.rdb, []string{w.cfg.stream, w.cfg.stream + ":results"},
		w.cfg.group, id,
		"message_id", id, "job_id", j.GetId(), "state", stateName(j.GetState()),
		"reason", j.GetReason(), "consumer", w.cfg.consumer).Int()
	if err != nil {
		return false, fmt.Errorf("settling message %s: %w", id, err)
	}
	if n == 1 {
		w.log.Info("acked", "message_id", id, "job_id", j.GetId(), "state", stateName(j.GetState()))
	}
	return n == 1, nil
}

// deadLetter moves a message that cannot become a job to <stream>:dead and
// acks it, atomically and once.
func (w *worker) deadLetter(ctx context.Context, m redis.XMessage, cause error) error {
	fields, _ := json.Marshal(m.Values)
	n, err := settleScript.Run(ctx, w.rdb, []string{w.cfg.stream, w.cfg.stream + ":dead"},
		w.cfg.group, m.ID,
		"message_id", m.ID, "error", cause.Error(), "fields", string(fields), "consumer", w.cfg.consumer).Int()
	if err != nil {
		return fmt.Errorf("dead-lettering message %s: %w", m.ID, err)
	}
	if n == 1 {
		w.log.Warn("bad message moved to the dead-letter stream", "message_id", m.ID, "err", cause, "dead", w.cfg.stream+":dead")
	}
	return nil
}

// parseMessage turns a stream message into a job spec.
func parseMessage(m redis.XMessage, jobSet string) (*pb.JobSpec, error) {
	if len(m.Values) == 0 {
		return nil, errors.New("message has no fields (deleted from the stream before it was submitted?)")
	}
	str := func(k string) string {
		if v, ok := m.Values[k]; ok {
			if s, ok := v.(string); ok {
				return s
			}
			return fmt.Sprint(v)
		}
		return ""
	}
	spec := &pb.JobSpec{
		Name: str(fieldName), Tenant: str(fieldTenant), Queue: str(fieldQueue), GpuModel: str(fieldGPUModel),
		Nodes: 1, JobSet: jobSet, Labels: map[string]string{MessageIDLabel: m.ID},
	}
	raw := str(fieldCommand)
	if raw == "" {
		return nil, errors.New(`field "command" is missing: want a JSON array of argv strings`)
	}
	if err := json.Unmarshal([]byte(raw), &spec.Command); err != nil {
		return nil, fmt.Errorf(`field "command" must be a JSON array of argv strings: %v`, err)
	}
	if len(spec.Command) == 0 {
		return nil, errors.New(`field "command" must not be empty`)
	}
	if s := str(fieldNodes); s != "" {
		n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 32)
		if err != nil || n < 1 {
			return nil, fmt.Errorf(`field "nodes" must be a whole number of at least 1, got %q`, s)
		}
		spec.Nodes = int32(n)
	}
	if spec.Name == "" {
		spec.Name = "redis-" + m.ID
	}
	return spec, nil
}

// idempotencyKey is "<stream>/<message ID>", so a redelivered message finds
// the job its first delivery made. (Very long stream names are hashed to
// stay within the server's 256-character limit.)
func idempotencyKey(stream, id string) string {
	if len(stream)+1+len(id) > 256 {
		sum := sha256.Sum256([]byte(stream))
		stream = "sha256:" + hex.EncodeToString(sum[:])
	}
	return stream + "/" + id
}

func stateName(s pb.JobState) string {
	return strings.TrimPrefix(s.String(), "JOB_STATE_")
}

// retry runs fn until it succeeds or ctx ends, backing off; it reports
// whether fn succeeded.
func retry(ctx context.Context, log *slog.Logger, what string, fn func() error) bool {
	backoff := 100 * time.Millisecond
	for {
		err := fn()
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		log.Warn(what+" failed; retrying", "err", err, "in", backoff)
		if !sleep(ctx, backoff) {
			return false
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
