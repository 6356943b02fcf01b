// Package client is the Go SDK for gpusched. It depends only on the
// generated API (proto/gpusched/v1), gRPC and the standard library, so
// programs that submit jobs never link the scheduler or the agent.
//
//	c, err := client.New(ctx, client.Config{Endpoints: []string{"127.0.0.1:7070"}})
//	job, err := c.Submit(ctx, &gpuschedv1.JobSpec{Nodes: 2, GpuModel: "H100", Command: []string{"nvidia-smi"}})
//	job, err = c.Wait(ctx, job.GetId())
//
// Errors map gRPC status codes onto sentinels usable with errors.Is
// (ErrNotFound, ErrInvalid, ErrFailedPrecondition, ErrUnavailable); field
// violations of an invalid request are in *Error.Violations.
package client
