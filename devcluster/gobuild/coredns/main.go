// Command coredns is CoreDNS (github.com/coredns/coredns, the version pinned in
// components/coredns.sh) with only the plugins the local cluster's DNS uses: the cluster's names from
// the apiserver (kubernetes), no forwarding (nothing leaves this machine). Upstream's own main is
// coremain.Run() with every plugin imported; leaving out the cloud DNS plugins (Route 53, Azure,
// Cloud DNS) leaves out their SDKs, which would be most of the build.
package main

import (
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"

	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
