// Package store persists the scheduler's durable state in etcd and nothing
// else: jobs, nodes (inventory and operator state) and leases, as
// protobuf-encoded records under one prefix.
//
// Key layout (prefix defaults to "/gpusched"):
//
//	<prefix>/jobs/<20-digit job seq>   gpusched.v1.Job
//	<prefix>/nodes/<node id>           gpusched.v1.Node (inventory, labels, operator state)
//	<prefix>/leases/<20-digit seq>.<n> gpusched.v1.Lease
//	<prefix>/tenants/<name>            gpusched.v1.Tenant (limits, weight)
//	<prefix>/queues/<name>             gpusched.v1.Queue (priority, paused)
//	<prefix>/idem/<tenant>/<len>/<key> gpusched.v1.IdempotencyRecord, deleted when it expires
//	<prefix>/meta/job_seq              last job sequence number handed out (decimal)
//	<prefix>/meta/writer               fencing token of the leader that wrote last;
//	                                   put by every transaction, so etcd's history
//	                                   attributes each revision to one leader
//
// Every write is fenced: Commit packs changes into etcd transactions of at
// most MaxOpsPerTxn operations, each guarded by
// Compare(CreateRevision(leader key) = leader revision), so a deposed leader's
// writes fail instead of landing.
package store
