package gateway

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// BatchPublisher is a Conn that publishes many messages at once for less
// than one Publish call each. outputs.omnicore uses it when its Conn has it.
type BatchPublisher interface {
	// PublishAll publishes msgs as Publish would, each on its own, and
	// calls done once for each with Publish's outcome for it (done calls
	// do not overlap), returning once every message is settled. When ctx
	// ends first, the messages not settled yet are settled with ctx's
	// error and it returns; no done call comes after it returned.
	PublishAll(ctx context.Context, msgs []Message, done func(i int, err error))
}

// PublishAll implements BatchPublisher.
//
// Why: through Publish every message costs a waiting goroutine, a hand-over
// to a publisher goroutine and back, and a wake-up for its PUBACK; with a
// Telegraf batch of 1,000 messages those hand-overs were most of the
// session's CPU in the profile (the scheduler, futexes, channel locks,
// goroutine stacks). Here a few goroutines hand the messages to the
// connection's publishers in turn and one takes their outcomes as they
// complete, which is usually in order: a message is sent while the
// previous ones wait for their PUBACKs, within the same in-flight window,
// and paho stays the connection's only client. Only a message of a device
// attached on the current connection takes this path; the others (first
// message of a device, a state, a failed attempt) go through Publish's
// path, with its attach, pacing and retries.
func (s *Session) PublishAll(ctx context.Context, msgs []Message, done func(i int, err error)) {
	if len(msgs) == 0 {
		return
	}
	b := &batch{s: s, ctx: ctx, msgs: msgs, done: done, settled: make([]bool, len(msgs)), left: len(msgs),
		allSettled: make(chan struct{}), flights: make(chan *batchFlight, s.cfg.MaxInflight),
		slowSlots: make(chan struct{}, 2*s.cfg.MaxInflight)}
	senders := min(batchSenders, len(msgs))
	b.sending.Add(senders)
	for range senders {
		go b.send()
	}
	go func() {
		b.sending.Wait()
		close(b.flights)
	}()
	go b.complete()
	select {
	case <-b.allSettled:
	case <-ctx.Done():
		b.abandon(ctx.Err())
	}
}

// batch is one PublishAll call.
type batch struct {
	s    *Session
	ctx  context.Context
	msgs []Message
	// flights go from the sender to the completer, in the order sent;
	// every flight holds a slot of the window, so the channel (as large
	// as the window) never blocks the sender.
	flights chan *batchFlight
	// slowSlots bounds the messages the senders pass to Publish.
	slowSlots chan struct{}
	next      atomic.Int64 // the next message for a sender
	sending   sync.WaitGroup

	mu         sync.Mutex
	done       func(i int, err error)
	settled    []bool // by index
	left       int
	finished   bool // PublishAll returned: no more done calls
	allSettled chan struct{}
}

// batchFlight is a message of the batch that paho has taken.
type batchFlight struct {
	*flight
	i     int
	cs    *connection
	topic string
	over  bool // its outcome was taken
}

// settle reports message i's outcome, once.
func (b *batch) settle(i int, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.finished || b.settled[i] {
		return
	}
	b.settled[i] = true
	b.done(i, err)
	b.left--
	if b.left == 0 {
		b.finished = true
		close(b.allSettled)
	}
}

// abandon settles every message not settled yet with err.
func (b *batch) abandon(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.finished {
		return
	}
	for i, ok := range b.settled {
		if !ok {
			b.settled[i] = true
			b.done(i, err)
		}
	}
	b.finished = true
}

// retry sends message i again through Publish's path, from its second
// attempt on, on a goroutine of its own.
func (b *batch) retry(i int) {
	go func() { b.settle(i, b.s.publishFrom(b.ctx, b.msgs[i], 1)) }()
}

// viaPublish passes message i to Publish (attach, pacing, retries) on a
// goroutine of its own, at most twice the window of them at once: a Write
// of new devices would otherwise start a goroutine per message. Only the
// senders call it: complete must never wait for a Publish that waits for a
// window slot complete gives back.
func (b *batch) viaPublish(i int) {
	select {
	case b.slowSlots <- struct{}{}:
	case <-b.ctx.Done():
		b.settle(i, b.ctx.Err())
		return
	}
	go func() {
		defer func() { <-b.slowSlots }()
		b.settle(i, b.s.Publish(b.ctx, b.msgs[i]))
	}()
}

// failed handles a first attempt that ended with err: settled, or sent
// again through Publish's path.
func (b *batch) failed(i int, cs *connection, topic string, err error) {
	if retry, err := b.s.retryAfter(b.ctx, cs, b.msgs[i].Device, topic, err); !retry {
		b.settle(i, err)
		return
	}
	b.retry(i)
}

// batchSenders is how many goroutines of a batch hand its messages to
// the connection's publishers (and so to paho, which takes one message at
// a time from its writer's unbuffered channel): with one, it and the
// publisher take turns, each waking the other for every message; with a
// few, a message is always ready when the publisher comes back for the
// next.
const batchSenders = 4

// send hands the messages to paho in order, each once a window slot is
// free, and passes them on to complete. The senders take the messages in
// turn.
func (b *batch) send() {
	defer b.sending.Done()
	s := b.s
	var cs *connection
	for {
		i := int(b.next.Add(1) - 1)
		if i >= len(b.msgs) {
			return
		}
		msg := &b.msgs[i]
		if err := b.ctx.Err(); err != nil {
			b.settle(i, err)
			continue
		}
		if err := s.checkMessage(*msg); err != nil {
			b.settle(i, err)
			continue
		}
		if msg.Kind == omnicore.KindState {
			b.viaPublish(i)
			continue
		}
		if cs == nil || cs.isLost() || cs.draining.Load() {
			var err error
			if cs, err = s.ready(b.ctx); err != nil {
				b.settle(i, err)
				continue
			}
		}
		if usable, current := s.usableOn(cs, msg.Device); !usable {
			if !current {
				cs = nil // ask for the current one next time
			}
			b.viaPublish(i)
			continue
		}
		topic := omnicore.Topic(s.cfg.RegistryID, msg.Device, msg.Kind, msg.Subfolder)
		if err := s.takeSlot(b.ctx, cs); err != nil {
			b.failed(i, cs, topic, err)
			continue
		}
		tok, err := cs.handOver(b.ctx, topic, msg.QoS, msg.Payload)
		if err != nil {
			s.releaseSlot(cs)
			b.failed(i, cs, topic, err)
			continue
		}
		b.flights <- &batchFlight{flight: s.track(cs, tok, msg.QoS), i: i, cs: cs, topic: topic}
	}
}

// complete takes the outcomes of the flights. It waits on the oldest and
// on the next one: PUBACKs come in order, so the oldest is the next to
// complete, and when the bridge withholds one PUBACK the next one's
// completion lets the others go on rather than all waiting for the ack
// timeout of the one.
func (b *batch) complete() {
	s := b.s
	var queue []*batchFlight // in the order sent; taken ones are skipped
	incoming := b.flights
	for incoming != nil || len(queue) > 0 {
		for len(queue) > 0 && queue[0].over {
			queue[0] = nil
			queue = queue[1:]
		}
		var head, next *batchFlight
		for _, f := range queue {
			if f.over {
				continue
			}
			if head == nil {
				head = f
				continue
			}
			next = f
			break
		}
		var headDone, headNotFound, nextDone, nextNotFound, lost, tick <-chan struct{}
		if head != nil {
			headDone, headNotFound, lost, tick = head.tok.Done(), head.notFound, head.cs.lost, head.cs.ackTick()
		}
		if next != nil {
			nextDone, nextNotFound = next.tok.Done(), next.notFound
		}
		select {
		case f, ok := <-incoming:
			if !ok {
				incoming = nil
				continue
			}
			queue = append(queue, f)
		case <-headDone:
			b.land(head)
		case <-nextDone:
			b.land(next)
		case <-headNotFound:
			b.fail(head, errDeviceNotFound)
		case <-nextNotFound:
			b.fail(next, errDeviceNotFound)
		case <-lost:
			for _, f := range queue {
				if !f.over && f.cs == head.cs {
					b.fail(f, errConnLost)
				}
			}
		case <-tick:
			for _, f := range queue {
				if f.over {
					continue
				}
				if err := s.overdue(f.cs, f.flight); err != nil {
					b.fail(f, err)
				}
			}
		case <-b.ctx.Done():
			for _, f := range queue {
				if !f.over {
					b.fail(f, b.ctx.Err())
				}
			}
			queue = nil
			for f := range incoming {
				b.fail(f, b.ctx.Err())
			}
			return
		}
	}
}

// land takes the outcome of a flight whose token completed.
func (b *batch) land(f *batchFlight) {
	err := b.s.landed(f.cs, f.flight, &b.msgs[f.i])
	if err != nil {
		b.fail(f, err)
		return
	}
	b.finish(f)
	b.s.touch(b.msgs[f.i].Device)
	b.settle(f.i, nil)
}

// fail ends a flight that did not succeed.
func (b *batch) fail(f *batchFlight, err error) {
	b.finish(f)
	b.failed(f.i, f.cs, f.topic, err)
}

func (b *batch) finish(f *batchFlight) {
	f.over = true
	f.cs.untrack(f.flight)
	b.s.releaseSlot(f.cs)
}

// usableOn says whether a message of device may go out on cs at once: cs
// is the current connection (current) and the device is attached on it
// (the gateway always is). It marks the device used, as attachOn does.
func (s *Session) usableOn(cs *connection, device string) (usable, current bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.conn != cs {
		return false, false
	}
	if device == s.cfg.GatewayID {
		return true, true
	}
	d, ok := s.devices[device]
	if !ok || d.attachedGen != cs.gen {
		return false, true
	}
	d.wanted = true
	d.lastUsed = time.Now()
	return true, true
}
