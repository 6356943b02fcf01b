package runner

import (
	"bytes"
	"os"
	"strconv"
	"syscall"
)

// GroupAlive reports whether process group pgid has a live member. Zombies do
// not count: they hold no memory, GPUs or files, only a PID until their
// parent (often init, which may reap lazily) collects them. Without /proc it
// falls back to kill(-pgid, 0), where only ESRCH means gone.
func GroupAlive(pgid int) bool {
	if pgid <= 0 {
		return false // kill(0) or kill(1) would mean something else entirely
	}
	if err := syscall.Kill(-pgid, 0); err == syscall.ESRCH {
		return false
	}
	live, ok := liveMemberInProc(pgid)
	if !ok {
		return true
	}
	return live
}

// liveMemberInProc scans /proc for a non-zombie process in group pgid. ok is
// false when /proc cannot be read.
func liveMemberInProc(pgid int) (live, ok bool) {
	d, err := os.Open("/proc")
	if err != nil {
		return false, false
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return false, false
	}
	for _, name := range names {
		if name[0] < '0' || name[0] > '9' {
			continue
		}
		state, pg, ok := readStat(name)
		if !ok || pg != pgid {
			continue // gone since the listing, or another group
		}
		if state != 'Z' && state != 'X' {
			return true, true
		}
		// A zombie leader whose other threads still run is a live process.
		if tasks, err := os.ReadDir("/proc/" + name + "/task"); err == nil && len(tasks) > 1 {
			return true, true
		}
	}
	return false, true
}

// readStat returns the state and process group from /proc/<pid>/stat. The
// command name may contain spaces and parentheses, so fields are counted
// from the last ')'.
func readStat(pid string) (state byte, pgrp int, ok bool) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, 0, false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := bytes.Fields(b[i+1:]) // state ppid pgrp ...
	if len(f) < 3 || len(f[0]) != 1 {
		return 0, 0, false
	}
	pg, err := strconv.Atoi(string(f[2]))
	if err != nil {
		return 0, 0, false
	}
	return f[0][0], pg, true
}
