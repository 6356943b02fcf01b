package gpu

import (
	"math"
	"time"
)

// Simulated dynamics of a mock GPU.
//
// A GPU is busy while at least one process is registered on it
// (SetProcesses) and idle otherwise. Each telemetry quantity moves from
// where it stood when the GPU last changed state toward the level of its
// new state along a first-order curve,
//
//	v(t) = target + (v0 - target) * exp(-(t - t0) / tau),
//
// and lands exactly on the target once t - t0 reaches settleTaus time
// constants, so an idle GPU reads exactly its baseline again (cleanup
// compares against it). Everything is a function of the Mock's clock
// (MockOptions.Now), with no randomness: tests advance a fake clock and
// get the same numbers every run. Busy levels wobble a little, by GPU
// index and time, so a chart of a simulated job does not look flat.
//
// Time constants: utilization reacts within a second or two, as NVML's
// sampling window does; framebuffer use grows over seconds as a job
// allocates, and is freed at once when the processes go (as the driver
// does on process exit, so cleanup never waits on the simulation); power
// follows the load within seconds; temperature rises and falls over tens of
// seconds, as a heat sink does.

// idleFBUsedBytes is what an idle simulated GPU reports as used: the
// driver's reservation, roughly what real GPUs show with nothing running.
const idleFBUsedBytes = 500 << 20

// busyFBBytes is what a simulated job allocates on each GPU it uses, on top
// of the idle baseline.
const busyFBBytes = 6 << 30

// settleTaus is how many time constants a curve takes to land exactly on
// its target (exp(-6) < 0.25%).
const settleTaus = 6

// levels is one GPU's telemetry, unrounded.
type levels struct {
	gpuUtil, memUtil float64 // percent
	fbUsed           float64 // bytes
	powerMW          float64
	tempC            float64
}

// taus are the time constants of each quantity, for one direction.
type taus struct {
	gpuUtil, memUtil, fbUsed, power, temp time.Duration
}

var (
	riseTaus = taus{gpuUtil: time.Second, memUtil: 2 * time.Second, fbUsed: 5 * time.Second,
		power: 2 * time.Second, temp: 20 * time.Second}
	fallTaus = taus{gpuUtil: time.Second / 2, memUtil: time.Second / 2, fbUsed: 0,
		power: time.Second, temp: 30 * time.Second}
)

// simGPU is the changeable state of one simulated GPU, guarded by Mock.mu.
type simGPU struct {
	computePIDs []uint32

	// busy is whether processes run; since is when it last changed, and
	// from the levels at that moment.
	busy  bool
	since time.Time
	from  levels

	// Faults (faults.go).
	faults                    []Fault
	eccSBE, eccDBE            uint64
	remapCorr, remapUnc       int
	remapPending, remapFailed bool
}

// IdleFBUsedBytes is the framebuffer memory every simulated GPU reports as
// used when nothing runs on it (500 MiB on every model). A GPU whose
// processes are gone reads exactly this, so cleanup can compare against it.
func (m *Mock) IdleFBUsedBytes() uint64 { return idleFBUsedBytes }

// idleGPU returns a GPU that has been idle since at.
func (m *Mock) idleGPU(at time.Time) simGPU {
	return simGPU{since: at, from: m.target(0, false, at)}
}

// target is the level GPU i tends to in the given state at time now.
func (m *Mock) target(i int, busy bool, now time.Time) levels {
	if !busy {
		return levels{
			fbUsed:  idleFBUsedBytes,
			powerMW: float64(m.spec.idlePowerMW),
			tempC:   float64(m.spec.idleTempC),
		}
	}
	t := now.Sub(m.epoch).Seconds()
	wobble := func(period float64) float64 { return math.Sin(2*math.Pi*t/period + float64(i)) }
	return levels{
		gpuUtil: 93 + 6*wobble(11), // 87..99 %
		memUtil: 50 + 8*wobble(13), // 42..58 %
		fbUsed:  idleFBUsedBytes + busyFBBytes,
		powerMW: float64(m.spec.busyPowerMW) * (1 + 0.03*wobble(7)),
		tempC:   float64(m.spec.busyTempC) - float64(i%3),
	}
}

// levelsLocked is GPU i's telemetry at time now. Called with mu held.
func (m *Mock) levelsLocked(i int, now time.Time) levels {
	g := &m.gpus[i]
	to := m.target(i, g.busy, now)
	tau := fallTaus
	if g.busy {
		tau = riseTaus
	}
	dt := max(now.Sub(g.since), 0)
	return levels{
		gpuUtil: approach(g.from.gpuUtil, to.gpuUtil, dt, tau.gpuUtil),
		memUtil: approach(g.from.memUtil, to.memUtil, dt, tau.memUtil),
		fbUsed:  approach(g.from.fbUsed, to.fbUsed, dt, tau.fbUsed),
		powerMW: approach(g.from.powerMW, to.powerMW, dt, tau.power),
		tempC:   approach(g.from.tempC, to.tempC, dt, tau.temp),
	}
}

// levelsNow is GPU i's telemetry now.
func (m *Mock) levelsNow(i int) levels {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.levelsLocked(i, m.now())
}

// busy reports whether GPU i runs processes.
func (m *Mock) busy(i int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gpus[i].busy
}

// setBusyLocked switches GPU i between busy and idle, starting its curves
// from where they stand now. Called with mu held.
func (m *Mock) setBusyLocked(i int, busy bool) {
	g := &m.gpus[i]
	if g.busy == busy {
		return
	}
	now := m.now()
	g.from = m.levelsLocked(i, now)
	g.since = now
	g.busy = busy
}

// approach moves from v0 toward target over dt with time constant tau,
// landing exactly on target after settleTaus time constants (at once for a
// zero tau).
func approach(v0, target float64, dt, tau time.Duration) float64 {
	if tau <= 0 || dt >= settleTaus*tau {
		return target
	}
	return target + (v0-target)*math.Exp(-float64(dt)/float64(tau))
}

// roundU32 rounds a non-negative level to NVML's unsigned integers.
func roundU32(v float64) uint32 {
	return uint32(math.Round(max(v, 0)))
}
