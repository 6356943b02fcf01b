package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/gpusched/gpusched/proto/gpusched/v1"
)

// Stream GPU utilization only, at most one sample per GPU every 2s: the
// latest sample of every GPU first, then live ones.
func ExampleClient_StreamTelemetry() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := connect(ctx)
	defer c.Close()

	errEnough := errors.New("seen enough")
	req := &pb.StreamTelemetryRequest{Fields: []string{"gpu_util"}, Every: durationpb.New(2 * time.Second)}
	err := c.StreamTelemetry(ctx, req, func(r *pb.StreamTelemetryResponse) error {
		if r.GetSnapshot() {
			if r.GetSnapshotComplete() {
				fmt.Println("snapshot complete")
			}
			return nil
		}
		if len(r.GetSamples()) > 0 {
			s := r.GetSamples()[0].GetSample()
			fmt.Println("a live sample; other fields left out:", s.GetUuid() == "" && s.GetGpuTemp() == 0)
			return errEnough // ends the stream
		}
		return nil
	})
	if !errors.Is(err, errEnough) {
		log.Fatal(err)
	}
	// Output:
	// snapshot complete
	// a live sample; other fields left out: true
}

// Read a node's recent history, its temperatures only.
func ExampleClient_GetTelemetry() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := connect(ctx)
	defer c.Close()

	for {
		resp, err := c.GetTelemetry(ctx, &pb.GetTelemetryRequest{Node: "gpu-01", Fields: []string{"gpu_temp"}, Limit: 100})
		if err != nil {
			log.Fatal(err)
		}
		if s := resp.GetSamples(); len(s) > 0 {
			fmt.Println("history of", s[0].GetNode(), "hot:", s[0].GetSample().GetGpuTemp() > 0)
			return
		}
		time.Sleep(100 * time.Millisecond) // the agents report every second
	}
	// Output: history of gpu-01 hot: true
}
