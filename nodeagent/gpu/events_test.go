package gpu

import (
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// mustWatch starts an XID watcher and closes it when the test ends.
func mustWatch(t *testing.T, lib nvml.Interface) *EventWatcher {
	t.Helper()
	w, err := WatchXIDs(lib)
	if err != nil {
		t.Fatalf("WatchXIDs: %v", err)
	}
	t.Cleanup(func() {
		if err := w.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return w
}

// mustNext returns the next event, failing the test if none comes soon.
func mustNext(t *testing.T, w *EventWatcher) XIDEvent {
	t.Helper()
	ev, ok, err := w.Next(5 * time.Second)
	if err != nil || !ok {
		t.Fatalf("Next = %+v, %v, %v; want an event", ev, ok, err)
	}
	return ev
}

// mustBeQuiet fails the test if the watcher has an event waiting.
func mustBeQuiet(t *testing.T, w *EventWatcher) {
	t.Helper()
	if ev, ok, err := w.Next(20 * time.Millisecond); ok || err != nil {
		t.Fatalf("Next = %+v, %v, %v; want a timeout with no event", ev, ok, err)
	}
}

func TestInjectedXIDsComeOutOfTheWatcher(t *testing.T) {
	cases := []struct {
		name string
		gpu  int
		xid  uint64
	}{
		{"a GPU falling off the bus on GPU 0", 0, 79},
		{"an application fault on GPU 3", 3, 13},
		{"an NVLink error on the last GPU", 7, 74},
		{"an XID nobody classified", 5, 999},
	}
	for _, model := range Backends()[1:] {
		t.Run(model, func(t *testing.T) {
			b := mustOpen(t, model)
			inv, err := ReadInventory(b.NVML)
			if err != nil {
				t.Fatal(err)
			}
			w := mustWatch(t, b.NVML)
			if u := w.Unwatched(); u != nil {
				t.Fatalf("Unwatched = %v, want every GPU watched", u)
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					b.Mock.InjectXID(c.gpu, c.xid)
					ev := mustNext(t, w)
					if ev.GPU != c.gpu || ev.UUID != inv.GPUs[c.gpu].UUID || ev.XID != c.xid || ev.Time.IsZero() {
						t.Fatalf("event %+v, want XID %d on GPU %d (%s)", ev, c.xid, c.gpu, inv.GPUs[c.gpu].UUID)
					}
				})
			}
		})
	}
}

func TestXIDsArriveInOrder(t *testing.T) {
	b := mustOpen(t, BackendMockDGXH100)
	w := mustWatch(t, b.NVML)
	want := []XIDEvent{{GPU: 1, XID: 31}, {GPU: 6, XID: 94}, {GPU: 1, XID: 43}}
	for _, e := range want {
		b.Mock.InjectXID(e.GPU, e.XID)
	}
	for _, e := range want {
		if ev := mustNext(t, w); ev.GPU != e.GPU || ev.XID != e.XID {
			t.Fatalf("event %+v, want XID %d on GPU %d", ev, e.XID, e.GPU)
		}
	}
	mustBeQuiet(t, w)
}

func TestNextTimesOutWithoutAnEvent(t *testing.T) {
	cases := []struct {
		name    string
		timeout time.Duration
	}{
		{"a short wait times out", 30 * time.Millisecond},
		{"a wait longer than one NVML wait slice times out", waitSlice + 50*time.Millisecond},
		{"a zero wait only polls", 0},
		{"a negative wait only polls", -time.Second},
	}
	b := mustOpen(t, BackendMockDGXA100)
	w := mustWatch(t, b.NVML)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ev, ok, err := w.Next(c.timeout)
			if ok || err != nil || ev != (XIDEvent{}) {
				t.Fatalf("Next(%v) = %+v, %v, %v; want a timeout", c.timeout, ev, ok, err)
			}
		})
	}
}

func TestAnECCDoubleBitErrorIsReportedOnceAsXID48(t *testing.T) {
	b := mustOpen(t, BackendMockDGXH200)
	w := mustWatch(t, b.NVML)
	b.Mock.InjectECCDoubleBit(4)
	if ev := mustNext(t, w); ev.GPU != 4 || ev.XID != 48 {
		t.Fatalf("event %+v, want XID 48 on GPU 4", ev)
	}
	mustBeQuiet(t, w) // the driver's twin DBE event is folded in
	// A second error later is a new event.
	b.Mock.InjectECCDoubleBit(4)
	if ev := mustNext(t, w); ev.GPU != 4 || ev.XID != 48 {
		t.Fatalf("event %+v, want XID 48 on GPU 4", ev)
	}
	mustBeQuiet(t, w)
}

func TestAWatcherSeesOnlyXIDsRaisedAfterItStarted(t *testing.T) {
	b := mustOpen(t, BackendMockDGXH100)
	b.Mock.InjectXID(2, 79)
	w := mustWatch(t, b.NVML)
	mustBeQuiet(t, w)
	b.Mock.InjectXID(2, 48)
	if ev := mustNext(t, w); ev.XID != 48 {
		t.Fatalf("event %+v, want the XID 48 raised after the watch began", ev)
	}
}

func TestEveryWatcherSeesEveryXID(t *testing.T) {
	b := mustOpen(t, BackendMockDGXH100)
	w1, w2 := mustWatch(t, b.NVML), mustWatch(t, b.NVML)
	b.Mock.InjectXID(7, 92)
	for _, w := range []*EventWatcher{w1, w2} {
		if ev := mustNext(t, w); ev.GPU != 7 || ev.XID != 92 {
			t.Fatalf("event %+v, want XID 92 on GPU 7", ev)
		}
	}
}

func TestCloseEndsTheWatcher(t *testing.T) {
	b := mustOpen(t, BackendMockDGXB200)
	w, err := WatchXIDs(b.NVML)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var waitErr error
	started := make(chan struct{})
	wg.Go(func() {
		close(started)
		_, _, waitErr = w.Next(time.Hour)
	})
	<-started
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	wg.Wait() // a Next waiting for an hour returns once closed
	if !errors.Is(waitErr, ErrWatcherClosed) {
		t.Fatalf("waiting Next = %v, want ErrWatcherClosed", waitErr)
	}
	if _, _, err := w.Next(time.Millisecond); !errors.Is(err, ErrWatcherClosed) {
		t.Fatalf("Next after Close = %v, want ErrWatcherClosed", err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("second Close = %v, want nil", err)
	}
	// The freed set no longer receives events.
	b.Mock.InjectXID(0, 79)
	b.Mock.mu.Lock()
	sets := len(b.Mock.eventSets)
	b.Mock.mu.Unlock()
	if sets != 0 {
		t.Fatalf("%d event sets still registered after Close", sets)
	}
}

// bareEventLib is a bare go-nvml moq library with GPUs whose event
// support varies, over a scripted event set, to check WatchXIDs the way
// real NVML would drive it.
type bareEventLib struct {
	lib        *mock.Interface
	devs       []*mock.Device
	registered map[int]uint64
	events     []nvml.EventData
	freed      bool
}

func newBareEventLib(supported []uint64, registerRet []nvml.Return) *bareEventLib {
	b := &bareEventLib{registered: map[int]uint64{}}
	var mu sync.Mutex
	set := &mock.EventSet{
		WaitFunc: func(uint32) (nvml.EventData, nvml.Return) {
			mu.Lock()
			defer mu.Unlock()
			if len(b.events) == 0 {
				return nvml.EventData{}, nvml.ERROR_TIMEOUT
			}
			ev := b.events[0]
			b.events = b.events[1:]
			return ev, nvml.SUCCESS
		},
		FreeFunc: func() nvml.Return { b.freed = true; return nvml.SUCCESS },
	}
	for i := range supported {
		d := bareDevice("GPU-bare-" + string(rune('a'+i)))
		d.GetSupportedEventTypesFunc = func() (uint64, nvml.Return) {
			if supported[i] == 0 {
				return 0, nvml.ERROR_NOT_SUPPORTED
			}
			return supported[i], nvml.SUCCESS
		}
		d.RegisterEventsFunc = func(types uint64, s nvml.EventSet) nvml.Return {
			if s != set {
				return nvml.ERROR_INVALID_ARGUMENT
			}
			if registerRet[i] == nvml.SUCCESS {
				b.registered[i] = types
			}
			return registerRet[i]
		}
		b.devs = append(b.devs, d)
	}
	b.lib = bareLib(b.devs...)
	b.lib.EventSetCreateFunc = func() (nvml.EventSet, nvml.Return) { return set, nvml.SUCCESS }
	return b
}

func TestWatchXIDsRegistersWhatEachGPUSupports(t *testing.T) {
	xid, dbe := uint64(nvml.EventTypeXidCriticalError), uint64(nvml.EventTypeDoubleBitEccError)
	b := newBareEventLib(
		[]uint64{xid | dbe, xid, 0, dbe, xid},
		[]nvml.Return{nvml.SUCCESS, nvml.SUCCESS, nvml.SUCCESS, nvml.SUCCESS, nvml.ERROR_NOT_SUPPORTED},
	)
	w, err := WatchXIDs(b.lib)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	cases := []struct {
		name string
		gpu  int
		want uint64
	}{
		{"a GPU with DBE events gets XIDs and DBEs", 0, xid | dbe},
		{"a GPU without DBE events gets XIDs only", 1, xid},
		{"a GPU that cannot list its event types is tried for XIDs", 2, xid},
		{"a GPU without XID events is not registered", 3, 0},
		{"a GPU refusing registration is not registered", 4, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := b.registered[c.gpu]; got != c.want {
				t.Fatalf("GPU %d registered %#x, want %#x", c.gpu, got, c.want)
			}
		})
	}
	if got := w.Unwatched(); !slices.Equal(got, []int{3, 4}) {
		t.Fatalf("Unwatched = %v, want [3 4]", got)
	}
}

func TestWatcherMapsEventsToGPUs(t *testing.T) {
	xid := uint64(nvml.EventTypeXidCriticalError)
	b := newBareEventLib([]uint64{xid, xid}, []nvml.Return{nvml.SUCCESS, nvml.SUCCESS})
	w, err := WatchXIDs(b.lib)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	// A handle NVML made anew for GPU 1: found by its UUID.
	other := bareDevice("GPU-bare-b")
	b.events = []nvml.EventData{
		{Device: b.devs[1], EventType: xid, EventData: 79},
		{Device: other, EventType: xid, EventData: 74},
		{Device: nil, EventType: xid, EventData: 119},
		{Device: b.devs[0], EventType: nvml.EventTypePState, EventData: 1},
		{Device: b.devs[0], EventType: xid, EventData: 13},
	}
	want := []XIDEvent{
		{GPU: 1, UUID: "GPU-bare-b", XID: 79},
		{GPU: 1, UUID: "GPU-bare-b", XID: 74},
		{GPU: -1, UUID: "", XID: 119},
		{GPU: 0, UUID: "GPU-bare-a", XID: 13}, // the P-state event is not an XID
	}
	for _, e := range want {
		ev := mustNext(t, w)
		ev.Time = time.Time{}
		if ev != e {
			t.Fatalf("event %+v, want %+v", ev, e)
		}
	}
	if err := w.Close(); err != nil || !b.freed {
		t.Fatalf("Close = %v (set freed: %v)", err, b.freed)
	}
}

func TestWatchXIDsFailsCleanly(t *testing.T) {
	xid := uint64(nvml.EventTypeXidCriticalError)
	b := newBareEventLib([]uint64{xid, xid}, []nvml.Return{nvml.SUCCESS, nvml.ERROR_GPU_IS_LOST})
	w, err := WatchXIDs(b.lib)
	if w != nil || !errors.Is(err, nvml.ERROR_GPU_IS_LOST) || !b.freed {
		t.Fatalf("WatchXIDs = %v, %v (set freed: %v); want GPU_IS_LOST and the set freed", w, err, b.freed)
	}
}
