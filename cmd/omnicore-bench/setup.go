package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/metric"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Identities used by every benchmark.
const (
	registryID = "bench-registry"
	gatewayID  = "bench-gateway"
	keyAlg     = omnicore.ES256
)

// deviceID is the i-th device of the benchmarks.
func deviceID(i int) string { return fmt.Sprintf("dev-%05d", i) }

func deviceIDs(n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = deviceID(i)
	}
	return ids
}

// broker is an MQTT server the clients publish to, maybe through a proxy.
type broker struct {
	name string // "mosquitto" or "emulator"
	url  string // tcp://127.0.0.1:PORT
	emu  *emulator.Server
	// isEmu marks the emulator when emu is not at hand (child processes).
	isEmu bool
	// rcv counts what the broker delivered (benchmarks 1 and 1b).
	rcv *receiver
	// tlsURL is the broker's TLS listener ("tls://127.0.0.1:PORT"), and
	// caFile the CA its certificate chains to; "" when it has none.
	tlsURL, caFile string
}

// tlsHostPort is the host:port of the TLS listener.
func (b broker) tlsHostPort() string {
	u, err := url.Parse(b.tlsURL)
	if err != nil {
		return ""
	}
	return u.Host
}

// tlsConfig is the client TLS configuration that trusts the broker's CA:
// the server certificate is verified, never skipped.
func (b broker) tlsConfig() (*tls.Config, error) {
	pem, err := os.ReadFile(b.caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", b.caFile)
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}, nil
}

func (b broker) hostPort() string {
	u, err := url.Parse(b.url)
	if err != nil {
		return ""
	}
	return u.Host
}

// identity is the gateway the clients connect as.
type identity struct {
	subscription string
	key          string // ES256 private key path
	signer       *omnicore.Signer
}

func (id identity) clientID() string {
	return omnicore.ClientID(id.subscription, registryID, gatewayID)
}

func (id identity) token() (string, error) {
	return id.signer.Token(id.subscription, time.Now(), 2*time.Hour)
}

func newIdentity(dir string) (identity, []byte, error) {
	priv, pub, err := omnicore.WriteKeyPair(dir, gatewayID, keyAlg)
	if err != nil {
		return identity{}, nil, err
	}
	pubPEM, err := os.ReadFile(pub)
	if err != nil {
		return identity{}, nil, err
	}
	signer, err := omnicore.LoadSigner(priv, keyAlg)
	if err != nil {
		return identity{}, nil, err
	}
	return identity{subscription: emulator.DefaultSubscription, key: priv, signer: signer}, pubPEM, nil
}

// startEmulator starts an emulator holding the gateway and n devices bound
// to it. It keeps few received messages, so long runs stay small.
func startEmulator(pub []byte, n int, opts ...emulator.Option) (*emulator.Server, error) {
	opts = append([]emulator.Option{emulator.WithMaxReceived(1000), emulator.WithTLSAddr("")}, opts...)
	srv, err := emulator.Start(opts...)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*emulator.Server, error) {
		srv.Close()
		return nil, err
	}
	if err := srv.AddRegistry(registryID); err != nil {
		return fail(err)
	}
	gw := emulator.Device{ID: gatewayID, Gateway: true, AuthMethod: emulator.AssociationOnly,
		PublicKeys: []emulator.PublicKey{{Algorithm: keyAlg, PEM: pub}}}
	if err := srv.AddDevice(registryID, gw); err != nil {
		return fail(err)
	}
	for _, d := range deviceIDs(n) {
		if err := srv.AddDevice(registryID, emulator.Device{ID: d}); err != nil {
			return fail(err)
		}
		if err := srv.Bind(registryID, gatewayID, d); err != nil {
			return fail(err)
		}
	}
	return srv, nil
}

// mosquitto is a Debian mosquitto on a free loopback port.
type mosquitto struct {
	url string
	// tlsURL is its TLS listener ("" without one).
	tlsURL string
	cmd    *exec.Cmd
	done   chan struct{}
	log    *os.File
}

// findMosquitto returns the mosquitto binary, "" when there is none.
func findMosquitto(flagPath string) string {
	if flagPath != "" {
		return flagPath
	}
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"} {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p
		}
	}
	return ""
}

// startMosquitto runs bin with a config for loopback only, no persistence,
// anonymous clients (it checks no password: the JWT is ignored).
//
// nodelay sets set_tcp_nodelay: mosquitto's default (false) leaves Nagle's
// algorithm on for its sockets.
//
// With tlsFiles it also listens on TLS with that server certificate (the
// counting subscriber stays on the plain listener).
func startMosquitto(ctx context.Context, bin, dir string, nodelay bool, tlsFiles ...*benchTLS) (*mosquitto, error) {
	return startMosquittoWith(ctx, bin, dir, []string{
		"persistence false",
		"max_keepalive 600",
		// The counting subscriber (QoS 0) must lose nothing: no
		// limit on what mosquitto queues for it (the default
		// bounds a subscriber's queue at 1,000 messages). This
		// concerns only the subscriber's side; the publishers see
		// the broker's defaults.
		"max_queued_messages 0",
		fmt.Sprintf("set_tcp_nodelay %t", nodelay),
	}, tlsFiles...)
}

// startMosquittoDefaults runs bin with its default settings: only the
// loopback listener, anonymous clients (mosquitto 2 refuses them on an
// explicit listener otherwise) and the log are configured. It is the broker
// as a user installs it (benchmark 9).
//
// Its log also has the notice level, which says when mosquitto drops
// messages for a subscriber whose queue is full (mosquittoDrops).
//
// Unless strict, max_queued_messages is 0 (no limit) instead of its default
// 1,000: that limit concerns only a subscriber that falls behind (mosquitto
// drops what does not fit in its queue), never a publisher, and on a loaded
// machine the counting subscriber fell behind the fastest routes.
func startMosquittoDefaults(ctx context.Context, bin, dir string, strict bool) (*mosquitto, error) {
	settings := []string{"log_type notice"}
	if !strict {
		settings = append(settings, "max_queued_messages 0")
	}
	return startMosquittoWith(ctx, bin, dir, settings)
}

// mosquittoDrops counts the lines of mosquitto's log since offset that say
// it dropped messages for a client ("Outgoing messages are being dropped").
func (m *mosquitto) mosquittoDrops(offset int64) int {
	b, err := os.ReadFile(m.log.Name())
	if err != nil || int64(len(b)) < offset {
		return 0
	}
	return strings.Count(string(b[offset:]), "Outgoing messages are being dropped")
}

// logSize is the size of mosquitto's log now, an offset for mosquittoDrops.
func (m *mosquitto) logSize() int64 {
	st, err := os.Stat(m.log.Name())
	if err != nil {
		return 0
	}
	return st.Size()
}

// startMosquittoWith runs bin on a free loopback port with settings added
// to the listener, anonymous access and the log.
func startMosquittoWith(ctx context.Context, bin, dir string, settings []string, tlsFiles ...*benchTLS) (*mosquitto, error) {
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		tlsPort := 0
		if len(tlsFiles) > 0 && tlsFiles[0] != nil {
			if tlsPort, err = freePort(); err != nil {
				return nil, err
			}
		}
		conf := filepath.Join(dir, fmt.Sprintf("mosquitto-%d.conf", port))
		lines := []string{
			fmt.Sprintf("listener %d 127.0.0.1", port),
			"allow_anonymous true",
			"log_dest stderr",
			"log_type error",
			"log_type warning",
		}
		lines = append(lines, settings...)
		if tlsPort != 0 {
			t := tlsFiles[0]
			lines = append(lines,
				fmt.Sprintf("listener %d 127.0.0.1", tlsPort),
				"cafile "+t.caFile,
				"certfile "+t.certFile,
				"keyfile "+t.keyFile)
		}
		text := strings.Join(append(lines, ""), "\n")
		if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
			return nil, err
		}
		logf, err := os.Create(filepath.Join(dir, fmt.Sprintf("mosquitto-%d.log", port)))
		if err != nil {
			return nil, err
		}
		cmd := exec.Command(bin, "-c", conf)
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			logf.Close()
			return nil, fmt.Errorf("starting %s: %w", bin, err)
		}
		m := &mosquitto{url: fmt.Sprintf("tcp://127.0.0.1:%d", port), cmd: cmd, done: make(chan struct{}), log: logf}
		go func() { _ = cmd.Wait(); close(m.done) }()
		if tlsPort != 0 {
			m.tlsURL = fmt.Sprintf("tls://127.0.0.1:%d", tlsPort)
			err = waitListening(ctx, fmt.Sprintf("127.0.0.1:%d", tlsPort), m.done, 10*time.Second)
		}
		if err == nil {
			err = waitListening(ctx, fmt.Sprintf("127.0.0.1:%d", port), m.done, 10*time.Second)
		}
		if err != nil {
			m.stop()
			out, _ := os.ReadFile(logf.Name())
			lastErr = fmt.Errorf("mosquitto did not start: %w; its log: %s", err, strings.TrimSpace(string(out)))
			continue
		}
		return m, nil
	}
	return nil, lastErr
}

func (m *mosquitto) stop() {
	if m == nil || m.cmd.Process == nil {
		return
	}
	_ = m.cmd.Process.Signal(os.Interrupt)
	select {
	case <-m.done:
	case <-time.After(5 * time.Second):
		_ = m.cmd.Process.Kill()
		<-m.done
	}
	m.log.Close()
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// waitListening dials addr until it answers, exited is closed, or timeout.
func waitListening(ctx context.Context, addr string, exited <-chan struct{}, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-exited:
			return errors.New("the process exited")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond): // polling a port that is not open yet
		}
	}
}

// genMetrics makes n metrics spread round-robin over devices, tagged with
// device_id, as an input plugin of a gateway would produce them.
func genMetrics(n, devices int, start time.Time) []telegraf.Metric {
	ms := make([]telegraf.Metric, n)
	for i := range ms {
		ms[i] = metric.New("sensor",
			map[string]string{"device_id": deviceID(i % devices)},
			map[string]any{
				"temperature": 20 + float64(i%100)/10,
				"humidity":    int64(40 + i%20),
				"status":      "ok",
			},
			start.Add(time.Duration(i)*time.Millisecond))
	}
	return ms
}

// batches cuts ms into Telegraf-sized batches.
func batches(ms []telegraf.Metric, size int) [][]telegraf.Metric {
	var out [][]telegraf.Metric
	for len(ms) > 0 {
		n := min(size, len(ms))
		out = append(out, ms[:n])
		ms = ms[n:]
	}
	return out
}

// logger is a telegraf.Logger that prints warnings and errors to stderr
// under a prefix (the first few of them; the rest are counted).
type logger struct {
	prefix string
	level  telegraf.LogLevel
	max    int64
	n      atomic.Int64
	mu     sync.Mutex
}

func newLogger(prefix string) *logger {
	return &logger{prefix: prefix, level: telegraf.Warn, max: 20}
}

// ignoredLogs are messages every benchmark provokes on purpose.
var ignoredLogs = []string{
	"is plain TCP", // the benchmarks use tcp:// on loopback, see the method
}

func (l *logger) print(lvl telegraf.LogLevel, msg string) {
	if !l.level.Includes(lvl) {
		return
	}
	for _, s := range ignoredLogs {
		if strings.Contains(msg, s) {
			return
		}
	}
	n := l.n.Add(1)
	if n > l.max {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	suffix := ""
	if n == l.max {
		suffix = " (further messages of this plugin are not shown)"
	}
	fmt.Fprintf(os.Stderr, "%s [%s] %s%s\n", lvl.Indicator(), l.prefix, msg, suffix)
}

func (l *logger) Level() telegraf.LogLevel  { return l.level }
func (*logger) AddAttribute(string, any)    {}
func (l *logger) Errorf(f string, a ...any) { l.print(telegraf.Error, fmt.Sprintf(f, a...)) }
func (l *logger) Error(a ...any)            { l.print(telegraf.Error, fmt.Sprint(a...)) }
func (l *logger) Warnf(f string, a ...any)  { l.print(telegraf.Warn, fmt.Sprintf(f, a...)) }
func (l *logger) Warn(a ...any)             { l.print(telegraf.Warn, fmt.Sprint(a...)) }
func (l *logger) Infof(f string, a ...any)  { l.print(telegraf.Info, fmt.Sprintf(f, a...)) }
func (l *logger) Info(a ...any)             { l.print(telegraf.Info, fmt.Sprint(a...)) }
func (l *logger) Debugf(f string, a ...any) { l.print(telegraf.Debug, fmt.Sprintf(f, a...)) }
func (l *logger) Debug(a ...any)            { l.print(telegraf.Debug, fmt.Sprint(a...)) }
func (l *logger) Tracef(f string, a ...any) { l.print(telegraf.Trace, fmt.Sprintf(f, a...)) }
func (l *logger) Trace(a ...any)            { l.print(telegraf.Trace, fmt.Sprint(a...)) }

// pahoConnect opens a bare paho connection as the gateway, with the options
// the session uses.
func pahoConnect(server string, id identity, handler mqtt.MessageHandler) (mqtt.Client, error) {
	return pahoConnectTLS(server, id, handler, nil)
}

// pahoConnectTLS is pahoConnect with a TLS configuration for a tls://
// server (nil: paho's defaults).
func pahoConnectTLS(server string, id identity, handler mqtt.MessageHandler, tlsCfg *tls.Config) (mqtt.Client, error) {
	tok, err := id.token()
	if err != nil {
		return nil, err
	}
	opts := mqtt.NewClientOptions()
	opts.AddBroker(server)
	opts.SetClientID(id.clientID())
	opts.SetUsername(omnicore.Username)
	opts.SetPassword(tok)
	opts.SetProtocolVersion(4)
	opts.SetCleanSession(true)
	opts.SetAutoReconnect(false)
	opts.SetConnectRetry(false)
	opts.SetKeepAlive(60 * time.Second)
	opts.SetConnectTimeout(10 * time.Second)
	opts.SetWriteTimeout(10 * time.Second)
	if tlsCfg != nil {
		opts.SetTLSConfig(tlsCfg)
	}
	if handler != nil {
		opts.SetDefaultPublishHandler(handler)
	}
	c := mqtt.NewClient(opts)
	t := c.Connect()
	if !t.WaitTimeout(15 * time.Second) {
		c.Disconnect(0)
		return nil, errors.New("no CONNACK within 15s")
	}
	if err := t.Error(); err != nil {
		return nil, err
	}
	return c, nil
}

// mosquittoVersion is the first line of mosquitto -h, e.g. "2.0.11".
func mosquittoVersion(bin string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, bin, "-h").CombinedOutput()
	first, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimPrefix(strings.TrimSpace(first), "mosquitto ")
}
