package gpu

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Backend names, as accepted by Open and the agent's --gpu-backend flag.
const (
	// BackendNVML reads the real GPUs through the driver's libnvidia-ml.
	BackendNVML = "nvml"
	// BackendMockDGXA100 simulates a DGX A100: 8x A100-SXM4-40GB.
	BackendMockDGXA100 = "mock-dgxa100"
	// BackendMockDGXH100 simulates a DGX H100: 8x H100 80GB HBM3.
	BackendMockDGXH100 = "mock-dgxh100"
	// BackendMockDGXH200 simulates a DGX H200: 8x H200 141GB HBM3e.
	BackendMockDGXH200 = "mock-dgxh200"
	// BackendMockDGXB200 simulates a DGX B200: 8x B200 180GB HBM3e.
	BackendMockDGXB200 = "mock-dgxb200"
)

// ErrUnknownBackend is returned by Open and OpenMock for a backend name that
// is not one of Backends.
var ErrUnknownBackend = errors.New("gpu: unknown backend")

// ErrNVMLUnavailable is returned by Open("nvml") when NVML cannot be used on
// this machine: the library is missing, or it loads but fails to initialise
// (driver not loaded, no permission, ...).
var ErrNVMLUnavailable = errors.New("gpu: NVML unavailable")

// nvmlLibraryName is what go-nvml dlopens by default; named here only so the
// error message points the operator at the right file.
const nvmlLibraryName = "libnvidia-ml.so.1"

// Backends returns the valid backend names, real NVML first.
func Backends() []string {
	return []string{
		BackendNVML,
		BackendMockDGXA100,
		BackendMockDGXH100,
		BackendMockDGXH200,
		BackendMockDGXB200,
	}
}

// Backend is an opened, initialised GPU backend. Use NVML for every GPU call
// and Close it when done.
type Backend struct {
	// NVML is the initialised library: the real one or a simulated node.
	NVML nvml.Interface
	// Name is the backend name Open was given.
	Name string
	// Mock is the simulated node behind a mock backend, for fault and
	// workload injection; nil for the real NVML backend.
	Mock *Mock

	closeOnce sync.Once
	closeErr  error
}

// Open opens and initialises the named backend (see Backends). Mock backends
// get fresh, randomly named GPUs on every call; use OpenMock for stable ones.
func Open(name string) (*Backend, error) {
	if name == BackendNVML {
		return openNVML()
	}
	// Strict, unlike OpenMock: the flag accepts exactly what Backends lists.
	if _, ok := mockModels[name]; !ok {
		return nil, unknownBackend(name)
	}
	return OpenMock(name, MockOptions{})
}

// Close shuts the backend's NVML down. Closing twice is harmless and returns
// the first result, so a deferred Close may follow an explicit one.
func (b *Backend) Close() error {
	b.closeOnce.Do(func() {
		if ret := b.NVML.Shutdown(); ret != nvml.SUCCESS {
			b.closeErr = fmt.Errorf("gpu: shutting down %s backend: %w", b.Name, ret)
		}
	})
	return b.closeErr
}

// unknownBackend builds the ErrUnknownBackend error, listing the valid
// names so a typo in a flag is fixed from the message alone.
func unknownBackend(name string) error {
	return fmt.Errorf("%w %q (valid: %s)", ErrUnknownBackend, name, strings.Join(Backends(), ", "))
}

// openNVML loads and initialises the real library. opts exist so tests can
// point it at a missing library even on a machine that has the driver.
func openNVML(opts ...nvml.LibraryOption) (b *Backend, err error) {
	// go-nvml v0.13 reports a missing library as ERROR_LIBRARY_NOT_FOUND,
	// but it sits on cgo and dlopen; should a future version panic instead,
	// the agent must still print the hint below rather than a stack trace.
	defer func() {
		if r := recover(); r != nil {
			b, err = nil, fmt.Errorf("%w: loading %s panicked: %v; use --gpu-backend %s on machines without GPUs",
				ErrNVMLUnavailable, nvmlLibraryName, r, BackendMockDGXH100)
		}
	}()
	lib := nvml.New(opts...)
	switch ret := lib.Init(); ret {
	case nvml.SUCCESS:
		return &Backend{NVML: lib, Name: BackendNVML}, nil
	case nvml.ERROR_LIBRARY_NOT_FOUND:
		return nil, fmt.Errorf("%w: %s not found (%w): is the NVIDIA driver installed? use --gpu-backend %s on machines without GPUs",
			ErrNVMLUnavailable, nvmlLibraryName, ret, BackendMockDGXH100)
	default:
		return nil, fmt.Errorf("%w: initialising NVML: %w", ErrNVMLUnavailable, ret)
	}
}
