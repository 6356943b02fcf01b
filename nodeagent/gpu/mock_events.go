package gpu

import (
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// mockEventTypes are the NVML event types a simulated GPU supports.
const mockEventTypes = nvml.EventTypeSingleBitEccError | nvml.EventTypeDoubleBitEccError |
	nvml.EventTypeXidCriticalError

// mockEventQueueLen bounds the undelivered events of one simulated event
// set; past it the oldest are dropped, as a driver's queue would overflow.
const mockEventQueueLen = 1024

// mockEventSet is a simulated NVML event set: events the Mock raises on a
// GPU (InjectXID, InjectECCDoubleBit) are queued on every set registered
// for that type on that GPU, and Wait hands them out in order. go-nvml's
// moq EventSet underneath answers only the calls the agent does not make,
// with ERROR_NOT_SUPPORTED; Wait and Free are not recorded (see Mock).
type mockEventSet struct {
	*mock.EventSet
	m *Mock
	// ready holds a token when the queue may be non-empty or the set was
	// freed: a Wait blocked on an empty queue sleeps on it.
	ready chan struct{}

	// Guarded by m.mu.
	regs  map[int]uint64 // GPU index -> registered event types
	queue []nvml.EventData
	freed bool
}

var _ nvml.EventSet = (*mockEventSet)(nil)

// newEventSet creates an event set and makes it visible to emitLocked.
func (m *Mock) newEventSet() *mockEventSet {
	s := &mockEventSet{
		EventSet: &mock.EventSet{
			GetContextCount_v1Func: func() (nvml.GetContextCount_v1, nvml.Return) {
				return nvml.GetContextCount_v1{}, nvml.ERROR_NOT_SUPPORTED
			},
			GetContextData_v1Func: func(d nvml.GetContextData_v1) (nvml.GetContextData_v1, nvml.Return) {
				return d, nvml.ERROR_NOT_SUPPORTED
			},
			GetContextInfo_v1Func: func(uint32) (nvml.GetContextInfo_v1, nvml.Return) {
				return nvml.GetContextInfo_v1{}, nvml.ERROR_NOT_SUPPORTED
			},
			GetGpuOperationalEventContextLegacyXid_v1Func: func(uint32) (uint32, nvml.Return) {
				return 0, nvml.ERROR_NOT_SUPPORTED
			},
			RegisterGpuOperationalEvents_v1Func: func(*nvml.GpuOperationalEventConfig_v1) nvml.Return {
				return nvml.ERROR_NOT_SUPPORTED
			},
			Wait_v3Func: func(uint32) (nvml.EventSetWaitData_v3, nvml.Return) {
				return nvml.EventSetWaitData_v3{}, nvml.ERROR_NOT_SUPPORTED
			},
		},
		m:     m,
		ready: make(chan struct{}, 1),
		regs:  map[int]uint64{},
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.eventSets[s] = struct{}{}
	return s
}

// wake leaves a token on ready unless one is already there.
func (s *mockEventSet) wake() {
	select {
	case s.ready <- struct{}{}:
	default:
	}
}

// Wait returns the oldest queued event, waiting up to timeoutMs for one;
// ERROR_TIMEOUT when none came, as NVML does.
func (s *mockEventSet) Wait(timeoutMs uint32) (nvml.EventData, nvml.Return) {
	var timeout <-chan time.Time
	for {
		s.m.mu.Lock()
		if s.freed {
			s.m.mu.Unlock()
			return nvml.EventData{}, nvml.ERROR_UNINITIALIZED
		}
		if len(s.queue) > 0 {
			ev := s.queue[0]
			s.queue[0] = nvml.EventData{}
			s.queue = s.queue[1:]
			if len(s.queue) > 0 {
				s.wake() // for another waiter on the same set
			}
			s.m.mu.Unlock()
			return ev, nvml.SUCCESS
		}
		s.m.mu.Unlock()
		if timeoutMs == 0 {
			return nvml.EventData{}, nvml.ERROR_TIMEOUT
		}
		if timeout == nil {
			t := time.NewTimer(time.Duration(timeoutMs) * time.Millisecond)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-s.ready:
		case <-timeout:
			return nvml.EventData{}, nvml.ERROR_TIMEOUT
		}
	}
}

// Free releases the set; a Wait blocked on it returns ERROR_UNINITIALIZED.
func (s *mockEventSet) Free() nvml.Return {
	s.m.mu.Lock()
	defer s.m.mu.Unlock()
	if s.freed {
		return nvml.ERROR_UNINITIALIZED
	}
	s.freed = true
	s.queue = nil
	delete(s.m.eventSets, s)
	s.wake()
	return nvml.SUCCESS
}

// GetSupportedEventTypes reports ECC and critical XID events.
func (d *mockDevice) GetSupportedEventTypes() (uint64, nvml.Return) {
	return mockEventTypes, nvml.SUCCESS
}

// RegisterEvents adds event types of this GPU to a set made by the same
// Mock's EventSetCreate. Like NVML it refuses types the GPU does not
// support, and sets from elsewhere.
func (d *mockDevice) RegisterEvents(types uint64, set nvml.EventSet) nvml.Return {
	s, ok := set.(*mockEventSet)
	if !ok || s.m != d.m {
		return nvml.ERROR_INVALID_ARGUMENT
	}
	if types&^uint64(mockEventTypes) != 0 {
		return nvml.ERROR_NOT_SUPPORTED
	}
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	if s.freed {
		return nvml.ERROR_INVALID_ARGUMENT
	}
	s.regs[d.i] |= types
	return nvml.SUCCESS
}

// emitLocked raises an event on GPU gpu: every set registered for its type
// there queues it. Called with mu held.
func (m *Mock) emitLocked(gpu int, eventType, data uint64) {
	ev := nvml.EventData{
		Device:            m.devs[gpu],
		EventType:         eventType,
		EventData:         data,
		GpuInstanceId:     noMIG,
		ComputeInstanceId: noMIG,
	}
	for s := range m.eventSets {
		if s.regs[gpu]&eventType == 0 {
			continue
		}
		if len(s.queue) >= mockEventQueueLen {
			s.queue[0] = nvml.EventData{}
			s.queue = s.queue[1:]
		}
		s.queue = append(s.queue, ev)
		s.wake()
	}
}
