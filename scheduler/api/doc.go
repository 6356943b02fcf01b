// Package api is the scheduler's gRPC edge: the JobService, NodeService and
// AgentService servers, the one table that maps scheduler errors to gRPC
// status codes, and the one interceptor chain every RPC passes (recovery,
// logging; authentication plugs in here later). Handlers convert wire types
// with scheduler/wire and delegate to the current leader's engine.
package api
