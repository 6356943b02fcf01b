package gpu

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

func TestBackendsListsNVMLAndEveryMock(t *testing.T) {
	want := []string{"nvml", "mock-dgxa100", "mock-dgxh100", "mock-dgxh200", "mock-dgxb200"}
	if got := Backends(); !slices.Equal(got, want) {
		t.Fatalf("Backends() = %v, want %v", got, want)
	}
}

func TestOpenUnknownBackendFails(t *testing.T) {
	cases := []struct{ name, backend string }{
		{"an empty name is unknown", ""},
		{"a made-up name is unknown", "cuda"},
		{"a DGX model that is not simulated is unknown", "mock-dgxh300"},
		{"names are case-sensitive", "NVML"},
		{"a bare model needs its mock- prefix", "dgxh100"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b, err := Open(c.backend)
			if !errors.Is(err, ErrUnknownBackend) {
				t.Fatalf("Open(%q) = %v, %v; want ErrUnknownBackend", c.backend, b, err)
			}
			for _, valid := range Backends() {
				if !strings.Contains(err.Error(), valid) {
					t.Errorf("error %q does not list valid backend %q", err, valid)
				}
			}
		})
	}
}

func TestOpenNVMLWithoutLibraryFailsWithHint(t *testing.T) {
	// Point go-nvml at a library that cannot exist, so the test means the
	// same on machines with and without the NVIDIA driver.
	b, err := openNVML(nvml.WithLibraryPath("/nonexistent/libnvidia-ml.so.1"))
	if !errors.Is(err, ErrNVMLUnavailable) || !errors.Is(err, nvml.ERROR_LIBRARY_NOT_FOUND) {
		t.Fatalf("openNVML(missing) = %v, %v; want ErrNVMLUnavailable and ERROR_LIBRARY_NOT_FOUND", b, err)
	}
	for _, hint := range []string{"libnvidia-ml.so.1 not found", "is the NVIDIA driver installed?", "--gpu-backend mock-dgxh100"} {
		if !strings.Contains(err.Error(), hint) {
			t.Errorf("error %q lacks %q", err, hint)
		}
	}
}

func TestOpenNVMLFailsCleanlyOrReadsRealGPUs(t *testing.T) {
	b, err := Open(BackendNVML)
	if err != nil {
		if !errors.Is(err, ErrNVMLUnavailable) {
			t.Fatalf("Open(nvml) = %v; want ErrNVMLUnavailable on a machine without usable NVML", err)
		}
		t.Logf("no usable NVML here, as expected on a GPU-less machine: %v", err)
		return
	}
	// A machine with the driver: the real library must read like a mock.
	defer func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}()
	inv, err := ReadInventory(b.NVML)
	if err != nil {
		t.Fatalf("ReadInventory(real NVML): %v", err)
	}
	t.Logf("real inventory: %+v", inv)
	if _, err := ListGPUProcesses(b.NVML); err != nil {
		t.Fatalf("ListGPUProcesses(real NVML): %v", err)
	}
}

func TestCloseTwiceIsHarmless(t *testing.T) {
	b, err := Open(BackendMockDGXH100)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("first Close: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
