// Package scheduler is the gpusched control plane: it campaigns for
// leadership in etcd, runs one scheduling engine per leadership term, and
// serves the gRPC API on any replica.
//
//	scheduler.go   election loop: campaign → engine.Run → step down
//	api/           gRPC services, error→code table, interceptor chain
//	engine/        the leader's loop: events → placement → fenced commit → agents
//	placement/     pure placement over an immutable snapshot
//	store/         etcd records and fenced, batched transactions
//	model/         plain Go types, states, validation, sentinel errors
//	wire/          model ⇄ protobuf converters
package scheduler
