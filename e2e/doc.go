// Package e2e holds end-to-end tests: they build bin/gpusched, run it as
// real processes on free loopback ports (the dev cluster, or a scheduler and
// agents against an etcd server), and drive it through the CLI exactly as a
// user would. Skipped with -short.
package e2e
