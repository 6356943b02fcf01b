// Command localcluster starts, inspects and stops a local gpusched cluster
// (etcd members, scheduler replicas and agents as separate processes on
// loopback) for scripts/cluster.sh. The cluster outlives this command:
// `up` starts it and exits, `down` stops what <dir>/cluster.json lists.
//
//	go run ./scripts/localcluster up --binary bin/gpusched --dir /tmp/gpusched-cluster [--agents 4] ...
//	go run ./scripts/localcluster status --dir /tmp/gpusched-cluster
//	go run ./scripts/localcluster down --dir /tmp/gpusched-cluster
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/gpusched/gpusched/internal/localcluster"
)

const usage = `usage: localcluster up|down|status [flags]

  up      start a cluster in --dir and print the GPUSCHED_SERVER export line
  down    stop every process of the cluster in --dir
  status  show each process, then 'gpusched status' of the cluster

Run 'localcluster COMMAND -h' for the flags of a command.
`

// errUsage marks bad command-line input (exit 2).
var errUsage = errors.New("usage")

func main() {
	err := run(os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		os.Exit(2)
	default:
		msg := err.Error()
		if !strings.HasPrefix(msg, "localcluster:") { // the package's errors carry it
			msg = "localcluster: " + msg
		}
		fmt.Fprintln(os.Stderr, msg)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errUsage
	}
	switch args[0] {
	case "up":
		return up(args[1:], stdout, stderr)
	case "down":
		return down(args[1:], stdout, stderr)
	case "status":
		return status(args[1:], stdout, stderr)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprintf(stderr, "localcluster: unknown command %q\n%s", args[0], usage)
		return errUsage
	}
}

// parse parses fs, printing usage errors to stderr.
func parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "localcluster %s: unexpected arguments %q\n", fs.Name(), fs.Args())
		fs.Usage()
		return errUsage
	}
	return nil
}

func up(args []string, stdout, stderr io.Writer) error {
	var cfg localcluster.Config
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	fs.StringVar(&cfg.Binary, "binary", "bin/gpusched", "gpusched binary every process runs")
	fs.StringVar(&cfg.Dir, "dir", "", "directory for data, logs and cluster.json (required)")
	fs.IntVar(&cfg.Etcd, "etcd", localcluster.DefaultEtcd, "etcd members")
	fs.IntVar(&cfg.Schedulers, "schedulers", localcluster.DefaultSchedulers, "scheduler replicas")
	fs.IntVar(&cfg.Agents, "agents", localcluster.DefaultAgents, "node agents (simulated GPU nodes)")
	fs.StringVar(&cfg.GPUBackend, "gpu-backend", localcluster.DefaultGPUBackend, "agents' GPU backend: mock-dgxa100, mock-dgxh100, mock-dgxh200, mock-dgxb200")
	fs.DurationVar(&cfg.SessionTTL, "session-ttl", 0, "schedulers' --session-ttl (default: the scheduler's)")
	fs.DurationVar(&cfg.NodeLostAfter, "node-lost-after", 0, "schedulers' --node-lost-after (default: the scheduler's)")
	fs.DurationVar(&cfg.KillGrace, "kill-grace", 0, "schedulers' --kill-grace (default: the scheduler's)")
	fs.BoolVar(&cfg.EtcdNoFsync, "etcd-no-fsync", false, "run etcd with --unsafe-no-fsync")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if cfg.Dir == "" {
		fmt.Fprintln(stderr, "localcluster up: --dir is required")
		return errUsage
	}
	if cfg.Etcd < 1 || cfg.Schedulers < 0 || cfg.Agents < 0 {
		fmt.Fprintln(stderr, "localcluster up: --etcd must be at least 1, --schedulers and --agents at least 0")
		return errUsage
	}
	// 0 means none here; in localcluster.Config it means the default.
	for _, n := range []*int{&cfg.Schedulers, &cfg.Agents} {
		if *n == 0 {
			*n = -1
		}
	}
	// Ctrl-C during start-up stops what was started; once up, the cluster
	// runs on without us.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Fprintf(stderr, "starting %d etcd members, %d schedulers and %d agents in %s ...\n", cfg.Etcd, max(cfg.Schedulers, 0), max(cfg.Agents, 0), cfg.Dir)
	c, err := localcluster.Start(ctx, cfg)
	if err != nil {
		return err
	}
	printProcesses(stdout, c)
	fmt.Fprintf(stdout, "\netcd:      %s\n", strings.Join(c.EtcdEndpoints(), ","))
	fmt.Fprintf(stdout, "logs:      %s/logs\n", c.Dir())
	fmt.Fprintf(stdout, "stop with: scripts/cluster.sh down --dir %s\n\n", c.Dir())
	fmt.Fprintf(stdout, "export GPUSCHED_SERVER=%s\n", c.Servers())
	return nil
}

func down(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("down", flag.ContinueOnError)
	dir := fs.String("dir", "", "directory of the cluster (required)")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if *dir == "" {
		fmt.Fprintln(stderr, "localcluster down: --dir is required")
		return errUsage
	}
	c, err := localcluster.Attach(*dir)
	if errors.Is(err, localcluster.ErrNoCluster) {
		fmt.Fprintf(stdout, "no cluster in %s\n", *dir)
		return nil
	}
	if err != nil {
		return err
	}
	var running int
	for _, p := range c.Processes() {
		if p.Running() {
			running++
		}
	}
	err = c.Close()
	fmt.Fprintf(stdout, "stopped %d processes of the cluster in %s\n", running, c.Dir())
	return err
}

func status(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	dir := fs.String("dir", "", "directory of the cluster (required)")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if *dir == "" {
		fmt.Fprintln(stderr, "localcluster status: --dir is required")
		return errUsage
	}
	c, err := localcluster.Attach(*dir)
	if err != nil {
		return err
	}
	printProcesses(stdout, c)
	fmt.Fprintf(stdout, "\nexport GPUSCHED_SERVER=%s\n\n", c.Servers())
	up := false
	for _, p := range c.Processes() {
		up = up || (p.Kind() == localcluster.KindScheduler && p.Running())
	}
	if !up {
		fmt.Fprintln(stdout, "no scheduler runs")
		return nil
	}
	// `gpusched status` (replicas, leader, fencing token) is optional: an
	// older binary lacks it. Its failure is shown, not returned.
	cmd := exec.Command(c.Binary(), "status", "--server", c.Servers())
	out, err := cmd.CombinedOutput()
	switch {
	case err != nil && strings.Contains(string(out), `unknown command "status"`):
		fmt.Fprintf(stdout, "(%s has no 'status' command yet)\n", c.Binary())
	case err != nil:
		fmt.Fprintf(stdout, "%s(%s status: %v)\n", out, c.Binary(), err)
	default:
		stdout.Write(out)
	}
	return nil
}

func printProcesses(w io.Writer, c *localcluster.Cluster) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tPID\tSTATE\tADDRESS\tLOG")
	for _, p := range c.Processes() {
		state := "stopped"
		if p.Running() {
			state = "running"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", p.Name(), p.PID(), state, orDash(p.Addr()), p.LogPath())
	}
	tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
