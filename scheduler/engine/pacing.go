package engine

import "time"

// cyclePacer paces the placement cycles that only new submissions ask for.
//
// A cycle costs time in proportion to the pending queue (every pending job
// is ordered and tried). Run after every submit, a deep queue would make
// each submit pay for a whole cycle, and a burst of submits would keep the
// loop busy placing nothing. So a submission-only cycle waits until as
// much time has passed since the last cycle as that cycle took: the loop
// spends at most about half its time placing, submits are answered at
// commit speed, and with a short queue (a cycle of microseconds) nothing
// waits at all. Events that free or change capacity (a lease ending, a
// node joining, a policy change) still schedule at once.
type cyclePacer struct {
	next  time.Time // earliest start of the next submission-only cycle
	timer *time.Timer
}

func newCyclePacer() cyclePacer {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return cyclePacer{timer: t}
}

// due reports whether a submission-only cycle may run now.
func (p *cyclePacer) due(now time.Time) bool { return !now.Before(p.next) }

// ran records a cycle that ran from start to end.
func (p *cyclePacer) ran(start, end time.Time) {
	p.next = end.Add(end.Sub(start))
	p.timer.Stop()
}

// arm makes C fire when the deferred cycle becomes due.
func (p *cyclePacer) arm(now time.Time) { p.timer.Reset(max(p.next.Sub(now), 0)) }

// C fires when a deferred cycle is due.
func (p *cyclePacer) C() <-chan time.Time { return p.timer.C }
