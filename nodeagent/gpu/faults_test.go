package gpu

import (
	"slices"
	"sync"
	"testing"
	"time"
)

func TestInjectedFaultsAreListedUntilCleared(t *testing.T) {
	b, clock := openClocked(t, BackendMockDGXH100)
	t0 := clock.Now()
	b.Mock.InjectXID(3, 79)
	clock.Advance(time.Second)
	b.Mock.InjectECCDoubleBit(5)
	b.Mock.InjectXID(3, 13)
	t1 := clock.Now()
	steps := []struct {
		name string
		act  func()
		want []Fault
	}{
		{"every injected fault is listed by GPU, in injection order", nil, []Fault{
			{GPU: 3, Kind: FaultXID, XID: 79, Since: t0},
			{GPU: 3, Kind: FaultXID, XID: 13, Since: t1},
			{GPU: 5, Kind: FaultECCDBE, XID: 48, Since: t1},
		}},
		{"clearing one GPU leaves the others' faults", func() { b.Mock.ClearGPU(3) }, []Fault{
			{GPU: 5, Kind: FaultECCDBE, XID: 48, Since: t1},
		}},
		{"clearing the node leaves none", func() { b.Mock.Clear() }, nil},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			if s.act != nil {
				s.act()
			}
			if got := b.Mock.Faults(); !slices.Equal(got, s.want) {
				t.Fatalf("Faults() = %+v\nwant %+v", got, s.want)
			}
		})
	}
}

func TestClearResetsTheNode(t *testing.T) {
	cases := []struct {
		name  string
		clear func(m *Mock)
	}{
		{"Clear resets every GPU", func(m *Mock) { m.Clear() }},
		{"ClearGPU resets the GPU it names", func(m *Mock) { m.ClearGPU(2) }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b, clock := openClocked(t, BackendMockDGXA100)
			idle := sampleOf(t, b, 2)
			b.Mock.SetProcesses(2, []uint32{10, 11})
			b.Mock.InjectECCDoubleBit(2)
			b.Mock.InjectECCDoubleBit(2)
			b.Mock.InjectXID(2, 63)
			clock.Advance(time.Minute)
			dirty := sampleOf(t, b, 2)
			if dirty.ECCVolatileDBE != 2 || dirty.RemappedRowsUncorrectable != 1 || dirty.GPUUtil == 0 {
				t.Fatalf("before clearing GPU 2 reads %+v; want 2 DBEs, 1 remapped row, load", dirty)
			}
			if len(CheckHealth(b.NVML, 8, 85)) == 0 {
				t.Fatal("CheckHealth found nothing wrong before clearing")
			}

			c.clear(b.Mock)
			procs, err := ListGPUProcesses(b.NVML)
			if err != nil {
				t.Fatal(err)
			}
			s := sampleOf(t, b, 2)
			if len(procs[2]) != 0 || s.ECCVolatileDBE != 0 || s.RemappedRowsUncorrectable != 0 ||
				s.FBUsedBytes != b.Mock.IdleFBUsedBytes() || len(b.Mock.Faults()) != 0 {
				t.Fatalf("after clearing GPU 2 runs %v and reads %+v with faults %v", procs[2], s, b.Mock.Faults())
			}
			if p := CheckHealth(b.NVML, 8, 85); len(p) != 0 {
				t.Fatalf("CheckHealth after clearing = %v", p)
			}
			clock.Advance(10 * time.Minute)
			if s := sampleOf(t, b, 2); s != idle {
				t.Fatalf("long after clearing GPU 2 reads %+v, want its idle %+v", s, idle)
			}
		})
	}
}

func TestECCDoubleBitShowsInTelemetry(t *testing.T) {
	b := mustOpen(t, BackendMockDGXH100)
	for range 3 {
		b.Mock.InjectECCDoubleBit(6)
	}
	samples, err := ReadTelemetry(b.NVML)
	if err != nil {
		t.Fatal(err)
	}
	for i, s := range samples {
		want := uint64(0)
		if i == 6 {
			want = 3
		}
		if s.ECCVolatileDBE != want || s.ECCVolatileSBE != 0 {
			t.Errorf("GPU %d reads %d DBEs and %d SBEs, want %d and 0", i, s.ECCVolatileDBE, s.ECCVolatileSBE, want)
		}
	}
}

func TestMockInjectionOutOfRangePanics(t *testing.T) {
	cases := []struct {
		name string
		call func(m *Mock)
	}{
		{"InjectXID on GPU 8 of 8", func(m *Mock) { m.InjectXID(8, 79) }},
		{"InjectECCDoubleBit on GPU -1", func(m *Mock) { m.InjectECCDoubleBit(-1) }},
		{"ClearGPU on GPU 8 of 8", func(m *Mock) { m.ClearGPU(8) }},
	}
	for _, c := range cases {
		t.Run(c.name+" panics", func(t *testing.T) {
			b := mustOpen(t, BackendMockDGXH100)
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			c.call(b.Mock)
		})
	}
}

func TestMockFaultsAndTelemetryAreSafeForConcurrentUse(t *testing.T) {
	b := mustOpen(t, BackendMockDGXH100)
	w := mustWatch(t, b.NVML)
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range 200 {
			b.Mock.SetProcesses(i%8, []uint32{uint32(i)})
			b.Mock.InjectXID(i%8, 79)
			if i%10 == 0 {
				b.Mock.InjectECCDoubleBit(i % 8)
				b.Mock.ClearGPU((i + 3) % 8)
			}
			_ = b.Mock.Faults()
		}
		b.Mock.Clear()
	})
	wg.Go(func() {
		for range 100 {
			if _, err := ReadTelemetry(b.NVML); err != nil {
				t.Error(err)
				return
			}
			_ = CheckHealth(b.NVML, 8, 85)
		}
	})
	wg.Go(func() {
		for range 100 {
			if _, _, err := w.Next(time.Millisecond); err != nil {
				t.Error(err)
				return
			}
		}
	})
	wg.Wait()
}
