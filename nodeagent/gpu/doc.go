// Package gpu is the node agent's only view of its GPUs. It owns choosing a
// GPU backend (real NVML, or a simulated DGX node for machines without
// GPUs), reading the node's GPU inventory, listing the processes running on
// each GPU, reading per-GPU telemetry (ReadTelemetry), watching XID events
// (WatchXIDs) and classifying them (ClassifyXID), and the NVML side of the
// node's health check (CheckHealth).
//
// Everything above this package talks to GPUs through go-nvml's
// nvml.Interface, so the same code reads a real DGX and a simulated one. The
// simulated backends (Mock) build on go-nvml's mock DGX servers and add the
// telemetry, event and process calls those leave unset, backed by state that
// tests and simulations can change: processes (SetProcesses), which drive
// utilization, memory, power and temperature along deterministic curves on
// an injectable clock (MockOptions.Now), and faults (InjectXID,
// InjectECCDoubleBit, Clear, Faults).
//
// NVML is loaded only when the "nvml" backend is opened; importing this
// package has no side effects.
package gpu
