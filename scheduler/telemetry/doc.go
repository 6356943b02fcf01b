// Package telemetry keeps the GPU telemetry agents report on the leader, in
// memory only (telemetry never goes to etcd):
//
//   - a bounded recent history per node (Hub.History, and the snapshot a
//     new subscriber starts with);
//   - live fan-out to subscribers (Hub.Stream, Hub.Watch), filtered by
//     node, job, lease and tenant, with optional field selection and
//     downsampling. A slow subscriber never slows agents or other
//     subscribers: its buffer is bounded, the oldest samples are dropped,
//     and it is told how many it missed;
//   - per-lease usage (utilization, framebuffer peak, energy), accumulated
//     as batches arrive and taken by the engine when the lease ends
//     (Hub.TakeLeaseUsage).
//
// Publish is called on the agents' receive paths and never blocks on a
// subscriber.
package telemetry
