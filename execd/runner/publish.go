package runner

import (
	"fmt"
	"strings"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/plugins/parsers/influx"
)

// maxWritesInFlight is how many Writes the publish loop keeps running at
// once. While a Write waits for the last PUBACKs of its batch, the next
// batch is already being read, routed and published, so the connection
// never idles between batches, and one message whose PUBACK the bridge
// withholds (resent after the ack timeout) holds up its own batch, not
// the pipe. Batches are released in order, each once every earlier one is
// acknowledged.
const maxWritesInFlight = 4

// inflightWrite is a batch being written by its own goroutine.
type inflightWrite struct {
	end  mark
	solo bool // written with no other Write in flight
	done chan writeOutcome
}

type writeOutcome struct{ ok, running bool }

// publishLoop connects the output and writes the queue's lines in batches
// until draining (then it writes what is left without waiting and without
// retrying, and returns when the queue is empty or a Write fails) or
// abandon. It returns true when it left a Write running.
func (r *Runner) publishLoop(draining, abandon <-chan struct{}) bool {
	if !r.connect(draining) {
		return false
	}
	parser := &influx.Parser{}
	if err := parser.Init(); err != nil {
		r.log.Errorf("Line protocol parser: %v", err)
		return false
	}
	ov, _ := r.cfg.Output.(overlapper)
	var (
		batch    []telegraf.Metric
		end      mark
		dirty    bool      // end is past what was released or is in flight
		first    time.Time // when the batch's first line was queued
		inflight []*inflightWrite
		failed   bool // a Write ended without success: nothing later is released
		running  bool // a Write was abandoned while running
	)
	headDone := func() <-chan writeOutcome {
		if len(inflight) == 0 {
			return nil
		}
		return inflight[0].done
	}
	// settleHead takes the oldest Write's outcome and releases its batch
	// when it and every earlier one succeeded.
	settleHead := func(res writeOutcome) {
		w := inflight[0]
		inflight = inflight[1:]
		running = running || res.running
		if !res.ok {
			failed = true
			return
		}
		if !failed {
			r.q.Release(w.end)
		}
	}
	finish := func() bool {
		for len(inflight) > 0 {
			settleHead(<-inflight[0].done)
		}
		return running
	}
	for {
		if len(batch) == 0 {
			select {
			case <-draining:
				if failed {
					return finish()
				}
			default:
			}
		}
		if len(batch) < r.cfg.BatchSize {
			spoolReady, memReady := r.q.Ready()
			items, err := r.q.Read(r.cfg.BatchSize - len(batch))
			if err != nil {
				return finish()
			}
			for _, it := range items {
				ms, err := parser.Parse(it.payload)
				if err != nil {
					// The line's text is not logged: it may hold anything.
					why, _, _ := strings.Cut(err.Error(), " at ")
					r.log.Errorf("Skipping an input line of %d bytes that is not valid line protocol: %s", len(it.payload), why)
				}
				if len(batch) == 0 {
					first = it.appended
				}
				batch = append(batch, ms...)
				end.extend(it.mark)
				dirty = true
			}
			if len(items) > 0 && len(batch) < r.cfg.BatchSize {
				continue // there may be more already
			}
			if len(batch) == 0 {
				if dirty && len(inflight) == 0 {
					r.q.Release(end) // lines that did not parse
					end, dirty = mark{}, false
				}
				select {
				case <-draining:
					return finish() // the queue is empty
				default:
				}
				select {
				case <-spoolReady:
				case <-memReady:
				case res := <-headDone():
					settleHead(res)
				case <-draining:
				}
				continue
			}
			if len(batch) < r.cfg.BatchSize {
				if wait := time.Until(first.Add(r.cfg.BatchTimeout)); wait > 0 {
					t := time.NewTimer(wait)
					select {
					case <-spoolReady:
						t.Stop()
						continue
					case <-memReady:
						t.Stop()
						continue
					case res := <-headDone():
						t.Stop()
						settleHead(res)
						continue
					case <-t.C:
					case <-draining:
						t.Stop()
					}
				}
			}
		}
		solo := ov == nil || !ov.Overlappable(batch)
		// Room for this Write: fewer than maxWritesInFlight, and none at all
		// when this one or the one in flight must be alone.
		for len(inflight) > 0 && (solo || inflight[len(inflight)-1].solo || len(inflight) >= maxWritesInFlight) {
			settleHead(<-inflight[0].done)
		}
		if failed {
			// A Write gives up only at draining or abandon: stop there.
			return finish()
		}
		w := &inflightWrite{end: end, solo: solo, done: make(chan writeOutcome, 1)}
		go func(batch []telegraf.Metric) {
			ok, running := r.writeRetrying(batch, draining, abandon)
			w.done <- writeOutcome{ok: ok, running: running}
		}(batch)
		inflight = append(inflight, w)
		batch, end, dirty = nil, mark{}, false
	}
}

// connect calls Connect until it succeeds, backing off between attempts;
// false when draining came first. Meanwhile stdin is queued.
func (r *Runner) connect(draining <-chan struct{}) bool {
	backoff := r.minBackoff
	for {
		err := r.cfg.Output.Connect()
		if err == nil {
			if r.cfg.Conn != nil {
				if c := r.cfg.Conn(); c != nil {
					r.connected.Store(&c)
				}
			}
			return true
		}
		r.outage.fail("Connecting to the bridge", err)
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-draining:
			t.Stop()
			return false
		}
		backoff = min(2*backoff, r.maxBackoff)
	}
}

// writeRetrying writes batch until it succeeds (ok); a retry writes only
// what the failed Write left unsettled. After draining it does not retry,
// and at abandon it returns with the Write still running.
func (r *Runner) writeRetrying(batch []telegraf.Metric, draining, abandon <-chan struct{}) (ok, running bool) {
	backoff := r.minBackoff
	for {
		result := make(chan error, 1)
		go func() { result <- r.cfg.Output.Write(batch) }()
		var err error
		select {
		case err = <-result:
		case <-abandon:
			return false, true
		}
		if err == nil {
			r.outage.ok()
			return true, false
		}
		batch = unsettled(batch, err)
		select {
		case <-draining:
			r.log.Debugf("Writing %d metrics failed while stopping: %v", len(batch), err)
			return false, false
		default:
		}
		r.outage.fail(fmt.Sprintf("Writing %d metrics", len(batch)), err)
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-draining:
			t.Stop()
			return false, false
		}
		backoff = min(2*backoff, r.maxBackoff)
	}
}
