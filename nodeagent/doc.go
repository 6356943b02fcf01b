// Package nodeagent is the daemon on every GPU node. It reads the node's
// inventory through nvml.Interface (real NVML or a simulated DGX), keeps one
// bidirectional gRPC stream to the scheduler, runs each lease's command in
// its own process group, and stops and cleans up when the lease ends.
//
//	agent.go        Config, the connect/reconnect loop, fencing-token checks
//	leases.go       start (after the pre-lease check), exit, release and
//	                cleanup (GPUs idle, hook, scratch), log relay of leases
//	telemetry.go    the monitor: a TelemetryBatch every interval, attributed
//	                to the lease; idle memory baselines
//	exclusivity.go  which GPU processes belong to the lease; foreign ones
//	                are reported and killed; the mock's process lists
//	health.go       XIDs, the node's health verdict and its re-checks,
//	                MockInject
//	state.go        what survives an agent restart (highest token, held leases)
//	gpu/            GPU backends: inventory, telemetry, processes, XID
//	                events, health checks (NVML, simulated DGX nodes)
//	runner/         one command as a process group: start, wait, stop
//
// The agent never talks to etcd: the stream to the scheduler is its only
// channel, so agents hold no control-plane credentials.
package nodeagent
