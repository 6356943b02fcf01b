// Package gpu is the node agent's only view of its GPUs. It owns choosing a
// GPU backend (real NVML, or a simulated DGX node for machines without
// GPUs), reading the node's GPU inventory, and listing the processes running
// on each GPU.
//
// Everything above this package talks to GPUs through go-nvml's
// nvml.Interface, so the same code reads a real DGX and a simulated one. The
// simulated backends (Mock) build on go-nvml's mock DGX servers and add the
// telemetry and process calls those leave unset, backed by state that tests
// and simulations can change (SetProcesses).
//
// NVML is loaded only when the "nvml" backend is opened; importing this
// package has no side effects.
package gpu
