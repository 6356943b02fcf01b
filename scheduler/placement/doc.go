// Package placement decides which whole nodes each pending job gets. It is a
// pure function over an immutable Snapshot: no I/O, no clock, no locks, so
// every rule is a table test. The engine builds the snapshot, calls Place
// (caller's order) or Schedule (policy order: queues, fair share, quotas,
// aging, holding for a blocked gang), and commits the resulting Plan. See
// README.md for the pipeline.
package placement
