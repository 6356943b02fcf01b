package telemetry

import (
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// ErrUnknownField: a field name that GpuSample does not have.
var ErrUnknownField = errors.New("telemetry: unknown field")

// Entry is one published batch with where it came from: the node that sent
// it and the tenant whose lease held the node (the scheduler stamps it; the
// agents do not know tenants).
type Entry struct {
	Node   string
	Tenant string
	Batch  *pb.TelemetryBatch
}

// Filter selects batches. Every non-empty criterion must match; a list
// matches any of its entries.
type Filter struct {
	Nodes    []string
	JobIDs   []string
	LeaseIDs []string
	Tenant   string
}

// matcher is a Filter compiled to sets.
type matcher struct {
	nodes, jobs, leases map[string]struct{} // nil: any
	tenant              string
}

func set(xs []string) map[string]struct{} {
	if len(xs) == 0 {
		return nil
	}
	m := make(map[string]struct{}, len(xs))
	for _, x := range xs {
		m[x] = struct{}{}
	}
	return m
}

func (f Filter) compile() matcher {
	return matcher{nodes: set(f.Nodes), jobs: set(f.JobIDs), leases: set(f.LeaseIDs), tenant: f.Tenant}
}

func in(m map[string]struct{}, x string) bool {
	if m == nil {
		return true
	}
	_, ok := m[x]
	return ok
}

// node reports whether entries of node can match at all.
func (m *matcher) node(n string) bool { return in(m.nodes, n) }

func (m *matcher) match(e *Entry) bool {
	return in(m.nodes, e.Node) && in(m.jobs, e.Batch.GetJobId()) && in(m.leases, e.Batch.GetLeaseId()) &&
		(m.tenant == "" || m.tenant == e.Tenant)
}

// gpuSampleFields are GpuSample's fields by their proto names.
var gpuSampleFields = (&pb.GpuSample{}).ProtoReflect().Descriptor().Fields()

// IsField reports whether name is a GpuSample field, e.g. "gpu_util".
func IsField(name string) bool {
	return gpuSampleFields.ByName(protoreflect.Name(name)) != nil
}

// Fields selects the GpuSample fields sent to a client. The zero value
// selects every field.
type Fields struct {
	fds []protoreflect.FieldDescriptor // nil: all
}

// ParseFields selects fields by name; empty selects all. The GPU index is
// always kept, named or not.
func ParseFields(names []string) (Fields, error) {
	var f Fields
	for _, n := range names {
		fd := gpuSampleFields.ByName(protoreflect.Name(n))
		if fd == nil {
			return Fields{}, fmt.Errorf("%w %q", ErrUnknownField, n)
		}
		if fd.Number() != gpuFieldNumber {
			f.fds = append(f.fds, fd)
		}
	}
	if len(names) > 0 && f.fds == nil {
		f.fds = []protoreflect.FieldDescriptor{} // only the GPU index
	}
	return f, nil
}

// gpuFieldNumber is GpuSample.gpu, kept in every selection.
const gpuFieldNumber = 1

// apply returns s with only the selected fields: s itself when all are
// selected (samples are shared and never modified), else a copy.
func (f Fields) apply(s *pb.GpuSample) *pb.GpuSample {
	if f.fds == nil {
		return s
	}
	out := &pb.GpuSample{Gpu: s.GetGpu()}
	src, dst := s.ProtoReflect(), out.ProtoReflect()
	for _, fd := range f.fds {
		if src.Has(fd) {
			dst.Set(fd, src.Get(fd))
		}
	}
	return out
}

// gpuKey names one GPU of the cluster.
type gpuKey struct {
	node string
	gpu  int32
}

// downsampler keeps at most one sample per GPU per interval: the first one
// taken in each interval, intervals aligned to the sample clock (so every
// subscriber with the same interval sees the same samples).
type downsampler struct {
	every int64            // nanoseconds; 0 keeps everything
	last  map[gpuKey]int64 // index of the last interval a sample was kept in
}

func newDownsampler(every time.Duration) *downsampler {
	return &downsampler{every: int64(every), last: map[gpuKey]int64{}}
}

// keep reports whether a sample of GPU k taken at t is kept, and records it.
func (d *downsampler) keep(k gpuKey, t time.Time) bool {
	if d == nil || d.every <= 0 {
		return true
	}
	w := t.UnixNano() / d.every
	if last, ok := d.last[k]; ok && w <= last {
		return false
	}
	d.last[k] = w
	return true
}

// filter returns the samples of e that d keeps, in order. It returns the
// batch's own slice when every sample is kept.
func (d *downsampler) filter(e *Entry) []*pb.GpuSample {
	samples := e.Batch.GetSamples()
	if d == nil || d.every <= 0 {
		return samples
	}
	t := e.Batch.GetTime().AsTime()
	var out []*pb.GpuSample
	for i, s := range samples {
		if !d.keep(gpuKey{e.Node, s.GetGpu()}, t) {
			if out == nil {
				out = append(make([]*pb.GpuSample, 0, len(samples)), samples[:i]...)
			}
			continue
		}
		if out != nil {
			out = append(out, s)
		}
	}
	if out == nil {
		return samples
	}
	return out
}
