package gateway

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// missingRequired names the required options that are empty, all of them,
// in the order of the sample configuration, so that a new plugin file gets
// one complete, stable message rather than one option per attempt.
func (o *Options) missingRequired() error {
	var missing []string
	for _, opt := range []struct {
		name string
		set  bool
	}{
		{"servers", len(o.Servers) > 0},
		{"subscription_id", o.SubscriptionID != ""},
		{"registry_id", o.RegistryID != ""},
		{"gateway_id", o.GatewayID != ""},
		{"private_key", o.PrivateKey != ""},
	} {
		if !opt.set {
			missing = append(missing, opt.name)
		}
	}
	switch len(missing) {
	case 0:
		return nil
	case 1:
		return fmt.Errorf("%s is required%s", missing[0], requiredHint(missing[0]))
	}
	return fmt.Errorf("%s are required (servers = [\"tls://<hostprefix>.mqtt.korewireless.com:8883\"], "+
		"private_key = the path of the gateway's PEM private key)", strings.Join(missing, ", "))
}

func requiredHint(name string) string {
	switch name {
	case "servers":
		return `, e.g. ["tls://<hostprefix>.mqtt.korewireless.com:8883"] with your subscription's host prefix`
	case "private_key":
		return ": the path of the gateway's PEM private key"
	}
	return ""
}

// checkServer rejects a server URL that could never connect, so that it
// fails the start instead of being retried forever: no host, no port, or the
// <hostprefix> placeholder of the documentation left in.
func checkServer(s string) (*url.URL, error) {
	if strings.ContainsAny(s, "<>") {
		return nil, fmt.Errorf("server %q still holds a placeholder such as <hostprefix>: replace it with your subscription's host prefix (from the KORE console)", s)
	}
	u, err := url.Parse(s)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("server %q is not scheme://host:port", s)
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("server %q has no host name", s)
	}
	port := u.Port()
	if port == "" {
		return nil, fmt.Errorf("server %q has no port: add it, e.g. %s://%s:8883", s, u.Scheme, u.Hostname())
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return nil, errors.New("server " + strconv.Quote(s) + ": port must be 1-65535")
	}
	return u, nil
}
