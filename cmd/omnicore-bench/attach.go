package main

import (
	"context"
	"fmt"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/latencyproxy"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// sessionConfig is a validated gateway configuration for server.
func sessionConfig(server string, id identity, tune func(*gateway.Options)) (*gateway.Config, error) {
	o := gateway.DefaultOptions()
	o.Servers = []string{server}
	o.SubscriptionID = id.subscription
	o.RegistryID = registryID
	o.GatewayID = gatewayID
	o.PrivateKey = id.key
	o.Algorithm = keyAlg
	if tune != nil {
		tune(&o)
	}
	return o.Validate(newLogger("gateway"))
}

// startSession starts a gateway session on server and waits for it to be
// connected.
func startSession(ctx context.Context, server string, id identity, tune func(*gateway.Options)) (*gateway.Session, error) {
	cfg, err := sessionConfig(server, id, tune)
	if err != nil {
		return nil, err
	}
	s, err := gateway.New(cfg)
	if err != nil {
		return nil, err
	}
	s.Start()
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := s.WaitReady(wctx); err != nil {
		closeSession(s)
		return nil, err
	}
	return s, nil
}

func closeSession(s *gateway.Session) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = s.Close(ctx)
}

// attachRun attaches devices through one new connection, pipelined
// (gateway.AttachAll within the session's in-flight window) or one at a
// time, and returns attaches per second and the time it took.
func attachRun(ctx context.Context, emu *emulator.Server, server string, id identity, devices []string, pipelined bool) (float64, time.Duration, error) {
	s, err := startSession(ctx, server, id, nil)
	if err != nil {
		return 0, 0, err
	}
	defer closeSession(s)
	actx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	start := time.Now()
	if pipelined {
		if failed := gateway.AttachAll(actx, s, devices, 0); len(failed) > 0 {
			for d, err := range failed {
				return 0, 0, fmt.Errorf("%d attaches failed, e.g. %s: %w", len(failed), d, err)
			}
		}
	} else {
		for _, d := range devices {
			if err := s.Attach(actx, d); err != nil {
				return 0, 0, fmt.Errorf("attach %s: %w", d, err)
			}
		}
	}
	took := time.Since(start)
	if got := len(emu.Attachments(registryID, gatewayID)); got != len(devices) {
		return 0, 0, fmt.Errorf("the emulator has %d of %d devices attached", got, len(devices))
	}
	return float64(len(devices)) / took.Seconds(), took, nil
}

// benchAttach is benchmark 3: attach storms through one connection.
func (b *bench) benchAttach(ctx context.Context) error {
	most := max(b.sz.attachRTT, b.sz.attachRTTSeq)
	for _, n := range b.sz.attach {
		most = max(most, n)
	}
	emu, err := startEmulator(b.pub, most)
	if err != nil {
		return err
	}
	defer emu.Close()
	proxy, err := latencyproxy.New((broker{url: emu.URL}).hostPort(), 10*time.Millisecond)
	if err != nil {
		return err
	}
	defer proxy.Close()
	rtt := "tcp://" + proxy.Addr()
	// An untimed warm-up, so that the first timed run does not pay for the
	// process's first connection and map growth.
	if _, _, err := attachRun(ctx, emu, emu.URL, b.id, deviceIDs(min(most, 1000)), true); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}

	type attachCase struct {
		r                   *row
		server              string
		pipelined, oneByOne int
		tookP, tookS        []time.Duration
	}
	var cases []*attachCase
	for _, n := range b.sz.attach {
		cases = append(cases, &attachCase{
			r: &row{id: "3", name: fmt.Sprintf("attach storm, %s devices through one connection, loopback", groupThousands(int64(n))),
				unit: "attaches/s", oursLabel: "pipelined", peerLabel: "one at a time"},
			server: emu.URL, pipelined: n, oneByOne: n,
		})
	}
	cases = append(cases, &attachCase{
		r: &row{id: "3", name: fmt.Sprintf("attach storm, %s devices through one connection, 20 ms RTT", groupThousands(int64(b.sz.attachRTT))),
			unit: "attaches/s", oursLabel: "pipelined", peerLabel: "one at a time"},
		server: rtt, pipelined: b.sz.attachRTT, oneByOne: b.sz.attachRTTSeq,
	})
	for run := 0; run < b.opts.runs; run++ {
		for _, c := range cases {
			progress("  run %d/%d: %s", run+1, b.opts.runs, c.r.name)
			order := []bool{true, false}
			if run%2 == 1 {
				order = []bool{false, true}
			}
			for _, pipelined := range order {
				n := c.oneByOne
				if pipelined {
					n = c.pipelined
				}
				v, took, err := attachRun(ctx, emu, c.server, b.id, deviceIDs(n), pipelined)
				if err != nil {
					c.r.addProblem("%v", err)
					continue
				}
				if pipelined {
					c.r.ours = append(c.r.ours, v)
					c.tookP = append(c.tookP, took)
				} else {
					c.r.peer = append(c.r.peer, v)
					c.tookS = append(c.tookS, took)
				}
				progress("    %-14s %s (%d devices in %s)", map[bool]string{true: "pipelined", false: "one at a time"}[pipelined],
					formatValue(v, "attaches/s"), n, took.Round(time.Millisecond))
			}
		}
	}
	for _, c := range cases {
		c.r.note = fmt.Sprintf("session attaches (QoS 1 publish to /{registry}/{device}/attach, PUBACK awaited); pipelined = gateway.AttachAll within max_inflight 100; %s devices pipelined in %s (median)",
			groupThousands(int64(c.pipelined)), medianDuration(c.tookP))
		if c.oneByOne != c.pipelined {
			c.r.note += fmt.Sprintf("; one at a time attached only %s devices (%s) to stay bounded in time, attaches/s compared", groupThousands(int64(c.oneByOne)), medianDuration(c.tookS))
		}
		c.r.slowerWhy = "unexpected: check the problems and the load average"
		if c.server == emu.URL {
			c.r.slowerWhy = "on loopback a round trip costs about 0.05 ms, so there is no waiting to hide: both are bound by CPU shared with the emulator, and pipelining adds goroutine hand-offs"
		}
		b.rows = append(b.rows, c.r)
	}
	return nil
}

func medianDuration(ds []time.Duration) string {
	if len(ds) == 0 {
		return "n/a"
	}
	v := make([]float64, len(ds))
	for i, d := range ds {
		v[i] = float64(d)
	}
	return time.Duration(median(v)).Round(time.Millisecond).String()
}
