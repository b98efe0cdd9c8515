package emulator_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/url"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// wait bounds every wait in these tests; nothing here sleeps to let things settle.
const wait = 5 * time.Second

const (
	reg = "reg"
	gw  = "gw"
)

// fixture is a server with registry "reg", ASSOCIATION_ONLY gateway "gw" (ES256)
// and devices dev1..dev3 bound to it.
type fixture struct {
	t     *testing.T
	srv   *emulator.Server
	gwKey string
}

func newFixture(t *testing.T, opts ...emulator.Option) *fixture {
	t.Helper()
	srv := emulator.NewServer(opts...)
	t.Cleanup(srv.Close)
	key := srv.AddTestGateway(t, reg, gw, omnicore.ES256, "dev1", "dev2", "dev3")
	return &fixture{t: t, srv: srv, gwKey: key}
}

func (f *fixture) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	f.t.Cleanup(cancel)
	return ctx
}

func (f *fixture) gwToken() string {
	return f.srv.Token(f.t, f.gwKey, omnicore.ES256, time.Hour)
}

// client is a paho client that records what it receives.
type client struct {
	t    *testing.T
	gw   string // the gateway (or device) it connected as
	c    paho.Client
	msgs chan paho.Message
	lost chan error
}

type clientOpt func(*paho.ClientOptions)

func (f *fixture) dial(clientID, password string, opts ...clientOpt) (*client, error) {
	f.t.Helper()
	cl := &client{t: f.t, msgs: make(chan paho.Message, 1000), lost: make(chan error, 1)}
	if _, _, dev, err := omnicore.ParseClientID(clientID); err == nil {
		cl.gw = dev
	}
	o := paho.NewClientOptions().
		AddBroker(f.srv.URL).
		SetClientID(clientID).
		SetUsername(omnicore.Username).
		SetPassword(password).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(wait).
		SetWriteTimeout(wait).
		SetKeepAlive(30 * time.Second).
		SetOrderMatters(true).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { cl.msgs <- m }).
		SetConnectionLostHandler(func(_ paho.Client, err error) { cl.lost <- err })
	for _, opt := range opts {
		opt(o)
	}
	cl.c = paho.NewClient(o)
	tok := cl.c.Connect()
	if !tok.WaitTimeout(wait) {
		return nil, fmt.Errorf("connect timed out")
	}
	if tok.Error() != nil {
		return nil, tok.Error()
	}
	f.t.Cleanup(func() { cl.c.Disconnect(0) })
	return cl, nil
}

func withTLS(srv *emulator.Server) clientOpt {
	return func(o *paho.ClientOptions) {
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(srv.CAPEM())
		o.Servers = nil
		o.AddBroker(srv.TLSURL)
		o.SetTLSConfig(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	}
}

// gateway connects "gw" with a valid token.
func (f *fixture) gateway(opts ...clientOpt) *client {
	f.t.Helper()
	return f.connectAs(gw, f.gwKey, opts...)
}

// connectAs connects device id of "reg" with a valid ES256 token from keyPath.
func (f *fixture) connectAs(id, keyPath string, opts ...clientOpt) *client {
	f.t.Helper()
	c, err := f.dial(f.srv.ClientID(reg, id), f.srv.Token(f.t, keyPath, omnicore.ES256, time.Hour), opts...)
	require.NoError(f.t, err)
	return c
}

func (c *client) subscribe(topic string, qos byte) byte {
	c.t.Helper()
	tok := c.c.Subscribe(topic, qos, nil)
	require.True(c.t, tok.WaitTimeout(wait), "SUBACK for %s", topic)
	require.NoError(c.t, tok.Error())
	return tok.(*paho.SubscribeToken).Result()[topic]
}

// publish publishes and returns the token without waiting.
func (c *client) publish(topic string, qos byte, payload any) paho.Token {
	return c.c.Publish(topic, qos, false, payload)
}

// mustPublish publishes and waits for completion (the PUBACK at QoS 1).
func (c *client) mustPublish(topic string, qos byte, payload any) {
	c.t.Helper()
	tok := c.publish(topic, qos, payload)
	require.True(c.t, tok.WaitTimeout(wait), "PUBACK for %s", topic)
	require.NoError(c.t, tok.Error())
}

func (c *client) attach(device string) {
	c.t.Helper()
	c.mustPublish("/"+reg+"/"+device+"/attach", 1, "{}")
}

// next returns the next message received (any topic).
func (c *client) next() paho.Message {
	c.t.Helper()
	select {
	case m := <-c.msgs:
		return m
	case <-time.After(wait):
		c.t.Fatalf("no message within %s", wait)
		return nil
	}
}

// nextError returns the next message and decodes it as an errors-topic payload.
func (c *client) nextError() omnicore.ErrorMessage {
	c.t.Helper()
	m := c.next()
	require.Equal(c.t, "/"+reg+"/"+c.gw+"/errors", m.Topic())
	var em omnicore.ErrorMessage
	require.NoError(c.t, json.Unmarshal(m.Payload(), &em), "payload %s", m.Payload())
	return em
}

func (c *client) expectLost() {
	c.t.Helper()
	select {
	case <-c.lost:
	case <-time.After(wait):
		c.t.Fatalf("connection not lost within %s", wait)
	}
}

func (c *client) noMessage() {
	c.t.Helper()
	select {
	case m := <-c.msgs:
		c.t.Fatalf("unexpected message on %s: %q", m.Topic(), m.Payload())
	default:
	}
}

// ackBarrier proves that no PUBACK is on its way for earlier publishes: the
// bridge acknowledges in order, so once this QoS 1 publish of the gateway's
// own telemetry is acknowledged, every earlier PUBACK has arrived.
func (c *client) ackBarrier() {
	c.t.Helper()
	c.mustPublish("/"+reg+"/"+c.gw+"/events/barrier", 1, "barrier")
}

// notAcked asserts a publish has no PUBACK, after an ackBarrier.
func (c *client) notAcked(tok paho.Token) {
	c.t.Helper()
	c.ackBarrier()
	select {
	case <-tok.Done():
		c.t.Fatalf("publish was acknowledged (err %v)", tok.Error())
	default:
	}
}

// lastRecord returns the latest connection record of clientID.
func lastRecord(t *testing.T, srv *emulator.Server, clientID string) emulator.ConnectionRecord {
	t.Helper()
	recs := srv.Connections()
	for i := len(recs) - 1; i >= 0; i-- {
		if recs[i].ClientID == clientID {
			return recs[i]
		}
	}
	t.Fatalf("no connection record for %s", clientID)
	return emulator.ConnectionRecord{}
}

// waitClosed waits until the latest connection of clientID is closed (or
// refused) and returns its record.
func (f *fixture) waitClosed(clientID string) emulator.ConnectionRecord {
	f.t.Helper()
	var rec emulator.ConnectionRecord
	require.NoError(f.t, f.srv.WaitFor(f.ctx(), func() bool {
		recs := f.srv.Connections()
		for i := len(recs) - 1; i >= 0; i-- {
			if recs[i].ClientID == clientID {
				rec = recs[i]
				return !rec.Open()
			}
		}
		return false
	}), "connection of %s did not close", clientID)
	return rec
}

// rawConn is a bare MQTT connection for what paho cannot do or cannot show:
// other protocol levels, QoS 2, packet order on the wire, garbage.
type rawConn struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, srv *emulator.Server) *rawConn {
	t.Helper()
	u, err := url.Parse(srv.URL)
	require.NoError(t, err)
	c, err := net.DialTimeout("tcp", u.Host, wait)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return &rawConn{t: t, c: c, r: bufio.NewReader(c)}
}

func (r *rawConn) send(pk packets.Packet) {
	r.t.Helper()
	if pk.ProtocolVersion == 0 {
		pk.ProtocolVersion = 4
	}
	var buf bytes.Buffer
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	case packets.Puback:
		err = pk.PubackEncode(&buf)
	case packets.Disconnect:
		err = pk.DisconnectEncode(&buf)
	default:
		r.t.Fatalf("rawConn cannot send packet type %d", pk.FixedHeader.Type)
	}
	require.NoError(r.t, err)
	r.write(buf.Bytes())
}

func (r *rawConn) write(b []byte) {
	r.t.Helper()
	require.NoError(r.t, r.c.SetWriteDeadline(time.Now().Add(wait)))
	_, err := r.c.Write(b)
	require.NoError(r.t, err)
}

// connect sends a 3.1.1 CONNECT and returns the CONNACK return code.
func (r *rawConn) connect(clientID, password string) byte {
	r.t.Helper()
	r.send(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{
			ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: clientID,
			UsernameFlag: true, Username: []byte("unused"), PasswordFlag: password != "", Password: []byte(password),
		},
	})
	pk, err := r.read()
	require.NoError(r.t, err)
	require.Equal(r.t, packets.Connack, pk.FixedHeader.Type)
	return pk.ReasonCode
}

// read returns the next packet from the server.
func (r *rawConn) read() (packets.Packet, error) {
	if err := r.c.SetReadDeadline(time.Now().Add(wait)); err != nil {
		return packets.Packet{}, err
	}
	b, err := r.r.ReadByte()
	if err != nil {
		return packets.Packet{}, err
	}
	pk := packets.Packet{ProtocolVersion: 4}
	if err := pk.FixedHeader.Decode(b); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(r.r)
	if err != nil {
		return pk, err
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r.r, buf); err != nil {
		return pk, err
	}
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(buf)
	case packets.Publish:
		err = pk.PublishDecode(buf)
	case packets.Puback:
		err = pk.PubackDecode(buf)
	case packets.Suback:
		err = pk.SubackDecode(buf)
	case packets.Disconnect:
		err = pk.DisconnectDecode(buf)
	}
	return pk, err
}

// expectClosed reads until the server closes the connection; it fails if
// that takes longer than wait.
func (r *rawConn) expectClosed() {
	r.t.Helper()
	for {
		pk, err := r.read()
		if err != nil {
			var ne net.Error
			if ok := asNetErr(err, &ne); ok && ne.Timeout() {
				r.t.Fatalf("connection still open after %s", wait)
			}
			return
		}
		if pk.FixedHeader.Type == packets.Disconnect {
			continue
		}
	}
}

func asNetErr(err error, target *net.Error) bool {
	ne, ok := err.(net.Error)
	if ok {
		*target = ne
	}
	return ok
}

func pub(topic string, qos byte, id uint16, payload string) packets.Packet {
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos},
		TopicName:   topic, PacketID: id, Payload: []byte(payload),
	}
}

func sub(id uint16, filter string, qos byte) packets.Packet {
	return packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1},
		PacketID:    id,
		Filters:     packets.Subscriptions{{Filter: filter, Qos: qos}},
	}
}

func topic(device string, kind omnicore.Kind, subfolder string) string {
	return omnicore.Topic(reg, device, kind, subfolder)
}
