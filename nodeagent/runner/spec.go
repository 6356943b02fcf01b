package runner

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Spec says what to run and where its output goes.
type Spec struct {
	// Command is the program and its arguments. A program name without a
	// slash is looked up in the PATH of Env, not of the agent.
	Command []string
	// Env is the command's full environment as KEY=VALUE, used as-is: the
	// agent's own environment is never inherited, so nil means empty.
	Env []string
	// Dir is the working directory, created (0755) if missing. Empty means
	// the agent's working directory.
	Dir string
	// LogPath receives stdout and stderr, appended and interleaved. The file
	// and its parent directories are created if missing (0644 / 0755). Empty
	// discards the output.
	LogPath string
}

// defaultPath is searched when Env has no PATH, like a shell's fallback.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// lookPath resolves name against the PATH in env. Empty and relative PATH
// entries are skipped so a job cannot pick up a binary from its working
// directory by accident.
func lookPath(name string, env []string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil // relative paths resolve against Spec.Dir at exec
	}
	path := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v // the last one wins, as in os/exec's dedup
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" || !filepath.IsAbs(dir) {
			continue
		}
		cand := filepath.Join(dir, name)
		if fi, err := os.Stat(cand); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return cand, nil
		}
	}
	return "", fmt.Errorf("exec: %q: %w", name, exec.ErrNotFound)
}

// openLog opens the log for appending; O_APPEND keeps writes from the
// command and its children whole and in order.
func openLog(path string) (*os.File, error) {
	if path == "" {
		return nil, nil // os/exec then connects /dev/null
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	return os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
}
