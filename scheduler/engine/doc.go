// Package engine is the leader's scheduling loop for one term of leadership.
//
// One goroutine owns all mutable state (jobs, nodes, leases, agent
// connections). RPC handlers and agent streams hand it events; each turn of
// the loop applies a batch of events, runs a placement cycle
// (scheduler/placement) if anything changed, commits every resulting change
// in batched, fenced etcd transactions (scheduler/store), and only then
// answers callers and sends commands to agents. Nothing leaves the engine
// before it is durable.
//
// Readers (Get/List) take a read lock and never see uncommitted state: the
// loop holds the write lock from applying events until their commit returns.
//
// When a commit fails, or the term's context ends (the election session
// expired), Run returns and every in-flight caller gets ErrStopped; the next
// term rebuilds from etcd. There is no in-memory state that needs a process
// restart to recover.
package engine
