package omnicore

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Write: route, serialize, publish, and report per metric what was settled.

// destination is where a metric goes.
type destination struct {
	device    string
	kind      omnicore.Kind
	subfolder string
}

// entry is a metric on its way: the original (the identity Telegraf retries
// with) and the copy to serialize, without the routing tags.
type entry struct {
	orig, out telegraf.Metric
}

// message is one publish and the metrics it settles once acknowledged.
type message struct {
	gateway.Message
	metrics []telegraf.Metric
	// pending are the metrics of a message of layout auto, serialized by
	// the worker that sends it (see packAuto); Payload is empty until then.
	pending []entry
	dst     destination
}

// writeStats are the counts of one Write, for its debug line.
type writeStats struct {
	in             int
	messages, sent int
	metricsSent    int
	dropped        map[string]int
	// coalesced counts the states replaced by a newer one of the same
	// device in this Write: settled, but not a loss.
	coalesced int
	// settled holds the metrics this Write acknowledged (true) or gave up
	// on (false), but those of the messages in published.
	settled map[telegraf.Metric]bool
	// published are the messages settled by the bridge's outcome: their
	// metrics go into settled only when the Write fails (one append per
	// message instead of a map entry per metric).
	published []settledMessage
}

type settledMessage struct {
	msg   *message
	acked bool
}

func (o *OmniCore) Write(metrics []telegraf.Metric) error {
	if len(metrics) == 0 {
		return nil
	}
	if o.conn == nil {
		return errors.New("not connected")
	}
	start := time.Now()
	st := &writeStats{in: len(metrics), dropped: make(map[string]int), settled: make(map[telegraf.Metric]bool)}
	o.serializing.Lock()
	msgs := o.prepare(metrics, st)
	o.serializing.Unlock()
	st.messages = len(msgs)

	timeout := time.Duration(o.WriteTimeout)
	if len(msgs) > 0 && !o.conn.Stats().Connected {
		timeout = min(timeout, disconnectedWriteTimeout)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	failed, firstErr := o.publish(ctx, msgs, st)

	if st.coalesced > 0 {
		o.conn.CountDrop(dropStateCoalesced, uint64(st.coalesced))
	}
	for reason, n := range st.dropped {
		o.conn.CountDrop(reason, uint64(n))
	}
	coalesced := ""
	if st.coalesced > 0 {
		coalesced = fmt.Sprintf("%d states coalesced, ", st.coalesced)
	}
	o.Log.Debugf("Write of %d metrics: %d messages, %d published (%d metrics), %sdropped %s, in %s",
		st.in, st.messages, st.sent, st.metricsSent, coalesced, formatCounts(st.dropped), time.Since(start).Round(time.Microsecond))

	if failed == 0 {
		// Metrics given up on (invalid device, too large...) are counted
		// and logged above; reporting them as rejected would also make
		// Telegraf log every such write as failed.
		return nil
	}
	for _, p := range st.published {
		for _, m := range p.msg.metrics {
			st.settled[m] = p.acked
		}
	}
	werr := &writeError{err: o.writeFailure(failed, len(msgs), timeout, firstErr)}
	for i, m := range metrics {
		acked, settled := st.settled[m]
		switch {
		case settled && acked:
			werr.accept = append(werr.accept, i)
		case settled:
			werr.reject = append(werr.reject, i)
		}
	}
	return werr
}

// publish sends the messages concurrently and waits for all of them. It
// returns how many were not acknowledged for a reason that may pass
// (bridge unreachable until write_timeout) and the first such error.
//
// At most parallel long-lived workers take the messages in order, rather
// than a goroutine per message.
func (o *OmniCore) publish(ctx context.Context, msgs []message, st *writeStats) (int, error) {
	var (
		wg       sync.WaitGroup
		next     atomic.Int64
		mu       sync.Mutex
		failed   int
		firstErr error
	)
	settle := func(msg *message, err error) {
		mu.Lock()
		defer mu.Unlock()
		reason := permanentReason(err)
		switch {
		case err == nil:
			st.sent++
			st.metricsSent += len(msg.metrics)
		case reason == "":
			failed++
			if firstErr == nil {
				firstErr = err
			}
			return
		default:
			st.dropped[reason] += len(msg.metrics)
			o.warnings.Warnf(reason, "Dropping %d metrics of device %q: %v", len(msg.metrics), msg.Device, err)
		}
		st.published = append(st.published, settledMessage{msg: msg, acked: err == nil})
	}
	for range min(o.parallel, len(msgs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(msgs) {
					return
				}
				msg := &msgs[i]
				if msg.pending == nil {
					settle(msg, o.publishOne(ctx, msg))
					continue
				}
				// Layout auto: serialize now, counting drops apart
				// from the other workers.
				local := &writeStats{dropped: make(map[string]int), settled: make(map[telegraf.Metric]bool)}
				parts := o.serializePending(msg, local)
				mu.Lock()
				st.messages += len(parts) - 1
				for r, n := range local.dropped {
					st.dropped[r] += n
				}
				for m, ok := range local.settled {
					st.settled[m] = ok
				}
				mu.Unlock()
				for j := range parts {
					settle(&parts[j], o.publishOne(ctx, &parts[j]))
				}
			}
		}()
	}
	wg.Wait()
	return failed, firstErr
}

// publishOne publishes one message. State pacing is the gateway's (see
// gateway.Conn's Publish).
func (o *OmniCore) publishOne(ctx context.Context, msg *message) error {
	return o.conn.Publish(ctx, msg.Message)
}

// permanentReason is the drop reason of an error that retrying does not
// cure, "" for nil and for errors worth retrying.
func permanentReason(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, gateway.ErrAttachRefused):
		return dropAttachRefused
	case errors.Is(err, gateway.ErrInvalidDevice):
		return dropInvalidDevice
	case errors.Is(err, gateway.ErrTooLarge):
		return dropTooLarge
	}
	return ""
}

func formatCounts(counts map[string]int) string {
	if len(counts) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, counts[k])
	}
	return strings.Join(parts, " ")
}
