package gpu

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// problemLike is a Problem expected on a GPU, its text containing a word.
type problemLike struct {
	gpu  int
	word string
}

func matchProblems(t *testing.T, got []Problem, want []problemLike) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("problems %v, want %d like %v", got, len(want), want)
	}
	for i, w := range want {
		if got[i].GPU != w.gpu || !strings.Contains(got[i].What, w.word) {
			t.Fatalf("problem %d is %q, want one on GPU %d about %q", i, got[i], w.gpu, w.word)
		}
	}
}

func TestCheckHealthOnASimulatedNode(t *testing.T) {
	cases := []struct {
		name     string
		expected int
		maxTempC uint32
		act      func(m *Mock, clock *fakeClock)
		want     []problemLike
	}{
		{"a fresh node is healthy", 8, 85, nil, nil},
		{"GPU processes are not a health problem here", 8, 85,
			func(m *Mock, _ *fakeClock) { m.SetProcesses(1, []uint32{77}) }, nil},
		{"fewer GPUs than expected is a problem", 9, 85, nil,
			[]problemLike{{NodeProblem, "8 GPUs visible, expected 9"}}},
		{"a GPU hotter than the limit is a problem", 8, 60,
			func(m *Mock, clock *fakeClock) {
				m.SetProcesses(1, []uint32{77})
				clock.Advance(5 * time.Minute)
			},
			[]problemLike{{1, "temperature"}}},
		{"a zero temperature limit checks nothing", 8, 0,
			func(m *Mock, clock *fakeClock) {
				m.SetProcesses(1, []uint32{77})
				clock.Advance(5 * time.Minute)
			}, nil},
		{"an ECC double-bit error is a problem", 8, 85,
			func(m *Mock, _ *fakeClock) { m.InjectECCDoubleBit(2) },
			[]problemLike{{2, "double-bit"}}},
		{"a row remapping waiting for a reset (XID 63) is a problem", 8, 85,
			func(m *Mock, _ *fakeClock) { m.InjectXID(6, 63) },
			[]problemLike{{6, "pending"}}},
		{"a failed row remapping (XID 64) is a problem", 8, 85,
			func(m *Mock, _ *fakeClock) { m.InjectXID(6, 64) },
			[]problemLike{{6, "failed"}}},
		{"XIDs themselves are the agent's to track, not a health problem here", 8, 85,
			func(m *Mock, _ *fakeClock) { m.InjectXID(0, 79); m.InjectXID(0, 13) }, nil},
		{"problems on several GPUs are all reported in GPU order", 8, 85,
			func(m *Mock, _ *fakeClock) { m.InjectECCDoubleBit(5); m.InjectXID(3, 63); m.InjectXID(3, 64) },
			[]problemLike{{3, "failed"}, {3, "pending"}, {5, "double-bit"}}},
		{"a cleared node is healthy again", 8, 60,
			func(m *Mock, clock *fakeClock) {
				m.SetProcesses(4, []uint32{77})
				m.InjectECCDoubleBit(4)
				m.InjectXID(4, 64)
				clock.Advance(5 * time.Minute)
				m.Clear()
				clock.Advance(5 * time.Minute)
			}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b, clock := openClocked(t, BackendMockDGXH100)
			if c.act != nil {
				c.act(b.Mock, clock)
			}
			matchProblems(t, CheckHealth(b.NVML, c.expected, c.maxTempC), c.want)
		})
	}
}

func TestCheckHealthOnHardwareVariants(t *testing.T) {
	cases := []struct {
		name      string
		breakIt   func(d *mock.Device)
		wantWords []string
	}{
		{"a GPU without row remapping or ECC is checked for the rest",
			func(d *mock.Device) {
				d.GetRemappedRowsFunc = func() (int, int, bool, bool, nvml.Return) {
					return 0, 0, false, false, nvml.ERROR_NOT_SUPPORTED
				}
				d.GetTotalEccErrorsFunc = func(nvml.MemoryErrorType, nvml.EccCounterType) (uint64, nvml.Return) {
					return 0, nvml.ERROR_NOT_SUPPORTED
				}
			}, nil},
		{"rows remapped successfully are no problem",
			func(d *mock.Device) {
				d.GetRemappedRowsFunc = func() (int, int, bool, bool, nvml.Return) { return 3, 2, false, false, nvml.SUCCESS }
			}, nil},
		{"a pre-Ampere GPU with retired pages pending is a problem",
			func(d *mock.Device) {
				d.GetRetiredPagesPendingStatusFunc = func() (nvml.EnableState, nvml.Return) {
					return nvml.FEATURE_ENABLED, nvml.SUCCESS
				}
			}, []string{"retired pages pending"}},
		{"a GPU that cannot be read is a problem",
			func(d *mock.Device) {
				d.GetTotalEccErrorsFunc = func(nvml.MemoryErrorType, nvml.EccCounterType) (uint64, nvml.Return) {
					return 0, nvml.ERROR_GPU_IS_LOST
				}
			}, []string{"DeviceGetTotalEccErrors(uncorrected): ERROR_GPU_IS_LOST"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := bareDevice("GPU-x")
			c.breakIt(d)
			var want []problemLike
			for _, w := range c.wantWords {
				want = append(want, problemLike{1, w})
			}
			matchProblems(t, CheckHealth(bareLib(bareDevice("GPU-w"), d), 2, 80), want)
		})
	}
}

func TestCheckHealthWhenNVMLCannotCount(t *testing.T) {
	lib := bareLib()
	lib.DeviceGetCountFunc = func() (int, nvml.Return) { return 0, nvml.ERROR_UNINITIALIZED }
	got := CheckHealth(lib, 8, 85)
	if len(got) != 1 || got[0].GPU != NodeProblem || !strings.Contains(got[0].String(), "node: cannot count GPUs") {
		t.Fatalf("problems %v, want one node problem about counting", got)
	}
}

func TestProblemString(t *testing.T) {
	got := []string{Problem{NodeProblem, "x"}.String(), Problem{3, "y"}.String()}
	if !slices.Equal(got, []string{"node: x", "GPU 3: y"}) {
		t.Fatalf("String() = %q", got)
	}
}
