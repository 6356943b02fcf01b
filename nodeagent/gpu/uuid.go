package gpu

import (
	"crypto/rand"
	"crypto/sha256"
	"fmt"
)

// mockUUIDs returns n GPU UUIDs in NVML's "GPU-8-4-4-4-12" hex form for a
// simulated node. go-nvml happens to draw random ones too, but a node's
// identity must not rest on a mock's implementation detail, and random ones
// cannot be reproduced across restarts; so they are made here.
func mockUUIDs(model string, opts MockOptions, n int) []string {
	derive := opts.NodeName != "" || opts.Seed != 0
	out := make([]string, n)
	for i := range out {
		var b [16]byte
		if derive {
			// The model is part of the key: the same node rebuilt with other
			// hardware has other GPUs.
			sum := sha256.Sum256(fmt.Appendf(nil, "gpusched mock GPU\x00%s\x00%s\x00%d\x00%d",
				model, opts.NodeName, opts.Seed, i))
			copy(b[:], sum[:])
			b[6] = b[6]&0x0f | 0x80 // version 8: custom (RFC 9562)
		} else {
			// Since Go 1.24 Read never fails; it crashes the program instead.
			_, _ = rand.Read(b[:])
			b[6] = b[6]&0x0f | 0x40 // version 4: random
		}
		b[8] = b[8]&0x3f | 0x80 // RFC 4122/9562 variant
		out[i] = fmt.Sprintf("GPU-%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
	}
	return out
}
