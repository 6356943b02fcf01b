// Package wire converts between the scheduler's model types and the
// generated protobuf types of gpusched.v1. It is the only package that knows
// both; the API layer and the etcd store both go through it, so a field
// added to the API is persisted the moment it is converted.
package wire
