package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/gpusched/gpusched/client"
)

func TestLinePrefixer(t *testing.T) {
	cases := []struct {
		name   string
		chunks [][2]string // node, data
		want   string
	}{
		{"whole lines are prefixed by their node", [][2]string{{"a", "x\ny\n"}, {"b", "z\n"}}, "a| x\na| y\nb| z\n"},
		{"a line split across chunks is joined", [][2]string{{"a", "hel"}, {"a", "lo\n"}}, "a| hello\n"},
		{"a last line without newline is still printed", [][2]string{{"a", "x"}, {"b", "y"}}, "a| x\nb| y\n"},
		{"no output prints nothing", nil, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var buf bytes.Buffer
			p := &linePrefixer{w: &buf}
			for _, ch := range c.chunks {
				if err := p.write(ch[0], []byte(ch[1])); err != nil {
					t.Fatal(err)
				}
			}
			if err := p.flush(); err != nil {
				t.Fatal(err)
			}
			if buf.String() != c.want {
				t.Errorf("got %q, want %q", buf.String(), c.want)
			}
		})
	}
}

func TestShellQuote(t *testing.T) {
	got := shellQuote([]string{"sh", "-c", "echo $X 'q'", ""})
	want := `sh -c 'echo $X '\''q'\''' ''`
	if got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}

func TestExitCode(t *testing.T) {
	cases := []struct {
		name string
		err  error
		want int
	}{
		{"success is 0", nil, exitOK},
		{"a server-side invalid request is 2", &client.Error{Message: "spec.nodes: bad", Code: 3}, exitUsage},
		{"a CLI usage error is 2", usageError("bad flag"), exitUsage},
		{"a failed job is 3", &codedError{code: exitFailed}, exitFailed},
		{"any other error is 1", errors.New("connection refused"), exitError},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := exitCode(c.err); got != c.want {
				t.Errorf("exitCode(%v) = %d, want %d", c.err, got, c.want)
			}
		})
	}
}

func TestConfigPrecedence(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", dir)
	if err := os.MkdirAll(filepath.Join(dir, "gpusched"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "gpusched", "config.yaml"), []byte("server: file:1\ntoken: t\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	fc, err := loadFileConfig()
	if err != nil || fc.Server != "file:1" {
		t.Fatalf("config = %+v, %v", fc, err)
	}
	cases := []struct{ name, flag, env, want string }{
		{"a flag beats the environment and the file", "flag:1", "env:1", "flag:1"},
		{"the environment beats the file", "", "env:1", "env:1"},
		{"the file is the fallback", "", "", "file:1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := resolve(c.flag, c.env, fc.Server); got != c.want {
				t.Errorf("resolve = %q; want %q", got, c.want)
			}
		})
	}
	if err := os.WriteFile(filepath.Join(dir, "gpusched", "config.yaml"), []byte("srever: typo\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadFileConfig(); err == nil {
		t.Error("a misspelt key was accepted")
	}
}
