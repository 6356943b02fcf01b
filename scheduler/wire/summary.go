package wire

import (
	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
	"github.com/gpusched/gpusched/scheduler/model"
)

// LeaseSummaryToProto converts a lease summary; the zero summary (nothing
// counted, no lease named) is nil, so unset stays unset on the wire.
func LeaseSummaryToProto(s model.LeaseSummary) *pb.LeaseSummary {
	if s == (model.LeaseSummary{}) {
		return nil
	}
	return &pb.LeaseSummary{
		LeaseId:              s.LeaseID,
		GpuHours:             s.GPUHours,
		MeanGpuUtil:          s.MeanGPUUtil,
		PeakGpuUtil:          s.PeakGPUUtil,
		PeakFbUsedBytes:      s.PeakFBUsedBytes,
		EnergyWh:             s.EnergyWh,
		XidEvents:            uint32(s.XIDEvents),
		ForeignProcessEvents: uint32(s.ForeignProcessEvents),
		Samples:              s.Samples,
		FirstSampleTime:      ts(s.FirstSample),
		LastSampleTime:       ts(s.LastSample),
	}
}

// LeaseSummaryFromProto converts a stored summary; nil is the zero one.
func LeaseSummaryFromProto(p *pb.LeaseSummary) model.LeaseSummary {
	if p == nil {
		return model.LeaseSummary{}
	}
	return model.LeaseSummary{
		LeaseID:              p.GetLeaseId(),
		GPUHours:             p.GetGpuHours(),
		XIDEvents:            int(p.GetXidEvents()),
		ForeignProcessEvents: int(p.GetForeignProcessEvents()),
		TelemetryUsage: model.TelemetryUsage{
			Samples:         p.GetSamples(),
			FirstSample:     fromTS(p.GetFirstSampleTime()),
			LastSample:      fromTS(p.GetLastSampleTime()),
			MeanGPUUtil:     p.GetMeanGpuUtil(),
			PeakGPUUtil:     p.GetPeakGpuUtil(),
			PeakFBUsedBytes: p.GetPeakFbUsedBytes(),
			EnergyWh:        p.GetEnergyWh(),
		},
	}
}
