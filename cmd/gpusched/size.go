package main

import (
	"fmt"
	"strconv"
	"strings"
)

// sizeUnits: decimal units as GPU vendors label memory ("80GB" H100 has
// about 79.6 GiB), binary ones for exact powers of two.
var sizeUnits = []struct {
	suffix string
	factor uint64
}{
	{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20},
	{"TB", 1e12}, {"GB", 1e9}, {"MB", 1e6},
	{"T", 1e12}, {"G", 1e9}, {"M", 1e6}, {"B", 1},
}

// parseSize reads "80GB", "80G", "141GiB", "2048MiB" or plain bytes.
func parseSize(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	for _, u := range sizeUnits {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
			if err != nil || f < 0 {
				return 0, fmt.Errorf("%q is not a size (e.g. 80GB, 141GiB)", s)
			}
			return uint64(f * float64(u.factor)), nil
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a size (e.g. 80GB, 141GiB)", s)
	}
	return n, nil
}

// parseLabels reads "k=v,k2=v2" (repeatable flags) into a map.
func parseLabels(flag string, vals []string) (map[string]string, error) {
	out := map[string]string{}
	for _, kv := range splitList(vals) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, usageError("%s wants k=v[,k=v...], got %q", flag, kv)
		}
		out[k] = v
	}
	return out, nil
}
