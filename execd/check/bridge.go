package check

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/share"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Timeouts of the network steps, each within the run's deadline.
const (
	tlsTimeout     = 5 * time.Second
	dateTimeout    = 3 * time.Second
	connectTimeout = 8 * time.Second
	attachTimeout  = 8 * time.Second
	closeTimeout   = 2 * time.Second
)

// bridgeChecks are the network checks of a run: TLS and clock once per
// server, then the connect of each gateway, then the attaches.
type bridgeChecks struct {
	tlsDone   map[string]*x509.Certificate // server URL -> leaf (nil: none)
	clockDone map[string]bool              // host
	sessions  map[string]*gateway.Session  // client ID -> connected session
}

func (r *runner) runBridge(gws []*gatewayCheck, badKeys map[string]bool) {
	b := &bridgeChecks{tlsDone: map[string]*x509.Certificate{}, clockDone: map[string]bool{}, sessions: map[string]*gateway.Session{}}
	defer b.close()
	for _, g := range gws {
		if badKeys[g.opts.PrivateKey] {
			r.skip("bridge checks of gateway "+g.opts.GatewayID, "its private_key fails the key file check above")
			continue
		}
		r.connectGateway(b, g)
	}
	for _, g := range gws {
		r.checkDevices(b, g)
	}
}

func (b *bridgeChecks) close() {
	var wg sync.WaitGroup
	for _, s := range b.sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
			defer cancel()
			_ = s.Close(ctx)
		}()
	}
	wg.Wait()
}

// connectGateway runs the TLS and clock checks of g's servers and, unless
// a running process holds g's connection, connects as g.
func (r *runner) connectGateway(b *bridgeChecks, g *gatewayCheck) {
	gw := g.opts.GatewayID
	o := g.opts
	cfg, err := o.Validate(nil)
	if err != nil {
		r.skip("bridge checks of gateway "+gw, "its options do not validate (%v)", err)
		return
	}
	for _, srv := range cfg.Servers {
		leaf, done := b.tlsDone[srv]
		if !done {
			leaf = r.checkTLS(cfg, g, srv)
			b.tlsDone[srv] = leaf
		}
		u, err := url.Parse(srv)
		if err != nil {
			continue
		}
		if host := u.Hostname(); !b.clockDone[host] {
			b.clockDone[host] = true
			r.checkClock(cfg, host, leaf)
		}
	}
	name := "token of gateway " + gw
	if r.outOfTime(name) {
		return
	}
	if held, why := heldElsewhere(g); held {
		r.skip(name, "%s; the check does not connect, which would take the connection over", why)
		return
	}
	if s := r.checkConnect(cfg, name, g); s != nil {
		b.sessions[g.clientID] = s
	}
}

// heldElsewhere tells whether a process of this host may hold the
// gateway's connection: its host claim (gateway.HostClaimHolder, taken by
// every session, built in or under execd), the sharing rendezvous
// (execd/share.Holder),
// or as a Telegraf or telegraf-omnicore started with one of the checked
// files that name the gateway (runningWith); or whether that cannot be told.
func heldElsewhere(g *gatewayCheck) (bool, string) {
	if h, ok := gateway.HostClaimHolder(g.clientID, g.opts.Servers); ok {
		return true, fmt.Sprintf("%s connects as this gateway (it holds the gateway's host claim)", h)
	}
	for _, f := range g.files {
		if pid := runningWith(f); pid != 0 {
			return true, fmt.Sprintf("process %d, started with %s, may hold the gateway's connection", pid, f)
		}
	}
	if share.Off() {
		return false, ""
	}
	pid, held, err := share.Holder(g.clientID)
	switch {
	case err != nil:
		return true, fmt.Sprintf("cannot tell whether a running process holds the gateway's connection (%v)", err)
	case held && pid > 0:
		return true, fmt.Sprintf("process %d (a running telegraf-omnicore) holds the gateway's connection", pid)
	case held:
		return true, "a process is taking the gateway's connection right now"
	}
	return false, ""
}

// checkTLS verifies the bridge's certificate at srv against the TLS
// options (tls_ca) and returns it (nil when there is none to have).
func (r *runner) checkTLS(cfg *gateway.Config, g *gatewayCheck, srv string) *x509.Certificate {
	u, err := url.Parse(srv)
	if err != nil {
		return nil
	}
	name := "TLS " + u.Host
	switch u.Scheme {
	case "tcp", "mqtt":
		r.skip(name, "%s is plain TCP (only a local emulator speaks it; the bridge requires tls://)", srv)
		return nil
	}
	if r.outOfTime(name) {
		return nil
	}
	tcfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.TLS != nil {
		tcfg = cfg.TLS.Clone()
	}
	if tcfg.ServerName == "" {
		tcfg.ServerName = u.Hostname()
	}
	ca := "the system's CA certificates"
	if g.opts.TLSCA != "" {
		ca = "tls_ca " + g.opts.TLSCA
	}
	ctx, cancel := r.step(tlsTimeout)
	defer cancel()
	conn, err := (&tls.Dialer{NetDialer: &net.Dialer{}, Config: tcfg}).DialContext(ctx, "tcp", u.Host)
	if err == nil {
		leaf := conn.(*tls.Conn).ConnectionState().PeerCertificates[0]
		conn.Close()
		r.pass(name, "certificate for %s issued by %q verifies against %s", tcfg.ServerName, issuerName(leaf), ca)
		return leaf
	}
	var verr *tls.CertificateVerificationError
	if !errors.As(err, &verr) || len(verr.UnverifiedCertificates) == 0 {
		if errors.Is(err, context.DeadlineExceeded) {
			err = fmt.Errorf("no answer within %s", tlsTimeout)
		}
		r.fail(name, fmt.Sprintf("no TLS handshake with %s: %v", u.Host, err),
			"check servers, the network and the firewall (the bridge listens on port 8883)")
		return nil
	}
	leaf := verr.UnverifiedCertificates[0]
	var unknown x509.UnknownAuthorityError
	var host x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(err, &unknown):
		r.fail(name, fmt.Sprintf("the certificate is issued by %q, which %s does not hold", issuerName(leaf), ca),
			fmt.Sprintf("set tls_ca to the CA certificate of %q (the bridge's CA file)", issuerName(leaf)))
	case errors.As(err, &host):
		r.fail(name, fmt.Sprintf("the certificate is for %s, not %s", strings.Join(append(leaf.DNSNames, ipStrings(leaf.IPAddresses)...), ", "), tcfg.ServerName),
			"name the bridge host the certificate lists in servers, or set tls_server_name")
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		r.fail(name, fmt.Sprintf("the certificate is valid from %s to %s, not at this host's time %s",
			leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339), r.env.now().UTC().Format(time.RFC3339)),
			"check this host's clock")
	default:
		r.fail(name, fmt.Sprintf("the certificate issued by %q does not verify against %s: %v", issuerName(leaf), ca, verr.Err),
			"set tls_ca to the bridge's CA file")
	}
	return leaf
}

func issuerName(c *x509.Certificate) string {
	if c.Issuer.CommonName != "" {
		return c.Issuer.CommonName
	}
	return c.Issuer.String()
}

func ipStrings(ips []net.IP) []string {
	out := make([]string, 0, len(ips))
	for _, ip := range ips {
		out = append(out, ip.String())
	}
	return out
}

// checkClock compares this host's clock with the bridge host's: the HTTP
// Date header of the same host when it serves one, else, as a weak bound,
// the NotBefore of its TLS certificate (a clock before it is surely behind).
// The bridge refuses a token issued more than omnicore.ClockSkew ahead of
// its clock, or expired by its clock.
func (r *runner) checkClock(cfg *gateway.Config, host string, leaf *x509.Certificate) {
	name := "clock against " + host
	if r.outOfTime(name) {
		return
	}
	dateURL := "https://" + net.JoinHostPort(host, "443") + "/"
	if r.env.DateURL != nil {
		dateURL = r.env.DateURL(host)
	}
	skew, dateErr := r.dateSkew(cfg, dateURL)
	tolerance := omnicore.ClockSkew
	if dateErr == nil {
		dir := "ahead of"
		if skew < 0 {
			dir = "behind"
		}
		abs := skew.Abs().Round(time.Second)
		if skew.Abs() > tolerance {
			r.fail(name, fmt.Sprintf("this host's clock is %s %s the bridge host's (HTTP Date of %s); the bridge allows %s", abs, dir, dateURL, tolerance),
				"synchronise this host's clock (NTP: timedatectl set-ntp true, or chrony)")
			return
		}
		r.pass(name, "%s %s the bridge host's HTTP Date, within the bridge's %s", abs, dir, tolerance)
		return
	}
	if leaf == nil {
		r.skip(name, "the bridge host gave no HTTP Date (%v) and no TLS certificate to bound its time", dateErr)
		return
	}
	now := r.env.now()
	if now.Before(leaf.NotBefore) {
		r.fail(name, fmt.Sprintf("this host's clock (%s) is before the bridge certificate's NotBefore (%s): at least %s behind",
			now.UTC().Format(time.RFC3339), leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotBefore.Sub(now).Round(time.Second)),
			"synchronise this host's clock (NTP: timedatectl set-ntp true, or chrony)")
		return
	}
	r.pass(name, "not before the bridge certificate's NotBefore (%s); a weak bound only, the bridge host gave no HTTP Date (%v)",
		leaf.NotBefore.UTC().Format(time.RFC3339), dateErr)
}

// dateSkew asks dateURL for its HTTP Date and returns this host's clock
// minus it, taken at the middle of the request (the Date has whole seconds:
// half a second is added to its value).
func (r *runner) dateSkew(cfg *gateway.Config, dateURL string) (time.Duration, error) {
	ctx, cancel := r.step(dateTimeout)
	defer cancel()
	tr := &http.Transport{Proxy: http.ProxyFromEnvironment}
	if cfg.TLS != nil {
		tr.TLSClientConfig = cfg.TLS.Clone()
		tr.TLSClientConfig.ServerName = ""
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, dateURL, nil)
	if err != nil {
		return 0, err
	}
	t0 := r.env.now()
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	t1 := r.env.now()
	date, err := http.ParseTime(resp.Header.Get("Date"))
	if err != nil {
		return 0, fmt.Errorf("%s answered without a Date header", dateURL)
	}
	local := t0.Add(t1.Sub(t0) / 2)
	return local.Sub(date.Add(500 * time.Millisecond)), nil
}

// checkConnect connects as the gateway with a session of its own options
// (short timeouts, no reconnect within the check) and returns it once the
// bridge accepted the token; nil when it did not.
func (r *runner) checkConnect(cfg *gateway.Config, name string, g *gatewayCheck) *gateway.Session {
	c := *cfg
	c.ConnectionTimeout = min(c.ConnectionTimeout, connectTimeout)
	c.Timeout = min(c.Timeout, attachTimeout)
	c.MinReconnect, c.MaxReconnect = time.Hour, time.Hour // one attempt
	c.DetachIdle = 0
	c.Log = nil
	s, err := gateway.New(&c)
	if err != nil {
		r.fail(name, err.Error(), "")
		return nil
	}
	s.Start()
	ctx, cancel := r.step(connectTimeout + time.Second)
	defer cancel()
	err = waitConnect(ctx, s)
	if err == nil {
		r.pass(name, "the bridge accepted the %s JWT (CONNACK) for %s", cfg.Signer.Algorithm(), g.clientID)
		return s
	}
	closeCtx, cancelClose := context.WithTimeout(context.Background(), closeTimeout)
	_ = s.Close(closeCtx)
	cancelClose()
	detail, fix := "not connected: "+err.Error(), "check servers and the network"
	switch {
	case errors.Is(err, gateway.ErrNotAuthorized):
		detail = "the bridge refused the connection: " + err.Error()
		fix = fmt.Sprintf("register the public key of %s for gateway %s in OmniCore (or correct algorithm and subscription_id), and check the clock", g.opts.PrivateKey, g.opts.GatewayID)
	case strings.Contains(err.Error(), "dentifier rejected"):
		detail = "the bridge refused the connection: " + err.Error()
		fix = "correct subscription_id, registry_id and gateway_id (the client ID " + g.clientID + ")"
	case strings.Contains(err.Error(), "TLS"):
		fix = "see the TLS check"
	}
	r.fail(name, detail, fix)
	return nil
}

// waitConnect waits for the session's first connect to succeed or fail.
// The session has no event for a failed connect (it retries in the
// background), so its Health is polled; the poll ends at the first failure
// or with ctx.
func waitConnect(ctx context.Context, s *gateway.Session) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		connected, lastErr := s.Health()
		if connected {
			return s.WaitReady(ctx)
		}
		if lastErr != nil {
			return lastErr
		}
		select {
		case <-ctx.Done():
			return errors.New("no CONNACK from the bridge in time")
		case <-tick.C:
		}
	}
}

// checkDevices attaches each device of g's plugins, then detaches those
// that attached. A device refused by a pool's first gateway is tried on the
// pool's other members, as the pool would.
func (r *runner) checkDevices(b *bridgeChecks, g *gatewayCheck) {
	if len(g.devices) == 0 {
		return
	}
	name := fmt.Sprintf("devices of gateway %s", g.opts.GatewayID)
	s := b.sessions[g.clientID]
	if s == nil {
		r.skip(name, "the check did not connect as the gateway (see above)")
		return
	}
	if r.outOfTime(name) {
		return
	}
	ctx, cancel := r.step(attachTimeout)
	defer cancel()
	members := []*gateway.Session{s}
	for _, id := range g.poolOf {
		if m := b.sessions[id]; m != nil {
			members = append(members, m)
		}
	}
	type outcome struct {
		by  *gateway.Session
		err error
	}
	results := make([]outcome, len(g.devices))
	var wg sync.WaitGroup
	for i, d := range g.devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, m := range members {
				err := m.Attach(ctx, d)
				results[i] = outcome{by: m, err: err}
				if err == nil || !errors.Is(err, gateway.ErrAttachRefused) {
					return
				}
			}
		}()
	}
	wg.Wait()
	dctx, dcancel := r.step(attachTimeout)
	defer dcancel()
	var refused []string
	var fixes []string
	for i, d := range g.devices {
		res := results[i]
		if res.err == nil {
			_ = res.by.Detach(dctx, d)
			continue
		}
		why, fix := refusal(res.err, d, g)
		refused = append(refused, fmt.Sprintf("%s (%s)", d, why))
		if !slices.Contains(fixes, fix) {
			fixes = append(fixes, fix)
		}
	}
	if len(refused) == 0 {
		r.pass(name, "%d of %d attach and detach", len(g.devices), len(g.devices))
		return
	}
	r.fail(name, fmt.Sprintf("%d of %d refused: %s", len(refused), len(g.devices), strings.Join(refused, "; ")), strings.Join(fixes, "; "))
}

// refusal names why the bridge refused a device, from the description of
// its GATEWAY_ATTACHMENT_ERROR, and the fix.
func refusal(err error, device string, g *gatewayCheck) (why, fix string) {
	msg := err.Error()
	if !errors.Is(err, gateway.ErrAttachRefused) {
		return "no answer: " + msg, "check the connection (the bridge did not answer the attach in time)"
	}
	desc := msg
	if _, after, ok := strings.Cut(msg, fmt.Sprintf("device %q: ", device)); ok {
		desc = after
	}
	lower := strings.ToLower(msg)
	switch {
	case strings.Contains(lower, "not bound"):
		return "not bound: " + desc, fmt.Sprintf("bind each refused device to gateway %s in OmniCore", g.opts.GatewayID)
	case strings.Contains(lower, "blocked"):
		return "blocked: " + desc, "unblock the device in OmniCore, or remove it from devices"
	case strings.Contains(lower, "does not exist"), strings.Contains(lower, "not found"):
		return "unknown: " + desc, "create the device in registry " + g.opts.RegistryID + ", or correct its ID in devices"
	case strings.Contains(lower, "jwt"), strings.Contains(lower, "authorization"), strings.Contains(lower, "auth method"):
		return "wrong auth: " + desc, "check device_auth, device_key_dir ({device_id}.pem) and the device's registered key"
	case strings.Contains(lower, "maximum"):
		return "attach limit: " + desc, "spread the devices over a pool of gateways (gateways)"
	}
	return desc, "see the bridge's description"
}
