package gpu

import (
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// mustOpen opens a backend and closes it when the test ends.
func mustOpen(t *testing.T, name string) *Backend {
	t.Helper()
	b, err := Open(name)
	if err != nil {
		t.Fatalf("Open(%q): %v", name, err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close(%q): %v", name, err)
		}
	})
	return b
}
