// Command omnicore-emulator runs the OmniCore emulator: MQTT and MQTTS
// listeners enforcing the bridge's rules, KORE's device-manager REST API to
// provision registries, devices and gateways (saved in the state directory;
// a registry file can seed it), a web console, and an admin API to read what
// arrived and inject faults.
//
//	omnicore-emulator -registry testdata/registry.json
//	omnicore-emulator -subscription demo-sub          # provision with the REST API
//	omnicore-emulator token -key KEY.pem -alg RS256 -aud demo-sub
//
// See emulator/README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/influxdata/telegraf/config"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

const (
	shutdownTimeout         = 5 * time.Second
	defaultMaxReceivedBytes = 256 << 20
	minMaxReceivedBytes     = 1 << 20
)

// version is set at build time with -ldflags "-X main.version=..." (make dist).
var version = ""

func programVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		fmt.Fprintln(os.Stderr, "omnicore-emulator:", err)
		os.Exit(1)
	}
}

// run is main without the process: it serves until ctx is done.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "token" {
		return runToken(args[1:], stdout, stderr)
	}

	fs := flag.NewFlagSet("omnicore-emulator", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: omnicore-emulator [-registry FILE | -subscription ID] [flags]\n       omnicore-emulator token -key FILE -alg RS256|ES256 -aud SUBSCRIPTION [-lifetime 1h]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	var (
		registryPath = fs.String("registry", "", "registry JSON file that seeds an empty state directory (see emulator/README.md)")
		subscription = fs.String("subscription", "", "subscription ID (default: the saved state's, else the registry file's)")
		mqttAddr     = fs.String("mqtt", "127.0.0.1:1883", "plain MQTT listen address (empty disables it)")
		mqttsAddr    = fs.String("mqtts", "127.0.0.1:8883", "MQTT over TLS listen address (empty disables it)")
		adminAddr    = fs.String("admin", "127.0.0.1:8080", "HTTP listen address of the REST API, the console and the admin API (empty disables it)")
		stateDir     = fs.String("state-dir", "omnicore-emulator-state", "directory for the provisioning, ca.pem, the CA key and generated device keys")
		certHosts    = fs.String("cert-hosts", "", "comma-separated extra DNS names or IPs for the server certificate")
		logReceived  = fs.Bool("log-received", false, "print one line per accepted events/state message on stdout")
		maxReceived  = fs.Int("max-received", 100000, "messages kept for GET /v1/telemetry (older ones are dropped; 0: no limit)")
		tokenFile    = fs.String("admin-token-file", "", "file holding the token every REST and admin API request must carry (required when -admin is not on loopback)")
		verbose      = fs.Bool("v", false, "debug logging")
		pubackDelay  = fs.Duration("puback-delay", 0, "delay every PUBACK by this much")
		badCode      = fs.Uint("bad-credentials-code", 5, "CONNACK code for a bad JWT or blocked device: 5 (not authorized) or 4 (bad user name or password)")
		rateAction   = fs.String("rate-action", string(emulator.RateThrottle), "above -max-message-rate: throttle or close")
		showVersion  = fs.Bool("version", false, "print the version and exit")
	)
	maxReceivedBytes := config.Size(defaultMaxReceivedBytes)
	fs.Var(sizeFlag{&maxReceivedBytes}, "max-received-bytes", "payload bytes kept for GET /v1/telemetry, e.g. 256MiB (older messages are dropped; 0: no limit)")
	rules := emulator.DefaultRules()
	fs.DurationVar(&rules.ClockSkew, "clock-skew", rules.ClockSkew, "allowed JWT clock skew; the connection closes at exp + skew")
	fs.DurationVar(&rules.MaxTokenLifetime, "max-token-lifetime", rules.MaxTokenLifetime, "longest allowed JWT lifetime (exp - iat)")
	fs.BoolVar(&rules.CloseOnTokenExpiry, "close-on-token-expiry", rules.CloseOnTokenExpiry, "close connections when their JWT expires")
	fs.BoolVar(&rules.AttachFailurePuback, "attach-failure-puback", rules.AttachFailurePuback, "acknowledge a failed attach after its GATEWAY_ATTACHMENT_ERROR")
	fs.BoolVar(&rules.NotAttachedPuback, "not-attached-puback", rules.NotAttachedPuback, "acknowledge (and still drop) a message for a device that is not attached")
	fs.BoolVar(&rules.NotAttachedErrorAfterPuback, "not-attached-error-after-puback", rules.NotAttachedErrorAfterPuback, "acknowledge a message for a device that is not attached first, then send its GATEWAY_DEVICE_NOT_FOUND")
	fs.BoolVar(&rules.DetachedStatePuback, "detached-state-puback", rules.DetachedStatePuback, "acknowledge (and still drop) the state message that got its device detached")
	fs.IntVar(&rules.MaxAttached, "max-attached", rules.MaxAttached, "devices one gateway connection may attach")
	fs.DurationVar(&rules.StateInterval, "state-interval", rules.StateInterval, "least time between state messages of one device (0 disables)")
	fs.Float64Var(&rules.MaxMessageRate, "max-message-rate", rules.MaxMessageRate, "inbound PUBLISH per second per connection (0 disables)")
	fs.DurationVar(&rules.IdleTimeout, "idle-timeout", rules.IdleTimeout, "close connections silent for this long (0 disables)")
	fs.BoolVar(&rules.EmptyConfigOnSubscribe, "empty-config-on-subscribe", rules.EmptyConfigOnSubscribe, "send an empty config on subscribe when a device has none")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *showVersion {
		fmt.Fprintf(stdout, "omnicore-emulator %s (%s)\n", programVersion(), runtime.Version())
		return nil
	}
	switch {
	case fs.NArg() > 0:
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	case *mqttAddr == "" && *mqttsAddr == "":
		return errors.New("-mqtt and -mqtts cannot both be empty")
	case *badCode != 4 && *badCode != 5:
		return fmt.Errorf("-bad-credentials-code must be 4 or 5, not %d", *badCode)
	case *rateAction != string(emulator.RateThrottle) && *rateAction != string(emulator.RateClose):
		return fmt.Errorf("-rate-action must be %q or %q", emulator.RateThrottle, emulator.RateClose)
	case *maxReceived < 0:
		return fmt.Errorf("-max-received must not be negative, not %d", *maxReceived)
	case maxReceivedBytes < 0:
		return fmt.Errorf("-max-received-bytes must not be negative, not %d", maxReceivedBytes)
	case maxReceivedBytes > 0 && maxReceivedBytes < minMaxReceivedBytes:
		return fmt.Errorf("-max-received-bytes %d is below 1MiB: a single message can be 256 KB", maxReceivedBytes)
	case *tokenFile != "" && *adminAddr == "":
		return errors.New("-admin-token-file is set but -admin is empty")
	}
	adminToken := ""
	if *tokenFile != "" {
		var err error
		if adminToken, err = readTokenFile(*tokenFile); err != nil {
			return err
		}
	}
	rules.BadCredentialsCode = byte(*badCode)
	rules.RateAction = emulator.RateAction(*rateAction)

	if err := os.MkdirAll(*stateDir, 0o700); err != nil {
		return err
	}
	seed, sub, err := provisioning(*registryPath, *subscription, *stateDir)
	if err != nil {
		return err
	}
	caCert, caKey, err := loadOrCreateCA(*stateDir)
	if err != nil {
		return err
	}

	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	out := &lockedWriter{w: stdout}
	opts := []emulator.Option{
		emulator.WithSubscription(sub),
		emulator.WithStateDir(*stateDir),
		emulator.WithTCPAddr(*mqttAddr),
		emulator.WithTLSAddr(*mqttsAddr),
		emulator.WithRules(func(r *emulator.Rules) { *r = rules }),
		emulator.WithLogger(logger),
		emulator.WithCA(caCert, caKey),
		emulator.WithMaxReceived(*maxReceived),
		emulator.WithMaxReceivedBytes(int64(maxReceivedBytes)),
	}
	if *certHosts != "" {
		opts = append(opts, emulator.WithCertHosts(strings.Split(*certHosts, ",")...))
	}
	if *logReceived {
		opts = append(opts, emulator.WithOnReceive(func(m emulator.Message) { out.println(formatReceived(m)) }))
	}
	srv, err := emulator.Start(opts...)
	if err != nil {
		return err
	}
	defer srv.Close()
	var generated []emulator.GeneratedKey
	if seed != nil {
		if generated, err = srv.ApplyRegistryFile(seed, filepath.Dir(*registryPath), filepath.Join(*stateDir, "keys")); err != nil {
			return err
		}
	} else if generated, err = keptKeys(filepath.Join(*stateDir, "keys")); err != nil {
		return err
	}
	srv.SetPubackDelay(*pubackDelay)
	caPath, err := srv.WriteCAFile(*stateDir)
	if err != nil {
		return err
	}

	adminURL := ""
	var admin *http.Server
	if *adminAddr != "" {
		ln, guard, err := listenAdmin(*adminAddr, adminToken)
		if err != nil {
			return err
		}
		admin = &http.Server{
			Handler:           srv.HTTPHandler(guard...),
			ReadHeaderTimeout: 5 * time.Second,
			ReadTimeout:       30 * time.Second,
			WriteTimeout:      30 * time.Second,
			IdleTimeout:       time.Minute,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		}
		adminURL = "http://" + ln.Addr().String()
		go func() {
			if err := admin.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				logger.Error("admin API stopped", "error", err)
			}
		}()
	}

	out.println("subscription: " + sub)
	if *registryPath != "" && seed == nil {
		out.println("registry: " + *registryPath + " not applied: " + filepath.Join(*stateDir, emulator.ProvisioningFile) + " holds the provisioning")
	}
	if srv.URL != "" {
		out.println("mqtt: " + srv.URL)
	}
	if srv.TLSURL != "" {
		out.println("mqtts: " + srv.TLSURL)
	}
	if adminURL != "" {
		out.println("admin: " + adminURL)
		out.println("api: " + adminURL + "/omnicore/subscriptions/" + sub)
		out.println("console: " + adminURL + "/console/")
	}
	out.println("ca: " + caPath)
	for _, g := range generated {
		out.println(fmt.Sprintf("key: %s/%s %s %s", g.Registry, g.Device, g.Algorithm, g.PrivatePath))
	}
	out.println("ready")

	<-ctx.Done()
	if admin != nil {
		sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		_ = admin.Shutdown(sctx)
	}
	srv.Close()
	out.println("stopped")
	return nil
}

// loadOrCreateCA keeps the CA in the state directory so that a ca.pem copied
// to a client stays valid across restarts.
func loadOrCreateCA(dir string) (certPEM, keyPEM []byte, err error) {
	certPath, keyPath := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca.key")
	certPEM, certErr := os.ReadFile(certPath)
	keyPEM, keyErr := os.ReadFile(keyPath)
	if certErr == nil && keyErr == nil {
		return certPEM, keyPEM, nil
	}
	if certPEM, keyPEM, err = emulator.GenerateCA(); err != nil {
		return nil, nil, err
	}
	if err := os.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		return nil, nil, err
	}
	if err := os.WriteFile(certPath, certPEM, 0o644); err != nil {
		return nil, nil, err
	}
	return certPEM, keyPEM, nil
}

// formatReceived is the -log-received line: time, client, topic, kind,
// QoS and size. Never payload bytes: payloads can hold secrets.
func formatReceived(m emulator.Message) string {
	return fmt.Sprintf("%s received client=%s topic=%s kind=%s qos=%d size=%d",
		m.Time.UTC().Format("2006-01-02T15:04:05.000Z"), m.ClientID, m.Topic, m.Kind, m.QoS, len(m.Payload))
}

// lockedWriter serialises lines written from connection goroutines.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) println(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	_, _ = io.WriteString(l.w, s+"\n")
}

// runToken mints a JWT for manual testing (mosquitto_pub -P, attach payloads).
func runToken(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("omnicore-emulator token", flag.ContinueOnError)
	fs.SetOutput(stderr)
	key := fs.String("key", "", "PEM private key file (required)")
	alg := fs.String("alg", omnicore.RS256, "RS256 or ES256")
	aud := fs.String("aud", "", "audience: the subscription ID (required)")
	lifetime := fs.Duration("lifetime", time.Hour, "token lifetime (the bridge allows at most 24h)")
	iatOffset := fs.Duration("iat-offset", 0, "shift iat from now, e.g. -2h to mint an expired token")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	case *key == "":
		return errors.New("token: -key is required")
	case *aud == "":
		return errors.New("token: -aud is required")
	case *lifetime <= 0:
		return errors.New("token: -lifetime must be positive")
	}
	signer, err := omnicore.LoadSigner(*key, *alg)
	if err != nil {
		return fmt.Errorf("token: %w", err)
	}
	tok, err := signer.Token(*aud, time.Now().Add(*iatOffset), *lifetime)
	if err != nil {
		return fmt.Errorf("token: %w", err)
	}
	_, err = fmt.Fprintln(stdout, tok)
	return err
}
