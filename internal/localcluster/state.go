package localcluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// State is the content of <Dir>/cluster.json: what another invocation needs
// to find, stop or restart the processes of a cluster.
type State struct {
	// Binary is the absolute path of the gpusched binary.
	Binary string `json:"binary"`
	// Prefix is the schedulers' etcd key prefix.
	Prefix string `json:"prefix"`
	// StartTimeout bounds WaitReady.
	StartTimeout Duration `json:"start_timeout"`
	// EtcdEndpoints are the etcd client URLs.
	EtcdEndpoints []string `json:"etcd_endpoints"`
	// SchedulerAddrs are the schedulers' host:port addresses.
	SchedulerAddrs []string `json:"scheduler_addrs"`
	// Servers is SchedulerAddrs comma-joined, for GPUSCHED_SERVER.
	Servers string `json:"servers"`
	// Processes lists every process, etcd members first, then schedulers,
	// then agents.
	Processes []ProcessState `json:"processes"`
}

// ProcessState describes one process in [State].
type ProcessState struct {
	Name string `json:"name"`
	Kind string `json:"kind"`
	// PID of the latest start; also its process group ID.
	PID int `json:"pid"`
	// Args is the command line after the binary.
	Args []string `json:"args"`
	// Addr is the etcd client URL or scheduler host:port; empty for agents.
	Addr string `json:"addr,omitempty"`
	// Log is the path of the process's log.
	Log string `json:"log"`
}

// Duration is a time.Duration that reads and writes as a string ("60s").
type Duration time.Duration

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	*d = Duration(v)
	return err
}

// State returns the cluster's current state, as saved in cluster.json.
func (c *Cluster) State() State {
	st := State{
		Binary: c.binary, Prefix: c.prefix, StartTimeout: Duration(c.timeout),
		EtcdEndpoints: c.EtcdEndpoints(), SchedulerAddrs: c.SchedulerAddrs(), Servers: c.Servers(),
	}
	for _, p := range c.procs {
		st.Processes = append(st.Processes, ProcessState{
			Name: p.name, Kind: p.kind, PID: p.PID(), Args: p.Args(), Addr: p.addr, Log: p.logPath,
		})
	}
	return st
}

// saveState writes cluster.json atomically.
func (c *Cluster) saveState() error {
	c.stateMu.Lock()
	defer c.stateMu.Unlock()
	b, err := json.MarshalIndent(c.State(), "", "  ")
	if err != nil {
		return fmt.Errorf("localcluster: %w", err)
	}
	path := filepath.Join(c.dir, StateFile)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("localcluster: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("localcluster: %w", err)
	}
	return nil
}

// ReadState reads <dir>/cluster.json. It returns ErrNoCluster if there is
// none.
func ReadState(dir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s has no %s", ErrNoCluster, dir, StateFile)
	}
	if err != nil {
		return nil, fmt.Errorf("localcluster: %w", err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("localcluster: %s: %w", filepath.Join(dir, StateFile), err)
	}
	return &st, nil
}

// Attach returns the cluster recorded in <dir>/cluster.json, typically
// started by another invocation. Its processes can be inspected, signalled,
// stopped and restarted like those of a cluster from Start. A process is
// taken to run only while its PID runs the recorded command line, so a
// recycled PID is never signalled.
func Attach(dir string) (*Cluster, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("localcluster: %w", err)
	}
	st, err := ReadState(dir)
	if err != nil {
		return nil, err
	}
	return fromState(st, dir)
}

func fromState(st *State, dir string) (*Cluster, error) {
	if st.Binary == "" {
		return nil, fmt.Errorf("localcluster: %s: no binary recorded", filepath.Join(dir, StateFile))
	}
	c := &Cluster{
		binary: st.Binary, dir: dir, prefix: st.Prefix, timeout: time.Duration(st.StartTimeout),
		etcdEps: st.EtcdEndpoints, schedAddr: st.SchedulerAddrs,
	}
	if c.prefix == "" {
		c.prefix = DefaultPrefix
	}
	if c.timeout <= 0 {
		c.timeout = DefaultStartTimeout
	}
	for _, ps := range st.Processes {
		p := c.add(ps.Name, ps.Kind, ps.Addr, ps.Args)
		p.pid = ps.PID
		if ps.Log != "" {
			p.logPath = ps.Log
		}
	}
	return c, nil
}
