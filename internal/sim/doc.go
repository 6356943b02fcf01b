// Package sim is gpusched's kubemark: a simulated cluster for measuring the
// scheduler at scale on one machine (`gpusched sim`, issue 8).
//
//   - Fleet runs thousands of hollow agents in one process. Each speaks the
//     real AgentService protocol on its own gRPC stream (many streams share
//     a grpc.ClientConn): hello with an inventory of simulated GPUs,
//     heartbeats at the Welcome's interval, fencing tokens, StartLease →
//     LeaseStarted, a "run" as long as the job's SIM_DURATION (or its
//     `sleep N` command), LeaseExited, ReleaseLease → LeaseReleased clean,
//     held leases re-reported on reconnect, optional telemetry. Nothing is
//     executed. Each agent records a StartLease that arrives while it still
//     holds a lease as a violation.
//   - Generate submits jobs through the Go SDK, open loop at a rate or as
//     fast as a concurrency bound allows, with a size mix including gangs.
//     The due time of each job rides in its environment, so the agent that
//     receives the StartLease measures submit → StartLease (Tracker).
//   - The scheduler replica runs in this process or as a child process
//     (ServeReplica, `gpusched sim replica`) with a tap on its etcd Txn
//     calls and the engine's Observer, to time commits, loop turns and
//     placement cycles from the outside.
//   - MeasureCeiling measures etcd's batched-write throughput in the shape
//     of the scheduler's commits.
//   - Run strings it together: the open phase (latency at a rate), the
//     backlog phase (placements/s draining a queue), verification, etcd's
//     DB size, leader cold starts and the ceiling, into a Report.
package sim
