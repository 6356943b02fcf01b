// Package model holds the scheduler's own types: jobs, nodes and leases as
// plain Go values, their states and transitions, and request validation.
// Wire types (generated protobuf) never appear here; scheduler/api converts
// at the edge, and scheduler/store persists through the same converters.
package model
