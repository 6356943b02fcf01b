package gpu

import "fmt"

// Severity is what an XID means for the node holding the GPU.
type Severity int

const (
	// SeverityInfo: recorded with the node's telemetry; no action. The
	// zero value, so an XID nobody classified is never mistaken for a
	// fault.
	SeverityInfo Severity = iota
	// SeverityApplication: the job on the GPU did something wrong or was
	// hit by it (bad memory access, engine exception); recorded on the
	// node and the lease, but the GPU itself is fine and the node is not
	// drained.
	SeverityApplication
	// SeverityFatal: the GPU is no longer trustworthy (memory corrupted,
	// interconnect or firmware failure, off the bus) until it is reset or
	// repaired; the node is drained.
	SeverityFatal
)

// String returns "info", "application" or "fatal".
func (s Severity) String() string {
	switch s {
	case SeverityInfo:
		return "info"
	case SeverityApplication:
		return "application"
	case SeverityFatal:
		return "fatal"
	default:
		return fmt.Sprintf("Severity(%d)", int(s))
	}
}

// xidDBE is the XID the driver raises for an uncorrectable (double-bit)
// ECC error.
const xidDBE = 48

// xidSeverity classifies the XIDs that are not SeverityInfo. It follows
// the resolution guidance of NVIDIA's XID catalog (the "XID Errors"
// chapter of the GPU deployment and management documentation), reduced to
// the one decision the scheduler makes: drain the node or not. Where the
// catalog's answer is "reset the GPU" or "contact support", the XID is
// fatal here; where it points at the application, it is application-level.
//
//	XID  meaning (paraphrased)                          severity
//	 13  graphics engine exception (bad kernel/access)  application
//	 31  GPU memory page fault (bad access by the job)  application
//	 43  GPU stopped processing (job fault, recovered)  application
//	 45  preemptive cleanup after a prior fault/kill    application
//	 48  double-bit (uncorrectable) ECC error           fatal
//	 63  ECC page retirement / row remapping recorded   fatal: needs a reset
//	                                                    before the remap applies
//	 64  ECC page retirement / row remapping failure    fatal
//	 68  video processor exception                      application
//	 69  graphics engine class error                    application
//	 74  NVLink error                                   fatal
//	 79  GPU has fallen off the bus                     fatal
//	 92  high single-bit ECC error rate                 fatal
//	 94  contained ECC error                            fatal (conservative: the
//	                                                    catalog asks for a reset
//	                                                    once convenient)
//	 95  uncontained ECC error                          fatal
//	119  GSP RPC timeout                                fatal
//	120  GSP error                                      fatal
//	     anything else                                  info
var xidSeverity = map[uint64]Severity{
	13: SeverityApplication,
	31: SeverityApplication,
	43: SeverityApplication,
	45: SeverityApplication,
	68: SeverityApplication,
	69: SeverityApplication,

	xidDBE: SeverityFatal,
	63:     SeverityFatal,
	64:     SeverityFatal,
	74:     SeverityFatal,
	79:     SeverityFatal,
	92:     SeverityFatal,
	94:     SeverityFatal,
	95:     SeverityFatal,
	119:    SeverityFatal,
	120:    SeverityFatal,
}

// ClassifyXID says what XID xid means for the node (see xidSeverity for
// the table).
func ClassifyXID(xid uint64) Severity {
	return xidSeverity[xid] // absent: SeverityInfo, the zero value
}
