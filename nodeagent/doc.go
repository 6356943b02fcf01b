// Package nodeagent is the daemon on every GPU node. It reads the node's
// inventory through nvml.Interface (real NVML or a simulated DGX), keeps one
// bidirectional gRPC stream to the scheduler, runs each lease's command in
// its own process group, and stops and cleans up when the lease ends.
//
//	agent.go   Config, the connect/reconnect loop, fencing-token checks
//	leases.go  start, exit, release and log relay of leases
//	state.go   what survives an agent restart (highest token, held leases)
//	gpu/       GPU backends and inventory (NVML, go-nvml mock DGX servers)
//	runner/    one command as a process group: start, wait, stop
//
// The agent never talks to etcd: the stream to the scheduler is its only
// channel, so agents hold no control-plane credentials.
package nodeagent
