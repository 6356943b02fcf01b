package nodeagent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// heldLease is the agent's durable record of one lease until it is released.
type heldLease struct {
	ID      string `json:"id"`
	JobID   string `json:"job_id"`
	Rank    int    `json:"rank"`
	PGID    int    `json:"pgid,omitempty"`
	Started bool   `json:"started"`
	Exited  bool   `json:"exited"`
	Code    int    `json:"exit_code"`
	Signal  string `json:"signal,omitempty"`
	Message string `json:"message,omitempty"`
}

// persistentState is what the agent keeps in <data-dir>/state.json.
type persistentState struct {
	// MaxFencingToken is the highest leader token accepted; commands with a
	// lower token come from a deposed leader and are refused.
	MaxFencingToken int64                 `json:"max_fencing_token"`
	Leases          map[string]*heldLease `json:"leases"`
}

func statePath(dataDir string) string { return filepath.Join(dataDir, "state.json") }

// loadState reads the state file; a missing file is a fresh agent.
func loadState(dataDir string) (*persistentState, error) {
	st := &persistentState{Leases: map[string]*heldLease{}}
	b, err := os.ReadFile(statePath(dataDir))
	if errors.Is(err, os.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return nil, fmt.Errorf("nodeagent: read state: %w", err)
	}
	if err := json.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("nodeagent: corrupt state file %s: %w", statePath(dataDir), err)
	}
	if st.Leases == nil {
		st.Leases = map[string]*heldLease{}
	}
	return st, nil
}

// save writes the state atomically (write, fsync, rename).
func (st *persistentState) save(dataDir string) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := statePath(dataDir) + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("nodeagent: write state: %w", err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("nodeagent: write state: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("nodeagent: write state: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("nodeagent: write state: %w", err)
	}
	if err := os.Rename(tmp, statePath(dataDir)); err != nil {
		return fmt.Errorf("nodeagent: write state: %w", err)
	}
	return nil
}
