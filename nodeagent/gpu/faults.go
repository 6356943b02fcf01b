package gpu

import (
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Fault kinds reported by Mock.Faults.
const (
	// FaultXID is an XID injected with Mock.InjectXID.
	FaultXID = "xid"
	// FaultECCDBE is an uncorrectable (double-bit) ECC error injected with
	// Mock.InjectECCDoubleBit.
	FaultECCDBE = "ecc-dbe"
)

// Fault is one fault injected into a simulated GPU and not yet cleared.
type Fault struct {
	// GPU is the NVML index of the faulty GPU.
	GPU int
	// Kind is FaultXID or FaultECCDBE.
	Kind string
	// XID is the XID the fault raised: the injected one, or 48 for an
	// ECC double-bit error.
	XID uint64
	// Since is when it was injected, on the Mock's clock.
	Since time.Time
}

// InjectXID simulates the driver reporting XID xid on GPU gpu: every event
// set registered for critical XID events on that GPU receives the event
// (see WatchXIDs), and the fault stays listed by Faults until ClearGPU or
// Clear, so a health re-check can see it is unresolved. Any XID is
// recorded; ClassifyXID tells which matter.
//
// Two XIDs also change what NVML reports, as on Ampere and later GPUs:
// 63 (a row remapping was recorded) adds an uncorrectable remapped row and
// leaves the remapping pending until the GPU is reset (ClearGPU), and 64
// (row remapping failed) marks the remapping as failed.
//
// It panics if gpu is not a GPU index of this node.
func (m *Mock) InjectXID(gpu int, xid uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.checkGPU("InjectXID", gpu)
	g := &m.gpus[gpu]
	g.faults = append(g.faults, Fault{GPU: gpu, Kind: FaultXID, XID: xid, Since: m.now()})
	switch xid {
	case 63:
		g.remapUnc++
		g.remapPending = true
	case 64:
		g.remapFailed = true
	}
	m.emitLocked(gpu, nvml.EventTypeXidCriticalError, xid)
}

// InjectECCDoubleBit simulates an uncorrectable (double-bit) ECC error on
// GPU gpu: its volatile (and aggregate) uncorrected ECC count goes up by
// one, and, as real drivers do, both a double-bit ECC event and XID 48 are
// raised (an EventWatcher reports the pair once). Faults lists it as one
// FaultECCDBE with XID 48. It panics if gpu is not a GPU index of this
// node.
func (m *Mock) InjectECCDoubleBit(gpu int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.checkGPU("InjectECCDoubleBit", gpu)
	g := &m.gpus[gpu]
	g.eccDBE++
	g.faults = append(g.faults, Fault{GPU: gpu, Kind: FaultECCDBE, XID: xidDBE, Since: m.now()})
	m.emitLocked(gpu, nvml.EventTypeDoubleBitEccError, 0)
	m.emitLocked(gpu, nvml.EventTypeXidCriticalError, xidDBE)
}

// Clear returns every GPU of the node to a clean, idle state (see
// ClearGPU).
func (m *Mock) Clear() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.gpus {
		m.clearLocked(i)
	}
}

// ClearGPU returns GPU gpu to a clean state, as a GPU reset after the
// operator fixed it would: its faults are gone, its ECC and remapped-row
// counters are zero, and its processes are gone, so its telemetry heads
// back to the idle baseline. Events already delivered to event sets stay
// there: the driver raised them. It panics if gpu is not a GPU index of
// this node.
func (m *Mock) ClearGPU(gpu int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.checkGPU("ClearGPU", gpu)
	m.clearLocked(gpu)
}

// clearLocked clears GPU i. Called with mu held.
func (m *Mock) clearLocked(i int) {
	m.setBusyLocked(i, false)
	g := &m.gpus[i]
	g.computePIDs = nil
	g.faults = nil
	g.eccSBE, g.eccDBE = 0, 0
	g.remapCorr, g.remapUnc = 0, 0
	g.remapPending, g.remapFailed = false, false
}

// Faults lists the injected faults not yet cleared, by GPU index and then
// in injection order.
func (m *Mock) Faults() []Fault {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Fault
	for i := range m.gpus {
		out = append(out, m.gpus[i].faults...)
	}
	return out
}
