package gpu

import (
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// fakeClock is a clock tests move by hand.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// openClocked opens a simulated node running on a fake clock.
func openClocked(t testing.TB, model string) (*Backend, *fakeClock) {
	t.Helper()
	clock := newFakeClock()
	b, err := OpenMock(model, MockOptions{NodeName: "clocked", Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b, clock
}

// sampleOf reads GPU i's telemetry.
func sampleOf(t *testing.T, b *Backend, i int) Sample {
	t.Helper()
	samples, err := ReadTelemetry(b.NVML)
	if err != nil {
		t.Fatal(err)
	}
	return samples[i]
}

func TestLoadDrivesTelemetryAndIdleReturnsToBaseline(t *testing.T) {
	const gpu = 2
	const watts = 1000
	b, clock := openClocked(t, BackendMockDGXH100)
	idle := sampleOf(t, b, gpu)
	var prev Sample
	steps := []struct {
		name    string
		act     func()
		advance time.Duration
		check   func(s Sample) bool
	}{
		{"an idle GPU sits at its baseline", nil, 0, func(s Sample) bool {
			return s.GPUUtil == 0 && s.FBUsedBytes == b.Mock.IdleFBUsedBytes() &&
				s.PowerMilliwatts >= 70*watts && s.PowerMilliwatts <= 90*watts && s.TempC >= 30 && s.TempC <= 35
		}},
		{"a job starting does not change the reading in the same instant",
			func() { b.Mock.SetProcesses(gpu, []uint32{4242}) }, 0, func(s Sample) bool {
				return s.GPUUtil == 0 && s.FBUsedBytes == idle.FBUsedBytes && s.TempC == idle.TempC
			}},
		{"a second later everything has started to climb", nil, time.Second, func(s Sample) bool {
			return s.GPUUtil > 30 && s.MemUtil > 0 && s.FBUsedBytes > idle.FBUsedBytes &&
				s.PowerMilliwatts > idle.PowerMilliwatts && s.TempC >= idle.TempC &&
				s.SMClockMHz > idle.SMClockMHz && s.ThrottleReasons == nvml.ClocksEventReasonNone
		}},
		{"five seconds in memory is still growing and the GPU still warming", nil, 4 * time.Second, func(s Sample) bool {
			return s.FBUsedBytes > prev.FBUsedBytes && s.FBUsedBytes < b.Mock.IdleFBUsedBytes()+6<<30 &&
				s.TempC > prev.TempC && s.TempC < 60
		}},
		{"half a minute in utilization, memory and power are at load levels", nil, 25 * time.Second, func(s Sample) bool {
			return s.GPUUtil >= 85 && s.GPUUtil <= 100 && s.MemUtil >= 40 && s.MemUtil <= 60 &&
				s.FBUsedBytes == b.Mock.IdleFBUsedBytes()+6<<30 &&
				s.PowerMilliwatts >= 500*watts && s.PowerMilliwatts <= 700*watts && s.TempC > 55
		}},
		{"minutes in the temperature has plateaued near 70 C", nil, 3 * time.Minute, func(s Sample) bool {
			return s.TempC >= 65 && s.TempC <= 72 && s.GPUUtil >= 85
		}},
		{"the job ending frees its memory at once", func() { b.Mock.SetProcesses(gpu, nil) }, 0, func(s Sample) bool {
			return s.FBUsedBytes == b.Mock.IdleFBUsedBytes() && s.TempC == prev.TempC
		}},
		{"ten seconds later utilization and power are back to idle", nil, 10 * time.Second, func(s Sample) bool {
			return s.GPUUtil == 0 && s.MemUtil == 0 && s.PowerMilliwatts == idle.PowerMilliwatts &&
				s.TempC < prev.TempC && s.TempC > idle.TempC &&
				s.SMClockMHz == idle.SMClockMHz && s.ThrottleReasons == nvml.ClocksEventReasonGpuIdle
		}},
		{"minutes later the GPU reads exactly its idle baseline", nil, 5 * time.Minute, func(s Sample) bool {
			return s == idle
		}},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			if s.act != nil {
				s.act()
			}
			clock.Advance(s.advance)
			got := sampleOf(t, b, gpu)
			if !s.check(got) {
				t.Fatalf("GPU %d reads %+v\n(previous %+v)", gpu, got, prev)
			}
			prev = got
			// The other GPUs never saw the job.
			if other := sampleOf(t, b, gpu+1); other.GPUUtil != 0 || other.FBUsedBytes != b.Mock.IdleFBUsedBytes() {
				t.Errorf("idle GPU %d reads %+v", gpu+1, other)
			}
		})
	}
}

func TestLoadRaisesTelemetrySmoothly(t *testing.T) {
	for _, model := range Backends()[1:] {
		t.Run("a job on "+model+" warms the GPU and fills memory without jumps", func(t *testing.T) {
			b, clock := openClocked(t, model)
			b.Mock.SetProcesses(0, []uint32{1})
			var temps []uint32
			var fb []uint64
			for range 60 {
				clock.Advance(time.Second)
				s := sampleOf(t, b, 0)
				temps, fb = append(temps, s.TempC), append(fb, s.FBUsedBytes)
			}
			if !slices.IsSorted(temps) || !slices.IsSorted(fb) {
				t.Fatalf("temperature %v or memory %v went down under steady load", temps, fb)
			}
			for i := 1; i < len(temps); i++ {
				if temps[i]-temps[i-1] > 5 {
					t.Fatalf("temperature jumped %d -> %d in a second", temps[i-1], temps[i])
				}
			}
		})
	}
}

func TestTheSameClockGivesTheSameTelemetry(t *testing.T) {
	run := func() [][]Sample {
		b, clock := openClocked(t, BackendMockDGXB200)
		var out [][]Sample
		for step := range 20 {
			if step == 3 {
				b.Mock.SetProcesses(5, []uint32{9})
			}
			if step == 12 {
				b.Mock.SetProcesses(5, nil)
			}
			clock.Advance(700 * time.Millisecond)
			s, err := ReadTelemetry(b.NVML)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, s)
		}
		return out
	}
	a, b := run(), run()
	for i := range a {
		if !slices.Equal(a[i], b[i]) {
			t.Fatalf("step %d differs:\n%+v\n%+v", i, a[i], b[i])
		}
	}
}
