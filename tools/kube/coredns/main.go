// CoreDNS with only the plugins a one-node test cluster needs: cluster.local names from the
// Kubernetes API (Ray workers and submitters find their head by its Service name), and nothing that
// reaches outside the machine. The full build compiles ~1,400 packages; this one a fraction.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order plugins run in (CoreDNS's plugin.cfg order, restricted to the ones linked above).
func init() {
	dnsserver.Directives = []string{"bind", "errors", "health", "ready", "kubernetes", "cache"}
}

func main() { coremain.Run() }
