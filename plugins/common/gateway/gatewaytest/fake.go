// Package gatewaytest provides a fake gateway.Conn for the plugins' unit
// tests: it records what is published and lets a test inject inbound
// messages and per-device failures, with no network.
package gatewaytest

import (
	"context"
	"fmt"
	"reflect"
	"sync"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Conn is a fake gateway.Conn. The zero value is not usable; use New.
type Conn struct {
	Gateway string

	mu         sync.Mutex
	published  []gateway.Message
	attached   map[string]bool
	refused    map[string]string // device -> description
	publishErr map[string]error  // device -> error returned by Publish
	handlers   map[int]sub
	nextID     int
	drops      map[string]uint64
	gauges     map[string]map[string]int64 // by source
	changed    chan struct{}
	down       bool   // SetDown: not connected, calls wait
	failures   uint64 // connect failures reported by Stats
	hold       bool   // SetHold: publishes wait, unacknowledged
	holding    int
}

type sub struct {
	device string // "" with all: every attached device; "!errors" for errors
	all    bool
	h      gateway.Handler
}

// New returns a fake for gateway gatewayID.
func New(gatewayID string) *Conn {
	return &Conn{
		Gateway:    gatewayID,
		attached:   make(map[string]bool),
		refused:    make(map[string]string),
		publishErr: make(map[string]error),
		handlers:   make(map[int]sub),
		drops:      make(map[string]uint64),
		changed:    make(chan struct{}),
	}
}

var _ gateway.Conn = (*Conn)(nil)

// Refuse makes Attach (and so Publish and Subscribe) for device fail with
// gateway.ErrAttachRefused.
func (c *Conn) Refuse(device, description string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.refused[device] = description
}

// FailPublish makes Publish for device return err (nil to clear).
func (c *Conn) FailPublish(device string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err == nil {
		delete(c.publishErr, device)
		return
	}
	c.publishErr[device] = err
}

// SetDown makes the fake behave like a session whose bridge refuses it:
// Stats reports it disconnected with one more connect failure, and Attach,
// Publish and Subscribe wait until it is up again (or their context ends),
// as a session waits for its connection.
func (c *Conn) SetDown(down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down = down
	if down {
		c.failures++
	}
	c.notifyLocked()
}

// SetHold makes Publish wait, like a message in flight that the bridge has
// not acknowledged yet: a held message is recorded only once released, and
// not at all when the caller's context ends first.
func (c *Conn) SetHold(hold bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hold = hold
	c.notifyLocked()
}

// Holding reports how many publishes wait in SetHold.
func (c *Conn) Holding() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.holding
}

// waitLocked waits, with c.mu held, until ok() holds or ctx ends.
func (c *Conn) waitLocked(ctx context.Context, ok func() bool) error {
	for !ok() {
		ch := c.changed
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			c.mu.Lock()
			return ctx.Err()
		}
		c.mu.Lock()
	}
	return nil
}

func (c *Conn) GatewayID() string { return c.Gateway }

func (c *Conn) Attach(ctx context.Context, device string) error {
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", gateway.ErrInvalidDevice, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.waitLocked(ctx, func() bool { return !c.down }); err != nil {
		return err
	}
	if device == c.Gateway {
		return nil
	}
	if d, ok := c.refused[device]; ok {
		return fmt.Errorf("%w: device %q: %s", gateway.ErrAttachRefused, device, d)
	}
	c.attached[device] = true
	c.notifyLocked()
	return nil
}

func (c *Conn) Detach(_ context.Context, device string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.attached, device)
	c.notifyLocked()
	return nil
}

func (c *Conn) Publish(ctx context.Context, msg gateway.Message) error {
	if err := c.Attach(ctx, msg.Device); err != nil {
		return err
	}
	limit := omnicore.MaxTelemetryBytes
	if msg.Kind == omnicore.KindState {
		limit = omnicore.MaxStateBytes
	}
	if len(msg.Payload) > limit {
		return fmt.Errorf("%w: %d bytes", gateway.ErrTooLarge, len(msg.Payload))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.publishErr[msg.Device]; err != nil {
		return err
	}
	c.holding++
	err := c.waitLocked(ctx, func() bool { return !c.hold && !c.down })
	c.holding--
	c.notifyLocked()
	if err != nil {
		return err
	}
	msg.Payload = append([]byte(nil), msg.Payload...)
	c.published = append(c.published, msg)
	c.notifyLocked()
	return nil
}

func (c *Conn) Subscribe(ctx context.Context, device string, h gateway.Handler) (gateway.Subscription, error) {
	if err := c.Attach(ctx, device); err != nil {
		return nil, err
	}
	return c.add(sub{device: device, h: h}), nil
}

func (c *Conn) SubscribeAll(h gateway.Handler) gateway.Subscription {
	return c.add(sub{all: true, h: h})
}

func (c *Conn) SubscribeErrors(h gateway.Handler) gateway.Subscription {
	return c.add(sub{device: "!errors", h: h})
}

func (c *Conn) add(s sub) gateway.Subscription {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	id := c.nextID
	c.handlers[id] = s
	c.notifyLocked()
	return unsubscribe(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		delete(c.handlers, id)
	})
}

type unsubscribe func()

func (u unsubscribe) Unsubscribe() { u() }

func (c *Conn) CountDrop(reason string, n uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.drops[reason] += n
	c.notifyLocked()
}

// ReportGauges implements gateway.Conn: the latest report of each source.
func (c *Conn) ReportGauges(source string, gauges map[string]int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gauges == nil {
		c.gauges = make(map[string]map[string]int64)
	}
	cp := make(map[string]int64, len(gauges))
	for k, v := range gauges {
		cp[k] = v
	}
	c.gauges[source] = cp
	c.notifyLocked()
}

func (c *Conn) Stats() gateway.Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	drops := make(map[string]uint64, len(c.drops))
	for k, v := range c.drops {
		drops[k] = v
	}
	var gauges map[string]int64
	for _, g := range c.gauges {
		if gauges == nil {
			gauges = make(map[string]int64)
		}
		for k, v := range g {
			gauges[k] += v
		}
	}
	return gateway.Stats{
		Gauges:          gauges,
		Connected:       !c.down,
		Connects:        1,
		ConnectFailures: c.failures,
		Attached:        len(c.attached),
		Published:       uint64(len(c.published)),
		Acked:           uint64(len(c.published)),
		ErrorsByType:    map[string]uint64{},
		DroppedByReason: drops,
	}
}

// Deliver injects an inbound message as if the bridge had sent it, calling
// every matching handler synchronously. For KindErrors, Device is ignored
// and the gateway's errors subscribers get it.
func (c *Conn) Deliver(in gateway.Inbound) {
	if in.Received.IsZero() {
		in.Received = time.Now()
	}
	if in.Topic == "" {
		dev := in.Device
		if in.Kind == omnicore.KindErrors {
			dev = c.Gateway
		}
		in.Topic = omnicore.Topic("registry", dev, in.Kind, in.Subfolder)
	}
	c.mu.Lock()
	var hs []gateway.Handler
	for _, s := range c.handlers {
		switch {
		case in.Kind == omnicore.KindErrors:
			if s.device == "!errors" {
				hs = append(hs, s.h)
			}
		case s.all && (c.attached[in.Device] || in.Device == c.Gateway):
			hs = append(hs, s.h)
		case !s.all && s.device == in.Device:
			hs = append(hs, s.h)
		}
	}
	c.mu.Unlock()
	for _, h := range hs {
		h(in)
	}
}

// Published returns a copy of every message published so far.
func (c *Conn) Published() []gateway.Message {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]gateway.Message(nil), c.published...)
}

// Attached reports whether device is attached.
func (c *Conn) Attached(device string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.attached[device]
}

// Subscribers returns how many handlers are registered.
func (c *Conn) Subscribers() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.handlers)
}

// Drops returns the drop counters.
func (c *Conn) Drops() map[string]uint64 { return c.Stats().DroppedByReason }

// WaitFor blocks until cond holds (checked after every change) or ctx ends.
func (c *Conn) WaitFor(ctx context.Context, cond func() bool) error {
	for {
		c.mu.Lock()
		ch := c.changed
		c.mu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// WaitForAll blocks until cond holds, checked after every change of any of
// conns, or ctx ends. Use it when cond reads the state of several fakes, or
// of something that changes only together with them (a pool's placement of
// a device is followed by an attach on its member): WaitFor on one fake
// misses the changes of the others, and would wait for ever for a
// condition that already holds.
func WaitForAll(ctx context.Context, cond func() bool, conns ...*Conn) error {
	cases := make([]reflect.SelectCase, len(conns)+1)
	cases[len(conns)] = reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())}
	for {
		// The channels before cond, so that a change during cond wakes the
		// select below.
		for i, c := range conns {
			c.mu.Lock()
			cases[i] = reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(c.changed)}
			c.mu.Unlock()
		}
		if cond() {
			return nil
		}
		if i, _, _ := reflect.Select(cases); i == len(conns) {
			return ctx.Err()
		}
	}
}

func (c *Conn) notifyLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}
