package client

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImportsOnlyAPIAndGRPC keeps the SDK light: programs that submit jobs
// must never link the scheduler, the agent or their dependencies (etcd,
// NVML, zap).
func TestImportsOnlyAPIAndGRPC(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	allowed := []string{
		"github.com/gpusched/gpusched/client",
		"github.com/gpusched/gpusched/proto/",
		"google.golang.org/grpc",
		"google.golang.org/protobuf",
		"google.golang.org/genproto/googleapis/rpc",
		"golang.org/x/net",
		"golang.org/x/sys",
		"golang.org/x/text",
	}
	for _, pkg := range strings.Fields(string(out)) {
		ok := false
		for _, a := range allowed {
			if strings.HasPrefix(pkg, a) {
				ok = true
				break
			}
		}
		if !ok {
			t.Errorf("client depends on %s; it may import only the generated API, gRPC and the standard library", pkg)
		}
	}
}
