package model

import "time"

// NodeState is the scheduler's view of one GPU machine.
type NodeState int

// Node states; see the NodeState enum in proto/gpusched/v1/node.proto.
const (
	NodeReady NodeState = iota + 1
	NodeLeased
	NodeCleaning
	NodeDraining
	NodeDrained
	NodeUnhealthy
	NodeLost
)

var nodeStateNames = map[NodeState]string{
	NodeReady: "READY", NodeLeased: "LEASED", NodeCleaning: "CLEANING",
	NodeDraining: "DRAINING", NodeDrained: "DRAINED", NodeUnhealthy: "UNHEALTHY",
	NodeLost: "LOST",
}

// String returns the state's API name, e.g. "READY".
func (s NodeState) String() string {
	if n, ok := nodeStateNames[s]; ok {
		return n
	}
	return "UNKNOWN"
}

// GPU is one GPU of a node.
type GPU struct {
	Index       int
	UUID        string
	Name        string
	MemoryBytes uint64
	PCIBusID    string
}

// Inventory is a node's hardware as its agent read it through NVML.
type Inventory struct {
	GPUModel       string
	GPUCount       int
	GPUMemoryBytes uint64
	GPUs           []GPU
	DriverVersion  string
	CUDAVersion    string
	Hostname       string
}

// Node is one whole GPU machine.
type Node struct {
	ID           string
	Inventory    Inventory
	State        NodeState
	Labels       map[string]string
	LeaseID      string
	JobID        string
	Address      string
	RegisterTime time.Time
	Reason       string
	// Drain is the operator's wish that the node take no new lease.
	Drain       bool
	DrainReason string
	// Events are the node's recent events, oldest first.
	Events []NodeEvent
	// OperatorLabels override Labels (the agent's) key by key.
	OperatorLabels map[string]string
	// Connected is in-memory only: whether the agent's stream is up now.
	Connected bool
}

// Clone returns a deep copy.
func (n *Node) Clone() *Node {
	c := *n
	c.Inventory.GPUs = append([]GPU(nil), n.Inventory.GPUs...)
	c.Events = append([]NodeEvent(nil), n.Events...)
	c.OperatorLabels = cloneMap(n.OperatorLabels)
	if n.Labels != nil {
		c.Labels = make(map[string]string, len(n.Labels))
		for k, v := range n.Labels {
			c.Labels[k] = v
		}
	}
	return &c
}

// EffectiveLabels merges the agent's labels with the operator's, which win.
func (n *Node) EffectiveLabels() map[string]string {
	if len(n.OperatorLabels) == 0 {
		return n.Labels
	}
	out := make(map[string]string, len(n.Labels)+len(n.OperatorLabels))
	for k, v := range n.Labels {
		out[k] = v
	}
	for k, v := range n.OperatorLabels {
		out[k] = v
	}
	return out
}

func cloneMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
