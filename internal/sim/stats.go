package sim

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"time"
)

// Millis is a duration reported in milliseconds (JSON: a number).
type Millis float64

func ms(d time.Duration) Millis { return Millis(float64(d) / float64(time.Millisecond)) }

// MarshalJSON rounds to microseconds.
func (m Millis) MarshalJSON() ([]byte, error) {
	return json.Marshal(math.Round(float64(m)*1000) / 1000)
}

func (m Millis) String() string {
	switch {
	case m == 0:
		return "0"
	case m < 10:
		return fmt.Sprintf("%.2f ms", float64(m))
	case m < 10000:
		return fmt.Sprintf("%.0f ms", float64(m))
	default:
		return fmt.Sprintf("%.1f s", float64(m)/1000)
	}
}

// Percentiles summarises a set of durations.
type Percentiles struct {
	N    int    `json:"n"`
	P50  Millis `json:"p50_ms"`
	P90  Millis `json:"p90_ms"`
	P99  Millis `json:"p99_ms"`
	P999 Millis `json:"p999_ms"`
	Max  Millis `json:"max_ms"`
	Mean Millis `json:"mean_ms"`
}

// summarize sorts ds in place and returns its nearest-rank percentiles.
func summarize(ds []time.Duration) Percentiles {
	if len(ds) == 0 {
		return Percentiles{}
	}
	slices.Sort(ds)
	rank := func(p float64) time.Duration {
		i := int(math.Ceil(p*float64(len(ds)))) - 1
		return ds[max(0, min(i, len(ds)-1))]
	}
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return Percentiles{
		N: len(ds), P50: ms(rank(0.50)), P90: ms(rank(0.90)), P99: ms(rank(0.99)), P999: ms(rank(0.999)),
		Max: ms(ds[len(ds)-1]), Mean: ms(sum / time.Duration(len(ds))),
	}
}

func (p Percentiles) String() string {
	if p.N == 0 {
		return "n/a"
	}
	return fmt.Sprintf("p50 %s  p99 %s  p99.9 %s  max %s  (n=%d)", p.P50, p.P99, p.P999, p.Max, p.N)
}

// rate is n per second over d.
func rate(n int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(n) / d.Seconds()
}
