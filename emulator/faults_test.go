package emulator_test

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

func TestWithholdPubacks(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	c := f.gateway()
	c.attach("dev1")
	f.srv.WithholdPubacks(2)
	t1 := c.publish("/reg/dev1/events", 1, "m1")
	t2 := c.publish("/reg/gw/state", 1, "m2")
	c.mustPublish("/reg/dev1/events", 1, "m3")
	for _, tok := range []paho.Token{t1, t2} {
		select {
		case <-tok.Done():
			t.Fatal("a withheld message was acknowledged")
		default:
		}
	}
	msgs := f.srv.Received()
	require.Len(t, msgs, 1, "withheld messages are dropped, not recorded")
	require.Equal(t, "m3", string(msgs[0].Payload))
	require.Equal(t, 2, f.srv.Stats().Withheld)

	// QoS 0 and control messages are not withheld.
	f.srv.WithholdPubacks(1)
	c.mustPublish("/reg/dev2/attach", 1, "{}")
	c.mustPublish("/reg/dev1/events", 0, "qos0")
	_, err := f.srv.WaitReceived(f.ctx(), 2)
	require.NoError(t, err)
	// The resend of a withheld message is accepted.
	tok := c.publish("/reg/dev1/events", 1, "m1 again")
	c.notAcked(tok)
	c.mustPublish("/reg/dev1/events", 1, "m1 again")
	require.Equal(t, 3, f.srv.Stats().Withheld)
}

func TestPubackDelay(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	c := f.gateway()
	const delay = 300 * time.Millisecond
	f.srv.SetPubackDelay(delay)
	start := time.Now()
	var toks []paho.Token
	for i := range 5 {
		toks = append(toks, c.publish("/reg/gw/events", 1, fmt.Sprint(i)))
	}
	for _, tok := range toks {
		require.True(t, tok.WaitTimeout(wait))
	}
	elapsed := time.Since(start)
	require.GreaterOrEqual(t, elapsed, delay)
	require.Less(t, elapsed, 5*delay, "PUBACKs are delayed in parallel, not one after the other")
	// The messages themselves were accepted at once.
	require.Len(t, f.srv.Received(), 5)
	f.srv.SetPubackDelay(0)
	c.ackBarrier()
}

func TestKickStopRestart(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	id := f.srv.ClientID(reg, gw)
	url := f.srv.URL

	c := f.gateway()
	c.attach("dev1")
	f.srv.KickAll()
	c.expectLost()
	require.Equal(t, emulator.ReasonKicked, f.waitClosed(id).Reason)

	c = f.gateway()
	c.attach("dev1")
	require.True(t, f.srv.Kick(id))
	c.expectLost()
	require.False(t, f.srv.Kick(id))

	c = f.gateway()
	c.attach("dev1")
	_, err := f.srv.SetConfig(reg, "dev1", []byte("kept across restarts"))
	require.NoError(t, err)
	f.srv.Stop()
	c.expectLost()
	require.Equal(t, emulator.ReasonServerStop, f.waitClosed(id).Reason)
	_, err = f.dial(id, f.gwToken())
	require.ErrorContains(t, err, "connection refused")

	require.NoError(t, f.srv.Restart())
	require.Equal(t, url, f.srv.URL)
	c = f.gateway()
	require.Empty(t, f.srv.Attachments(reg, gw), "attachments do not survive a restart")
	c.attach("dev1")
	c.subscribe("/reg/dev1/config", 1)
	require.Equal(t, "kept across restarts", string(c.next().Payload()))
	require.NoError(t, f.srv.Restart(), "restarting a running server is a no-op")

	// TLS comes back on the same port too.
	f.srv.Stop()
	require.NoError(t, f.srv.Restart())
	f.gateway(withTLS(f.srv))
}

func TestKickDropsHalfOpenConnections(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	u, err := url.Parse(f.srv.URL)
	require.NoError(t, err)
	raw, err := net.DialTimeout("tcp", u.Host, wait)
	require.NoError(t, err)
	defer raw.Close()
	// A TCP connection that never sends CONNECT is dropped by KickAll too.
	tu, err := url.Parse(f.srv.TLSURL)
	require.NoError(t, err)
	rawTLS, err := net.DialTimeout("tcp", tu.Host, wait)
	require.NoError(t, err)
	defer rawTLS.Close()
	require.NoError(t, f.srv.WaitFor(f.ctx(), func() bool { return f.srv.Stats().SocketsOpen == 2 }))
	f.srv.KickAll()
	for _, c := range []net.Conn{raw, rawTLS} {
		require.NoError(t, c.SetReadDeadline(time.Now().Add(wait)))
		_, err = c.Read(make([]byte, 1))
		require.Error(t, err)
		var ne net.Error
		require.False(t, asNetErr(err, &ne) && ne.Timeout(), "still open: %v", err)
	}
}

func TestMessageRate(t *testing.T) {
	t.Parallel()
	t.Run("close", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) {
			r.MaxMessageRate = 5
			r.RateAction = emulator.RateClose
		}))
		c := f.gateway()
		for i := range 20 {
			c.publish("/reg/gw/events", 0, fmt.Sprint(i))
		}
		c.expectLost()
		require.Equal(t, emulator.ReasonMessageRate, f.waitClosed(f.srv.ClientID(reg, gw)).Reason)
		require.LessOrEqual(t, len(f.srv.Received()), 6)
	})
	t.Run("throttle", func(t *testing.T) {
		t.Parallel()
		const rate, n = 50, 75 // a burst of 50, then 25 at 50/s: at least 0.5 s
		f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.MaxMessageRate = rate }))
		c := f.gateway()
		start := time.Now()
		var toks []paho.Token
		for i := range n {
			toks = append(toks, c.publish("/reg/gw/events", 1, fmt.Sprint(i)))
		}
		for _, tok := range toks {
			require.True(t, tok.WaitTimeout(wait))
			require.NoError(t, tok.Error())
		}
		require.GreaterOrEqual(t, time.Since(start), 450*time.Millisecond)
		require.Len(t, f.srv.Received(), n, "throttling loses nothing")
		require.Positive(t, f.srv.Stats().Throttled)
	})
}

func TestIdleTimeout(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.IdleTimeout = 300 * time.Millisecond }))
	// Keep-alive off: the client sends nothing after CONNECT.
	c, err := f.dial(f.srv.ClientID(reg, gw), f.gwToken(), func(o *paho.ClientOptions) { o.SetKeepAlive(0) })
	require.NoError(t, err)
	c.expectLost()
	require.Equal(t, emulator.ReasonIdle, f.waitClosed(f.srv.ClientID(reg, gw)).Reason)
}

func TestConnectTimeout(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithTimeouts(200*time.Millisecond, time.Second))
	for _, u := range []string{f.srv.URL, f.srv.TLSURL} {
		pu, err := url.Parse(u)
		require.NoError(t, err)
		c, err := net.DialTimeout("tcp", pu.Host, wait)
		require.NoError(t, err)
		require.NoError(t, c.SetReadDeadline(time.Now().Add(wait)))
		_, err = c.Read(make([]byte, 1)) // nothing sent: the server hangs up
		require.Error(t, err)
		var ne net.Error
		require.False(t, asNetErr(err, &ne) && ne.Timeout(), "server kept a silent connection: %v", err)
		_ = c.Close()
	}
}

// TestSlowReader: a client that stops reading cannot block the server; the
// write times out and the connection is closed.
func TestSlowReader(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithTimeouts(time.Second, 200*time.Millisecond))
	r := dialRaw(t, f.srv)
	require.Equal(t, byte(0), r.connect(f.srv.ClientID(reg, gw), f.gwToken()))
	r.send(sub(1, "/reg/gw/commands/#", 0))
	pk, err := r.read()
	require.NoError(t, err)
	require.Equal(t, packets.Suback, pk.FixedHeader.Type)

	payload := make([]byte, omnicore.MaxTelemetryBytes)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for ctx.Err() == nil { // fill the socket buffers until a write times out
		if err := f.srv.SendCommand(reg, gw, "", payload); err != nil {
			require.ErrorIs(t, err, emulator.ErrNotSubscribed)
			break
		}
	}
	require.NoError(t, ctx.Err())
	require.Equal(t, emulator.ReasonWriteFailed, f.waitClosed(f.srv.ClientID(reg, gw)).Reason)
}

// TestConcurrentUse runs gateways, cloud-side calls and faults at once, for
// the race detector.
func TestConcurrentUse(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.StateInterval = 0 }), emulator.WithMaxReceived(50))
	var gws []string
	keys := map[string]string{}
	for i := range 3 {
		id := fmt.Sprintf("cgw%d", i)
		keys[id] = f.srv.AddTestGateway(t, reg, id, omnicore.ES256, "dev1", "dev2")
		gws = append(gws, id)
	}
	var wg sync.WaitGroup
	for _, id := range gws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := f.dial(f.srv.ClientID(reg, id), f.srv.Token(t, keys[id], omnicore.ES256, time.Hour))
			if err != nil {
				return
			}
			c.c.Subscribe("/reg/"+id+"/errors", 0, nil).WaitTimeout(wait)
			c.publish("/reg/dev1/attach", 1, "{}").WaitTimeout(wait)
			c.c.Subscribe("/reg/dev1/config", 1, nil).WaitTimeout(wait)
			c.c.Subscribe("/reg/dev1/commands/#", 1, nil).WaitTimeout(wait)
			for j := range 100 {
				c.publish("/reg/dev1/events", byte(j%2), fmt.Sprint(j))
				c.publish("/reg/dev2/state", 1, "not attached")
			}
			c.publish("/reg/"+id+"/events", 1, "done").WaitTimeout(wait)
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range 50 {
			_, _ = f.srv.SetConfig(reg, "dev1", []byte(fmt.Sprint(i)))
			_ = f.srv.SendCommand(reg, "dev1", "", []byte("c"))
			_ = f.srv.Devices()
			_ = f.srv.Stats()
			_ = f.srv.AllAttachments()
			_, _ = f.srv.ReceivedSince(0)
			if i == 25 {
				f.srv.KickAll()
			}
		}
	}()
	wg.Wait()
	st := f.srv.Stats()
	require.Positive(t, st.MessagesAccepted)
	require.LessOrEqual(t, len(f.srv.Received()), 50)
}
