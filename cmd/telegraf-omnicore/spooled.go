package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/plugins/parsers/influx"
	serializer "github.com/influxdata/telegraf/plugins/serializers/influx"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
)

// spooledRunner feeds an output plugin from stdin through a spool on disk
// (the default; outputRunner is spool = false):
//
//   - The append loop reads stdin continuously, with Telegraf's streaming
//     influx parser, and appends every metric (as line protocol) to the
//     spool before anything else happens to it. The spool is committed
//     whenever stdin has nothing more to read, so the pipe from outputs.execd
//     stays nearly empty and what Telegraf handed over is on disk (fsync'ed
//     within spool_sync_interval) within milliseconds. Only a full spool
//     (spool_full = "backpressure") stops the reading.
//   - The publish loop reads the spool in order, in batches of batchSize
//     (written batchTimeout after the first metric was spooled at the
//     latest), calls Write and releases the batch from the spool once Write
//     succeeded, i.e. the bridge acknowledged every message, and every
//     earlier batch was released. Up to maxWritesInFlight Writes run at
//     once (a batch with a state message runs alone). A failed Write is
//     retried after a back-off with what it left unacknowledged; stdin is
//     read meanwhile.
//   - A new process replays what the spool holds first, then new metrics.
//   - On stdin EOF or SIGTERM the process returns within exitTimeout,
//     bridge or no bridge: after a signal stdin is still read (what Telegraf
//     already wrote into the pipe is spooled) until EOF or most of the
//     budget is gone; the pending batch is written if the bridge takes it
//     in time; whatever was not acknowledged stays in the spool for the next
//     start.
type spooledRunner struct {
	output       telegraf.Output
	log          telegraf.Logger
	batchSize    int
	batchTimeout time.Duration
	opts         spool.Options

	minBackoff, maxBackoff time.Duration
	exitTimeout            time.Duration
	reportEvery            time.Duration

	// conn returns the plugin's gateway connection after Connect, for the
	// spool's gauges (nil when the output has none).
	conn   func() gateway.Conn
	source string // the gauges' source name

	appendMu sync.Mutex // held by the append loop while it appends or commits
	closing  bool       // set under appendMu: the append loop stops

	connected   atomic.Pointer[gateway.Conn]
	tooLarge    atomic.Int64
	warnedFull  bool
	reportMu    sync.Mutex
	lastReport  map[string]int64
	reportCount int
}

func newSpooledRunner(output telegraf.Output, log telegraf.Logger, batchSize int, batchTimeout time.Duration, opts spool.Options) *spooledRunner {
	return &spooledRunner{
		output:       output,
		log:          log,
		batchSize:    batchSize,
		batchTimeout: batchTimeout,
		opts:         opts,
		minBackoff:   time.Second,
		// A retry is cheap (a Write to a disconnected gateway gives up after
		// a second, and the metrics wait on disk, not in Telegraf), while a
		// long back-off is paid in full after the bridge comes back: so the
		// cap stays short.
		maxBackoff:  5 * time.Second,
		exitTimeout: 900 * time.Millisecond, // a second with the process's own exit
		reportEvery: gateway.GaugeTTL / 6,
	}
}

// run opens the spool, runs the loops until stdin EOF or stop, and closes
// everything within exitTimeout of that.
func (r *spooledRunner) run(stdin io.Reader, stop <-chan struct{}) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	r.opts.Log = r.log
	sp, err := spool.Open(ctx, r.opts)
	if err != nil {
		if ctx.Err() != nil {
			r.log.Info("Stopped while waiting for the spool's lock")
			return nil
		}
		return fmt.Errorf("opening the spool: %w", err)
	}
	st := sp.Stats()
	if st.Replayed > 0 {
		r.log.Infof("Replaying %d metrics (%d bytes) spooled by an earlier run in %s, before new ones", st.Replayed, st.Bytes, r.opts.Dir)
	} else {
		r.log.Debugf("Spooling to %s", r.opts.Dir)
	}

	eof := make(chan struct{})
	stopAppending := make(chan struct{})
	go r.appendLoop(stdin, sp, eof, stopAppending)

	draining := make(chan struct{}) // write what is there, no waiting, no retries
	abandon := make(chan struct{})  // return even with a Write running
	published := make(chan bool, 1) // true when a Write is still running
	go func() { published <- r.publishLoop(sp, draining, abandon) }()

	stopReports := make(chan struct{})
	reported := make(chan struct{})
	go r.reportLoop(sp, stopReports, reported)

	var deadline time.Time
	select {
	case <-eof:
		deadline = time.Now().Add(r.exitTimeout)
		r.log.Debug("Standard input closed; stopping")
	case <-stop:
		deadline = time.Now().Add(r.exitTimeout)
		r.log.Debug("Signalled to stop; spooling what is left in the pipe, then stopping")
		// What Telegraf already wrote into the pipe counts as delivered
		// for it: take it, until EOF or 40% of the budget.
		t := time.NewTimer(time.Until(deadline) * 4 / 10)
		select {
		case <-eof:
		case <-t.C:
		}
		t.Stop()
	}
	r.appendMu.Lock()
	r.closing = true
	if err := sp.Commit(); err != nil && !errors.Is(err, spool.ErrClosed) {
		r.log.Errorf("Committing the spool: %v", err)
	}
	r.appendMu.Unlock()
	close(stopAppending)

	// The publisher writes what is left while the budget lasts.
	close(draining)
	writing := false
	t := time.NewTimer(time.Until(deadline) * 8 / 10)
	select {
	case writing = <-published:
	case <-t.C:
		close(abandon)
		select {
		case writing = <-published:
		case <-time.After(50 * time.Millisecond):
			writing = true // stuck in Connect: treat it as a running Write
		}
	}
	t.Stop()
	close(stopReports)
	<-reported

	left := sp.Stats()
	if err := sp.Close(); err != nil {
		r.log.Errorf("Closing the spool: %v", err)
	}
	if left.Records > 0 {
		r.log.Infof("Stopping with %d metrics in the spool (not acknowledged by the bridge yet); they are sent after the next start", left.Records)
	}
	if writing {
		// Close must not run concurrently with Write; the process exits
		// without it, which closes the connection all the same.
		r.log.Debug("Not closing the output: a Write is still running")
		return nil
	}
	closed := make(chan error, 1)
	go func() { closed <- r.output.Close() }()
	t = time.NewTimer(max(time.Until(deadline), 50*time.Millisecond))
	defer t.Stop()
	select {
	case err := <-closed:
		if err != nil {
			r.log.Errorf("Closing the output failed: %v", err)
		}
	case <-t.C:
		r.log.Debugf("Closing the output did not finish within %s of the stop; exiting anyway", r.exitTimeout)
	}
	return nil
}

// appendLoop spools stdin until EOF or stopAppending; eof is closed when it
// returns.
func (r *spooledRunner) appendLoop(stdin io.Reader, sp *spool.Spool, eof chan<- struct{}, stopAppending <-chan struct{}) {
	defer close(eof)
	ser := &serializer.Serializer{UintSupport: true}
	if err := ser.Init(); err != nil {
		r.log.Errorf("Line protocol serializer: %v", err)
		return
	}
	commit := func() {
		r.appendMu.Lock()
		defer r.appendMu.Unlock()
		if r.closing {
			return
		}
		if err := sp.Commit(); err != nil {
			r.log.Errorf("Committing the spool: %v", err)
		}
	}
	mr := newMetricReader(stdin, r.log, commit)
	for {
		m, err := mr.Next()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				r.log.Errorf("Reading standard input failed: %v", err)
			}
			commit()
			return
		}
		line, err := ser.Serialize(m)
		if err != nil {
			r.log.Errorf("Dropping metric %q: it cannot be written as line protocol for the spool: %v", m.Name(), err)
			continue
		}
		if !r.appendRetrying(sp, line, stopAppending) {
			return
		}
	}
}

// appendRetrying appends line, waiting while the spool is full and
// retrying after an error; false when stopAppending came first.
func (r *spooledRunner) appendRetrying(sp *spool.Spool, line []byte, stopAppending <-chan struct{}) bool {
	backoff := r.minBackoff
	for {
		space := sp.Space()
		r.appendMu.Lock()
		if r.closing {
			r.appendMu.Unlock()
			return false
		}
		err := sp.Append(line)
		r.appendMu.Unlock()
		switch {
		case err == nil:
			return true
		case errors.Is(err, spool.ErrFull):
			if !r.warnedFull {
				r.warnedFull = true
				r.log.Warnf("The spool is full (spool_max_size %d bytes): not reading standard input until the bridge acknowledges metrics; "+
					"Telegraf keeps new metrics in its buffer meanwhile (metric_buffer_limit). Logged once", r.opts.MaxSize)
			} else {
				r.log.Debug("The spool is full: waiting for the bridge")
			}
			select {
			case <-space:
			case <-stopAppending:
				return false
			}
		case errors.Is(err, spool.ErrTooLarge):
			r.tooLarge.Add(1)
			r.log.Errorf("Dropping a metric of %d bytes of line protocol: it does not fit in the spool (spool_max_size %d bytes)", len(line), r.opts.MaxSize)
			return true
		case errors.Is(err, spool.ErrClosed):
			return false
		default:
			r.log.Errorf("Appending to the spool failed, retrying in %s; standard input is not read meanwhile: %v", backoff, err)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-stopAppending:
				t.Stop()
				return false
			}
			backoff = min(2*backoff, r.maxBackoff)
		}
	}
}

// maxWritesInFlight is how many Writes the publish loop keeps running at
// once. While a Write waits for the last PUBACKs of its batch, the next
// batch is already being read, routed and published, so the connection
// never idles between batches, and one message whose PUBACK the bridge
// withholds (resent after the ack timeout) holds up its own batch, not
// the pipe. Batches are released from the spool in order, each once every
// earlier one is acknowledged.
const maxWritesInFlight = 4

// overlapper is implemented by outputs.omnicore: whether a batch may be
// written while other Writes are in flight (not when it holds a device's
// state, whose order matters). An output without it is written one batch
// at a time.
type overlapper interface {
	Overlappable([]telegraf.Metric) bool
}

// spooledWrite is a batch being written by its own goroutine.
type spooledWrite struct {
	end  spool.Position
	solo bool // written with no other Write in flight
	done chan writeOutcome
}

type writeOutcome struct{ ok, running bool }

// publishLoop connects the output and writes the spool's records in batches
// until draining (then it writes what is left without waiting and without
// retrying) or abandon. Up to maxWritesInFlight Writes run at once. It
// returns true when it left a Write running.
func (r *spooledRunner) publishLoop(sp *spool.Spool, draining, abandon <-chan struct{}) bool {
	if !r.connect(draining) {
		return false
	}
	parser := &influx.Parser{}
	if err := parser.Init(); err != nil {
		r.log.Errorf("Line protocol parser: %v", err)
		return false
	}
	ov, _ := r.output.(overlapper)
	var (
		batch    []telegraf.Metric
		end      spool.Position
		dirty    bool      // end is past what was released or is in flight
		first    time.Time // when the batch's first record was spooled
		inflight []*spooledWrite
		failed   bool // a Write ended without success: nothing later is released
		running  bool // a Write was abandoned while running
	)
	// headDone is the completion of the oldest Write in flight (nil: none).
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
		if failed {
			return
		}
		if err := sp.Release(w.end); err != nil && !errors.Is(err, spool.ErrClosed) {
			r.log.Errorf("Releasing written metrics from the spool: %v", err)
		}
	}
	// finish waits for every Write in flight (each ends at draining or
	// abandon) and reports whether one is still running.
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
				return finish() // the last batch was written
			default:
			}
			if failed {
				// Draining, a Write failed: what follows stays in the
				// spool for the next start.
				return finish()
			}
		}
		if len(batch) < r.batchSize {
			ready := sp.Ready()
			recs, err := sp.Read(r.batchSize - len(batch))
			if err != nil {
				return finish()
			}
			for _, rec := range recs {
				ms, err := parser.Parse(rec.Payload)
				if err != nil {
					r.log.Errorf("Skipping a spooled record that is not line protocol: %v", err)
				}
				if len(batch) == 0 {
					first = rec.Appended
				}
				batch = append(batch, ms...)
				end, dirty = rec.End, true
			}
			if len(recs) > 0 && len(batch) < r.batchSize {
				continue // there may be more already
			}
			if len(batch) == 0 {
				if dirty && len(inflight) == 0 {
					_ = sp.Release(end) // records that did not parse
					dirty = false
				}
				select {
				case <-ready:
				case res := <-headDone():
					settleHead(res)
				case <-draining:
					return finish()
				}
				continue
			}
			if len(batch) < r.batchSize {
				if wait := time.Until(first.Add(r.batchTimeout)); wait > 0 {
					t := time.NewTimer(wait)
					select {
					case <-ready:
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
			return finish()
		}
		w := &spooledWrite{end: end, solo: solo, done: make(chan writeOutcome, 1)}
		go func(batch []telegraf.Metric) {
			ok, running := r.writeRetrying(batch, draining, abandon)
			w.done <- writeOutcome{ok: ok, running: running}
		}(batch)
		inflight = append(inflight, w)
		batch, dirty = nil, false
	}
}

// connect calls Connect until it succeeds, backing off between attempts;
// false when draining came first. Meanwhile stdin is spooled.
func (r *spooledRunner) connect(draining <-chan struct{}) bool {
	backoff := r.minBackoff
	for {
		err := r.output.Connect()
		if err == nil {
			if r.conn != nil {
				if c := r.conn(); c != nil {
					r.connected.Store(&c)
				}
			}
			return true
		}
		r.log.Errorf("Connecting the output failed, retrying in %s; standard input is spooled meanwhile: %v", backoff, err)
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
func (r *spooledRunner) writeRetrying(batch []telegraf.Metric, draining, abandon <-chan struct{}) (ok, running bool) {
	backoff := r.minBackoff
	for attempt := 1; ; attempt++ {
		result := make(chan error, 1)
		go func() { result <- r.output.Write(batch) }()
		var err error
		select {
		case err = <-result:
		case <-abandon:
			return false, true
		}
		if err == nil {
			if attempt > 1 {
				r.log.Infof("Wrote the rest of a batch (%d metrics) at attempt %d", len(batch), attempt)
			}
			return true, false
		}
		batch = unsettled(batch, err)
		select {
		case <-draining:
			r.log.Debugf("Writing %d metrics failed while stopping; they stay in the spool: %v", len(batch), err)
			return false, false
		default:
		}
		r.log.Errorf("Writing metrics failed (attempt %d), retrying the %d not acknowledged in %s; they stay in the spool, and standard input is still spooled: %v",
			attempt, len(batch), backoff, err)
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

// gauges are the spool's figures as omnicore_gateway fields.
func (r *spooledRunner) gauges(st spool.Stats) map[string]int64 {
	return map[string]int64{
		"spool_bytes":             st.Bytes,
		"spool_records":           st.Records,
		"spool_oldest_age_ms":     st.OldestAge.Milliseconds(),
		"spool_replayed":          st.Replayed,
		"spool_truncated_bytes":   st.TruncatedBytes,
		"spool_dropped_full":      st.DroppedFull,
		"spool_dropped_too_large": r.tooLarge.Load(),
		"spool_corrupt_segments":  st.CorruptSegments,
	}
}

// reportLoop reports the gauges through the gateway connection every
// reportEvery (well within gateway.GaugeTTL/4) once connected, until stop.
func (r *spooledRunner) reportLoop(sp *spool.Spool, stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	// Every 100 ms until connected, so that the gauges show at once.
	t := time.NewTimer(100 * time.Millisecond)
	defer t.Stop()
	report := func() {
		c := r.connected.Load()
		if c == nil {
			t.Reset(100 * time.Millisecond)
			return
		}
		t.Reset(min(r.reportEvery, gateway.GaugeTTL/4))
		g := r.gauges(sp.Stats())
		(*c).ReportGauges(r.source, g)
		r.reportMu.Lock()
		r.lastReport, r.reportCount = g, r.reportCount+1
		r.reportMu.Unlock()
	}
	for {
		select {
		case <-t.C:
			report()
		case <-stop:
			return
		}
	}
}
