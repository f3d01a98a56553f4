// Package tests holds relaycar's integration tests. They build the real
// binary once (TestMain), run it as a child process per test against
// scripted SMTP sinks on 127.0.0.1 (internal/testsmtp), and assert on what
// the sinks received, on the spool directory and on /metrics.
//
// Run with: go test -race -count=1 ./tests/
//
// Set RELAYCAR_TEST_RACE=1 (make test does) to build the binary under test
// with -race too; a race it reports fails the test that ran it, and the
// memory-cgroup test runs a build without -race.
package tests
