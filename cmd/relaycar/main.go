// Command relaycar is an SMTP sidecar that spools mail durably and relays
// it through API and SMTP providers with failover. See README.md.
package main

import (
	"os"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
