package gpu

import "testing"

func TestClassifyXID(t *testing.T) {
	cases := []struct {
		name string
		xid  uint64
		want Severity
	}{
		{"a double-bit ECC error is fatal", 48, SeverityFatal},
		{"a recorded row remapping is fatal until the GPU is reset", 63, SeverityFatal},
		{"a failed row remapping is fatal", 64, SeverityFatal},
		{"an NVLink error is fatal", 74, SeverityFatal},
		{"a GPU fallen off the bus is fatal", 79, SeverityFatal},
		{"a high single-bit ECC rate is fatal", 92, SeverityFatal},
		{"a contained ECC error is fatal", 94, SeverityFatal},
		{"an uncontained ECC error is fatal", 95, SeverityFatal},
		{"a GSP timeout is fatal", 119, SeverityFatal},
		{"a GSP error is fatal", 120, SeverityFatal},
		{"a graphics engine exception is the application's", 13, SeverityApplication},
		{"a GPU memory page fault is the application's", 31, SeverityApplication},
		{"a stopped GPU context is the application's", 43, SeverityApplication},
		{"a preemptive cleanup is the application's", 45, SeverityApplication},
		{"a video processor exception is the application's", 68, SeverityApplication},
		{"a graphics class error is the application's", 69, SeverityApplication},
		{"XID 0 is only information", 0, SeverityInfo},
		{"an XID absent from the table is only information", 61, SeverityInfo},
		{"a huge XID is only information", 1 << 40, SeverityInfo},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := ClassifyXID(c.xid); got != c.want {
				t.Fatalf("ClassifyXID(%d) = %v, want %v", c.xid, got, c.want)
			}
		})
	}
}

func TestSeverityString(t *testing.T) {
	cases := []struct {
		name string
		s    Severity
		want string
	}{
		{"info reads info", SeverityInfo, "info"},
		{"application reads application", SeverityApplication, "application"},
		{"fatal reads fatal", SeverityFatal, "fatal"},
		{"an undefined severity shows its number", Severity(7), "Severity(7)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := c.s.String(); got != c.want {
				t.Fatalf("String() = %q, want %q", got, c.want)
			}
		})
	}
}
