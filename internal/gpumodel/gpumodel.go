// Package gpumodel names GPU models the way users and the scheduler speak of
// them ("H100"), and maps NVML product names ("NVIDIA H100 80GB HBM3") onto
// those names. It is the one place both the scheduler (validating
// --gpu-model) and the node agent (reporting its inventory) agree on.
package gpumodel

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// ErrUnknown is returned by Parse for a model name that is not in Known.
var ErrUnknown = errors.New("gpumodel: unknown GPU model")

// known lists canonical model names. Whole-node leasing cares about the GPU
// family, not the SKU (SXM vs PCIe, 40 vs 80 GB): memory is its own constraint.
var known = []string{
	"A10", "A100", "A30", "A40",
	"B100", "B200", "B300",
	"GB200", "GB300", "GH200",
	"H100", "H20", "H200", "H800",
	"L4", "L40", "L40S",
	"T4", "V100",
}

// Known returns the canonical model names, sorted.
func Known() []string {
	out := append([]string(nil), known...)
	sort.Strings(out)
	return out
}

// Parse turns a user-supplied model name into its canonical form,
// case-insensitively: "h100" -> "H100". It fails with ErrUnknown for names
// the scheduler has never heard of, so a typo is an error, not a job that
// waits forever.
func Parse(s string) (string, error) {
	want := strings.ToUpper(strings.TrimSpace(s))
	for _, m := range known {
		if m == want {
			return m, nil
		}
	}
	return "", fmt.Errorf("%w %q (known: %s)", ErrUnknown, s, strings.Join(Known(), ", "))
}

// FromProductName extracts the model from an NVML product name, e.g.
// "NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA A100-SXM4-40GB" -> "A100".
// A name with no known model yields the product name itself with the
// "NVIDIA " prefix removed, so unknown hardware still shows up honestly.
func FromProductName(product string) string {
	name := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(product), "NVIDIA"))
	tokens := strings.FieldsFunc(strings.ToUpper(name), func(r rune) bool {
		return r == ' ' || r == '-' || r == '_'
	})
	for _, tok := range tokens {
		if m, err := Parse(tok); err == nil {
			return m
		}
	}
	return name
}
