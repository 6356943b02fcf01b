package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/gpusched/gpusched/client"
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// dial builds a client from --server/--token, else GPUSCHED_SERVER and
// GPUSCHED_TOKEN, else the config file.
func dial(cmd *cobra.Command) (*client.Client, error) {
	serverFlag, _ := cmd.Flags().GetString("server")
	tokenFlag, _ := cmd.Flags().GetString("token")
	server := resolve(serverFlag, os.Getenv("GPUSCHED_SERVER"), "")
	token := resolve(tokenFlag, os.Getenv("GPUSCHED_TOKEN"), "")
	if server == "" || token == "" {
		fc, err := loadFileConfig()
		if err != nil {
			return nil, err
		}
		server, token = resolve(server, "", fc.Server), resolve(token, "", fc.Token)
	}
	if server == "" {
		return nil, usageError("no scheduler endpoint: pass --server, set GPUSCHED_SERVER (gpusched dev prints it) or put server: in %s", configPath())
	}
	return client.New(cmd.Context(), client.Config{Endpoints: strings.Split(server, ","), Token: token})
}

// signalContext ends on SIGINT/SIGTERM so long waits stop cleanly.
func signalContext(parent context.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
}

func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError("%s expects %s (see '%s --help')", cmd.CommandPath(), what, cmd.CommandPath())
		}
		return nil
	}
}

func newSubmitCmd() *cobra.Command {
	var (
		spec       pb.JobSpec
		timeLimit  time.Duration
		env        []string
		maxRetries int32
		minMemory  string
		selector   []string
		labels     []string
		idemKey    string
	)
	cmd := &cobra.Command{
		Use:   "submit [flags] -- COMMAND [ARG...]",
		Short: "Submit a job that leases whole GPU nodes",
		Long: `Submit a job: N whole nodes, optional constraints, and a command run on
every node. Prints the job ID alone on stdout, so scripts can capture it.

Each node's command gets GPUSCHED_JOB_ID, GPUSCHED_LEASE_ID, GPUSCHED_NODE_RANK,
GPUSCHED_NUM_NODES, GPUSCHED_NODES, GPUSCHED_MASTER_ADDR and CUDA_VISIBLE_DEVICES
(all of the node's GPUs). Use sh -c '...' for shell syntax.`,
		Example: `  id=$(gpusched submit --nodes 2 --gpu-model H100 -- sh -c 'echo rank=$GPUSCHED_NODE_RANK')
  gpusched submit --gpu-model A100 --time-limit 30m --name train -- python train.py
  gpusched submit --env EPOCHS=3 -- ./run.sh
  gpusched submit --nodes 4 --gpu-model H100 --topology same-rack --selector pool=prod -- ./train.sh
  gpusched submit --job-set sweep-7 --label lr=3e-4 --idempotency-key sweep-7/lr-3e-4 -- ./train.sh`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 0 && len(args) > 0 {
				return usageError("put the command after --, e.g. gpusched submit --nodes 2 -- sh -c 'hostname'")
			}
			spec.Command = args
			if cmd.Flags().Changed("max-retries") {
				spec.MaxRetries = &maxRetries
			}
			if minMemory != "" {
				b, err := parseSize(minMemory)
				if err != nil {
					return usageError("--min-gpu-memory: %v", err)
				}
				spec.MinGpuMemoryBytes = b
			}
			if len(selector) > 0 {
				sel, err := parseLabels("--selector", selector)
				if err != nil {
					return err
				}
				spec.Selector = sel
			}
			if len(labels) > 0 {
				l, err := parseLabels("--label", labels)
				if err != nil {
					return err
				}
				spec.Labels = l
			}
			if timeLimit != 0 {
				spec.TimeLimit = durationProto(timeLimit)
			}
			if len(env) > 0 {
				spec.Env = map[string]string{}
				for _, kv := range env {
					k, v, ok := strings.Cut(kv, "=")
					if !ok {
						return usageError("--env wants KEY=VALUE, got %q", kv)
					}
					spec.Env[k] = v
				}
			}
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			job, err := c.Submit(cmd.Context(), &spec, client.WithIdempotencyKey(idemKey))
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), job.GetId())
			return nil
		},
	}
	f := cmd.Flags()
	f.Int32Var(&spec.Nodes, "nodes", 1, "number of whole nodes, granted all at once")
	f.StringVar(&spec.GpuModel, "gpu-model", "", "GPU model every node must have (H100, A100, H200, B200, ...)")
	f.Int32Var(&spec.GpusPerNode, "gpus-per-node", 0, "minimum GPUs per node (0: any)")
	f.DurationVar(&timeLimit, "time-limit", 0, "wall-clock limit, e.g. 30m or 2h (0: none)")
	f.StringVar(&spec.Name, "name", "", "job name")
	f.StringVar(&spec.Tenant, "tenant", "", "tenant to bill (default \"default\")")
	f.StringVar(&idemKey, "idempotency-key", "", "makes retries safe: a repeated submit with the same key (per tenant, kept at least 24h) prints the original job's ID")
	f.StringVar(&spec.Queue, "queue", "", "queue to wait in (default \"default\")")
	f.Int32Var(&spec.Priority, "priority", 0, "priority within the queue, -1000..1000 (higher goes first)")
	f.StringArrayVar(&env, "env", nil, "extra environment KEY=VALUE (repeatable)")
	f.Int32Var(&maxRetries, "max-retries", 1, "requeue the job under a new lease at most this often when it loses a node")
	f.StringVar(&minMemory, "min-gpu-memory", "", "least memory per GPU, e.g. 80GB or 141GiB (GB = 10^9 bytes, as GPUs are labelled)")
	f.StringSliceVar(&selector, "selector", nil, "node labels every node must have, k=v[,k=v...]")
	f.StringVar(&spec.Topology, "topology", "", "keep the gang in one domain: same-rack or same-switch (the job waits otherwise)")
	f.StringVar(&spec.PreferTopology, "prefer-topology", "", "like --topology, but span domains when no single one fits")
	f.StringSliceVar(&labels, "label", nil, "labels of the job, k=v[,k=v...] (list and watch filter on them)")
	f.StringVar(&spec.JobSet, "job-set", "", "job set the job belongs to (a workflow run or sweep), listed and watched together")
	return cmd
}

func newWaitCmd() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "wait JOB_ID",
		Short: "Wait for a job to end; the exit code tells how it ended",
		Long: `Wait until the job ends. Exit code 0 when it SUCCEEDED, 3 when FAILED,
4 when CANCELLED, 5 when TIMED_OUT, 1 on error (e.g. --timeout reached).`,
		Example: `  gpusched wait 42 && echo done
  gpusched wait --timeout 10m 42`,
		Args: exactArgs(1, "one job ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := signalContext(cmd.Context())
			defer cancel()
			if timeout > 0 {
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			job, err := c.Wait(ctx, args[0])
			if err != nil {
				return fmt.Errorf("waiting for job %s: %w", args[0], err)
			}
			msg := fmt.Sprintf("job %s %s", job.GetId(), stateName(job.GetState()))
			if job.GetReason() != "" {
				msg += ": " + job.GetReason()
			}
			fmt.Fprintln(cmd.ErrOrStderr(), msg)
			switch job.GetState() {
			case pb.JobState_JOB_STATE_SUCCEEDED:
				return nil
			case pb.JobState_JOB_STATE_CANCELLED:
				return &codedError{code: exitCancelled}
			case pb.JobState_JOB_STATE_TIMED_OUT:
				return &codedError{code: exitTimedOut}
			default:
				return &codedError{code: exitFailed}
			}
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "give up after this long (0: wait forever)")
	return cmd
}

func newCancelCmd() *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use:   "cancel JOB_ID",
		Short: "Cancel a job (running commands get SIGTERM, then SIGKILL)",
		Example: `  gpusched cancel 42
  gpusched cancel --reason "wrong dataset" 42`,
		Args: exactArgs(1, "one job ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			job, err := c.Cancel(cmd.Context(), args[0], reason)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "job %s %s\n", job.GetId(), stateName(job.GetState()))
			return nil
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why, recorded on the job")
	return cmd
}

func newLogsCmd() *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs JOB_ID",
		Short: "Print a job's output from every node, each line prefixed by its node",
		Long: `Print the combined stdout and stderr of the job's last lease, fetched from
the nodes that ran it, in rank order. Each line is prefixed by "NODE| ".
With -f, keep printing new output until the job ends.`,
		Example: `  gpusched logs 42
  gpusched logs -f 42
  gpusched logs 42 | grep rank=0`,
		Args: exactArgs(1, "one job ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := dial(cmd)
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, stop := signalContext(cmd.Context())
			defer stop()
			p := &linePrefixer{w: cmd.OutOrStdout()}
			err = c.Logs(ctx, args[0], follow, func(chunk *pb.GetJobLogsResponse) error {
				return p.write(chunk.GetNode(), chunk.GetData())
			})
			if ferr := p.flush(); err == nil {
				err = ferr
			}
			if ctx.Err() != nil && cmd.Context().Err() == nil {
				return nil // interrupted while following
			}
			return err
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output until the job ends")
	return cmd
}
