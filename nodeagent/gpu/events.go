package gpu

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// ErrWatcherClosed is returned by EventWatcher.Next once the watcher is
// closed.
var ErrWatcherClosed = errors.New("gpu: event watcher closed")

// XIDEvent is one XID the driver reported on a GPU.
type XIDEvent struct {
	// GPU is the NVML index of the GPU, -1 when NVML did not say which.
	GPU int
	// UUID is that GPU's UUID, "" when unknown.
	UUID string
	// XID is the XID number (see ClassifyXID).
	XID uint64
	// Time is when the watcher received the event (NVML's classic event
	// API carries no timestamp).
	Time time.Time
}

// waitSlice bounds one blocking NVML Wait inside Next, so Close, which
// must not free the event set while a Wait runs on it, never waits
// longer than this for Next to let go.
const waitSlice = 100 * time.Millisecond

// dbePairWindow is how close together a double-bit ECC event and an XID 48
// on the same GPU must arrive to be reported as one event. Drivers raise
// both for one error.
const dbePairWindow = 2 * time.Second

// EventWatcher delivers the XIDs of every GPU of a node, from one NVML
// event set. Use Next from one goroutine at a time (calls are serialised),
// and Close from any goroutine.
type EventWatcher struct {
	set   nvml.EventSet
	devs  []nvml.Device
	uuids []string
	// unwatched lists the GPUs whose driver refused XID events.
	unwatched []int

	closing atomic.Bool
	// mu serialises Next's Waits and Close's Free: NVML does not promise
	// that freeing a set another thread waits on is safe.
	mu     sync.Mutex
	closed bool
	// lastDBE remembers, per GPU, the last XID-48-like event (which kind,
	// when) so its twin from the other event type is dropped.
	lastDBE map[int]dbeSeen
}

type dbeSeen struct {
	eventType uint64
	at        time.Time
}

// WatchXIDs starts watching every GPU for XID events: one NVML event set,
// with each GPU registered for critical XID events, plus double-bit ECC
// events where the GPU supports them (reported as XID 48, their XID). It
// works the same over real NVML and the mocks (whose InjectXID and
// InjectECCDoubleBit raise the events). A GPU whose driver does not
// support XID events at all is left out rather than failing the watch;
// Unwatched lists such GPUs. Close the watcher when done.
func WatchXIDs(lib nvml.Interface) (*EventWatcher, error) {
	set, ret := lib.EventSetCreate()
	if ret != nvml.SUCCESS {
		return nil, fmt.Errorf("gpu: EventSetCreate: %w", ret)
	}
	w := &EventWatcher{set: set, lastDBE: map[int]dbeSeen{}}
	if err := w.register(lib); err != nil {
		set.Free()
		return nil, err
	}
	return w, nil
}

// register registers every GPU of lib on the watcher's set.
func (w *EventWatcher) register(lib nvml.Interface) error {
	count, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return fmt.Errorf("gpu: DeviceGetCount: %w", ret)
	}
	for i := range count {
		dev, ret := lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			return fmt.Errorf("gpu: DeviceGetHandleByIndex for GPU %d: %w", i, ret)
		}
		uuid, ret := dev.GetUUID()
		if ret != nvml.SUCCESS {
			return fmt.Errorf("gpu: DeviceGetUUID for GPU %d: %w", i, ret)
		}
		w.devs = append(w.devs, dev)
		w.uuids = append(w.uuids, uuid)

		types := uint64(nvml.EventTypeXidCriticalError)
		supported, ret := dev.GetSupportedEventTypes()
		switch {
		case ret == nvml.SUCCESS && supported&nvml.EventTypeXidCriticalError == 0:
			w.unwatched = append(w.unwatched, i)
			continue
		case ret == nvml.SUCCESS && supported&nvml.EventTypeDoubleBitEccError != 0:
			types |= nvml.EventTypeDoubleBitEccError
		case ret != nvml.SUCCESS && ret != nvml.ERROR_NOT_SUPPORTED:
			return fmt.Errorf("gpu: DeviceGetSupportedEventTypes for GPU %d: %w", i, ret)
		}
		switch ret := dev.RegisterEvents(types, w.set); ret {
		case nvml.SUCCESS:
		case nvml.ERROR_NOT_SUPPORTED:
			w.unwatched = append(w.unwatched, i)
		default:
			return fmt.Errorf("gpu: DeviceRegisterEvents for GPU %d: %w", i, ret)
		}
	}
	return nil
}

// Unwatched returns the indices of the GPUs that report no XID events
// (their driver does not support them); nil when every GPU is watched.
func (w *EventWatcher) Unwatched() []int { return w.unwatched }

// Next returns the next XID event, waiting up to timeout for one. It
// returns false and no error when none came in time, and ErrWatcherClosed
// once Close was called. Other errors come from NVML's Wait (for instance
// ERROR_GPU_IS_LOST) and leave the watcher usable.
func (w *EventWatcher) Next(timeout time.Duration) (XIDEvent, bool, error) {
	deadline := time.Now().Add(timeout)
	for {
		ev, ok, done, err := w.waitOnce(deadline)
		if ok || done || err != nil {
			return ev, ok, err
		}
	}
}

// waitOnce waits for one NVML event, at most waitSlice and not past
// deadline. done is true when the deadline passed with no event.
func (w *EventWatcher) waitOnce(deadline time.Time) (ev XIDEvent, ok, done bool, err error) {
	if w.closing.Load() {
		return XIDEvent{}, false, true, ErrWatcherClosed
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return XIDEvent{}, false, true, ErrWatcherClosed
	}
	left := time.Until(deadline)
	slice := min(max(left, 0), waitSlice)
	ms := uint32((slice + time.Millisecond - 1) / time.Millisecond)
	data, ret := w.set.Wait(ms)
	switch ret {
	case nvml.SUCCESS:
		ev, ok = w.convert(data)
		return ev, ok, false, nil
	case nvml.ERROR_TIMEOUT:
		return XIDEvent{}, false, left <= waitSlice, nil
	default:
		return XIDEvent{}, false, true, fmt.Errorf("gpu: EventSetWait: %w", ret)
	}
}

// convert turns NVML event data into an XIDEvent; false for an event that
// is not reported (another type, or the twin of a DBE already reported).
// Called with mu held.
func (w *EventWatcher) convert(data nvml.EventData) (XIDEvent, bool) {
	ev := XIDEvent{GPU: -1, Time: time.Now()}
	switch data.EventType {
	case nvml.EventTypeXidCriticalError:
		ev.XID = data.EventData
	case nvml.EventTypeDoubleBitEccError:
		ev.XID = xidDBE
	default:
		return XIDEvent{}, false
	}
	if i := w.index(data.Device); i >= 0 {
		ev.GPU, ev.UUID = i, w.uuids[i]
	}
	if ev.XID == xidDBE {
		last, seen := w.lastDBE[ev.GPU]
		if seen && last.eventType != data.EventType && ev.Time.Sub(last.at) < dbePairWindow {
			delete(w.lastDBE, ev.GPU) // the twin: report the pair once
			return XIDEvent{}, false
		}
		w.lastDBE[ev.GPU] = dbeSeen{eventType: data.EventType, at: ev.Time}
	}
	return ev, true
}

// index finds the GPU index of an event's device: by handle first, which
// needs no NVML call, then by asking NVML. -1 when unknown.
func (w *EventWatcher) index(dev nvml.Device) int {
	if dev == nil {
		return -1
	}
	for i, d := range w.devs {
		if d == dev {
			return i
		}
	}
	if uuid, ret := dev.GetUUID(); ret == nvml.SUCCESS {
		for i, u := range w.uuids {
			if u == uuid {
				return i
			}
		}
	}
	return -1
}

// Close stops the watcher and frees its NVML event set. It waits for a
// Next in progress to return (at most waitSlice); that Next, and every later
// one, returns ErrWatcherClosed. Closing twice is harmless.
func (w *EventWatcher) Close() error {
	w.closing.Store(true)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	w.closed = true
	if ret := w.set.Free(); ret != nvml.SUCCESS {
		return fmt.Errorf("gpu: EventSetFree: %w", ret)
	}
	return nil
}
