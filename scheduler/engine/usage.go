package engine

// hold records that an active lease holds node n, and counts the node in
// its tenant's usage. Usage is kept as leases come and go, not counted
// per cycle: at 10,000 nodes the count was the cycle's largest cost.
//
// The node is counted under the GPU model it had when held, and uncounted
// under the same one, so an inventory change mid-lease cannot skew it.
func (e *Engine) hold(n *nodeEntry, lease, tenant string) {
	if n.lease != "" {
		e.unhold(n)
	}
	n.lease, n.tenant, n.heldModel = lease, tenant, n.node.Inventory.GPUModel
	u := e.usage[tenant]
	if u.PerModel == nil {
		u.PerModel = map[string]int{}
	}
	u.Nodes++
	u.PerModel[n.heldModel]++
	e.usage[tenant] = u
}

// unhold clears node n's active lease and uncounts it. A tenant holding
// nothing has no entry, as if it had never held a node.
func (e *Engine) unhold(n *nodeEntry) {
	if n.lease == "" {
		return
	}
	u := e.usage[n.tenant]
	u.Nodes--
	if u.PerModel[n.heldModel]--; u.PerModel[n.heldModel] <= 0 {
		delete(u.PerModel, n.heldModel)
	}
	if u.Nodes <= 0 {
		delete(e.usage, n.tenant)
	} else {
		e.usage[n.tenant] = u
	}
	n.lease, n.tenant, n.heldModel = "", "", ""
}
