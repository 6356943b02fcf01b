// Package gateway owns the scheduler's REST/JSON API: an HTTP server that
// translates the routes of proto/gpusched/v1/gpusched_http.yaml into gRPC
// calls (grpc-gateway v2) and serves the generated OpenAPI document at
// /openapi.json and a liveness check at /healthz.
//
// The gateway never calls the services in process. It dials the replica's
// own gRPC address over loopback, so a REST call passes the very same
// server interceptor chain (recovery, logging, and authentication when it
// comes) as a native gRPC call, and follower-to-leader forwarding works the
// same way. AgentService and MockService have no routes: they stay gRPC only.
package gateway
