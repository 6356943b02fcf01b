package main

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
	"sigs.k8s.io/yaml"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Output formats of read commands: human tables (wide adds columns), the
// API object (json, yaml), or names alone, one per line, for scripts.
var outputFormats = []string{"table", "wide", "json", "yaml", "name"}

// structured reports whether format prints the API object.
func structured(format string) bool { return format == "json" || format == "yaml" }

// printNames prints one name per line (-o name).
func printNames(w io.Writer, names ...string) error {
	for _, n := range names {
		if _, err := fmt.Fprintln(w, n); err != nil {
			return err
		}
	}
	return nil
}

func checkOutput(format string) error {
	for _, f := range outputFormats {
		if f == format {
			return nil
		}
	}
	return usageError("-o must be one of %s, got %q", strings.Join(outputFormats, ", "), format)
}

// printProto writes msg as protojson (enum names, API field names) or YAML.
func printProto(w io.Writer, format string, msg proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(msg)
	if err != nil {
		return err
	}
	if format == "yaml" {
		if b, err = yaml.JSONToYAML(b); err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

func durationProto(d time.Duration) *durationpb.Duration { return durationpb.New(d) }

func stateName(s pb.JobState) string { return strings.TrimPrefix(s.String(), "JOB_STATE_") }

func nodeStateName(s pb.NodeState) string { return strings.TrimPrefix(s.String(), "NODE_STATE_") }

// age renders how long ago t was, kubectl style: 5s, 3m, 2h, 4d.
func age(t *timestamppb.Timestamp, now time.Time) string {
	if t == nil {
		return "-"
	}
	d := now.Sub(t.AsTime())
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func gib(b uint64) string { return fmt.Sprintf("%dGiB", b>>30) }

// table writes aligned columns.
type table struct{ tw *tabwriter.Writer }

func newTable(w io.Writer, header ...string) *table {
	t := &table{tw: tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)}
	t.row(header...)
	return t
}

func (t *table) row(cols ...string) { fmt.Fprintln(t.tw, strings.Join(cols, "\t")) }
func (t *table) flush() error       { return t.tw.Flush() }

// linePrefixer prefixes every output line with its node, buffering partial
// lines until they end or the node changes.
type linePrefixer struct {
	w    io.Writer
	node string
	buf  []byte
}

func (p *linePrefixer) write(node string, data []byte) error {
	if node != p.node {
		if err := p.flush(); err != nil {
			return err
		}
		p.node = node
	}
	p.buf = append(p.buf, data...)
	for {
		i := bytes.IndexByte(p.buf, '\n')
		if i < 0 {
			return nil
		}
		if _, err := fmt.Fprintf(p.w, "%s| %s\n", p.node, p.buf[:i]); err != nil {
			return err
		}
		p.buf = p.buf[i+1:]
	}
}

func (p *linePrefixer) flush() error {
	if len(p.buf) == 0 {
		return nil
	}
	_, err := fmt.Fprintf(p.w, "%s| %s\n", p.node, p.buf)
	p.buf = p.buf[:0]
	return err
}
