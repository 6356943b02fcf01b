package gpumodel

import (
	"errors"
	"testing"
)

func TestParse(t *testing.T) {
	cases := []struct {
		name, in, want string
		err            error
	}{
		{"canonical name is accepted", "H100", "H100", nil},
		{"lower case is canonicalised", "h100", "H100", nil},
		{"surrounding space is ignored", " a100 ", "A100", nil},
		{"a typo is rejected", "H1000", "", ErrUnknown},
		{"empty is rejected", "", "", ErrUnknown},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := Parse(c.in)
			if !errors.Is(err, c.err) || got != c.want {
				t.Fatalf("Parse(%q) = %q, %v; want %q, %v", c.in, got, err, c.want, c.err)
			}
		})
	}
}

func TestFromProductName(t *testing.T) {
	cases := []struct{ name, in, want string }{
		{"H100 SXM product name", "NVIDIA H100 80GB HBM3", "H100"},
		{"A100 dashed product name", "NVIDIA A100-SXM4-40GB", "A100"},
		{"H200 product name", "NVIDIA H200 141GB HBM3e", "H200"},
		{"B200 product name", "NVIDIA B200", "B200"},
		{"unknown hardware keeps its name", "NVIDIA Foo 9000", "Foo 9000"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := FromProductName(c.in); got != c.want {
				t.Fatalf("FromProductName(%q) = %q, want %q", c.in, got, c.want)
			}
		})
	}
}
