package runner

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Exit is how the command's main process ended.
type Exit struct {
	// Code is the exit status, or -1 if the process was killed by a signal.
	Code int
	// Signal names the killing signal ("SIGTERM"), or is empty.
	Signal string
	// Message is a human summary: "exit status 3", "killed by SIGKILL".
	Message string
}

// exitFrom turns cmd.Wait's result into an Exit.
func exitFrom(state *os.ProcessState, err error) Exit {
	if state == nil {
		return Exit{Code: -1, Message: fmt.Sprintf("runner: wait failed: %v", err)}
	}
	if ws, ok := state.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		name := unix.SignalName(ws.Signal())
		if name == "" {
			name = ws.Signal().String()
		}
		msg := "killed by " + name
		if ws.CoreDump() {
			msg += " (core dumped)"
		}
		return Exit{Code: -1, Signal: name, Message: msg}
	}
	code := state.ExitCode()
	return Exit{Code: code, Message: fmt.Sprintf("exit status %d", code)}
}
