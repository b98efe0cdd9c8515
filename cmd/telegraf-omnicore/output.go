package main

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/influxdata/telegraf"
)

// outputRunner feeds an output plugin from stdin, where outputs.execd writes
// line protocol, without a spool (spool = false; spooledRunner is the
// default). It replaces the shim's output loop, which has three traps: a
// partial batch waits for the next full batch, a line over 64 KiB silently
// ends the process, and a failed Write drops the batch.
//
//   - stdin is read with Telegraf's streaming influx parser (metricReader):
//     no line limit; a line that does not parse is logged with its number
//     and skipped.
//   - A batch is written when it holds batchSize metrics or batchTimeout
//     after its first metric arrived, whichever comes first.
//   - A Write that fails is retried with what it left unsettled (its error
//     names the metrics acknowledged or given up on; see unsettled) after a
//     back-off that doubles from minBackoff to maxBackoff. Meanwhile stdin is not read:
//     the pipe fills and outputs.execd's Write blocks, so the backlog stays
//     in Telegraf's own output buffer (metric_buffer_limit) and nothing is
//     lost here.
//   - On stdin EOF (Telegraf stopping or restarting the plugin) or on
//     SIGTERM/SIGINT the last batch is written and the plugin closed within
//     shutdownTimeout; metrics that could not be written in time are counted
//     in an error and the exit status is non-zero.
type outputRunner struct {
	output       telegraf.Output
	log          telegraf.Logger
	batchSize    int
	batchTimeout time.Duration

	minBackoff, maxBackoff time.Duration
	// shutdownTimeout bounds the time from EOF or a signal to the return of
	// run; closeReserve of it is kept for Close.
	shutdownTimeout time.Duration
	closeReserve    time.Duration
}

func newOutputRunner(output telegraf.Output, log telegraf.Logger, batchSize int, batchTimeout time.Duration) *outputRunner {
	return &outputRunner{
		output:          output,
		log:             log,
		batchSize:       batchSize,
		batchTimeout:    batchTimeout,
		minBackoff:      time.Second,
		maxBackoff:      30 * time.Second,
		shutdownTimeout: 5 * time.Second,
		closeReserve:    time.Second,
	}
}

// errUnacknowledged is returned by run when metrics could not be written
// before the shutdown deadline.
var errUnacknowledged = errors.New("metrics not acknowledged")

// run connects the output, processes stdin until EOF or stop is closed, and
// closes the output. It returns an error wrapping errUnacknowledged when
// metrics were lost at shutdown.
func (r *outputRunner) run(stdin io.Reader, stop <-chan struct{}) error {
	if !r.connect(stop) {
		return nil
	}

	metrics := make(chan telegraf.Metric)
	done := make(chan struct{})
	defer close(done)
	go r.read(stdin, metrics, done)

	batch := make([]telegraf.Metric, 0, r.batchSize)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()

	for {
		select {
		case m, ok := <-metrics:
			if !ok {
				r.log.Debug("Standard input closed; writing the last batch and stopping")
				return r.shutdown(time.Now(), batch)
			}
			batch = append(batch, m)
			if len(batch) == 1 && len(batch) < r.batchSize {
				timer.Reset(r.batchTimeout)
			}
			if len(batch) < r.batchSize {
				continue
			}
			timer.Stop()
		case <-timer.C:
		case <-stop:
			r.log.Debug("Signalled to stop; writing the last batch and stopping")
			return r.shutdown(time.Now(), batch)
		}
		if rest, pending, stopped := r.writeRetrying(batch, stop); stopped {
			return r.shutdownPending(time.Now(), rest, pending)
		}
		batch = make([]telegraf.Metric, 0, r.batchSize)
	}
}

// connect calls Connect until it succeeds, backing off between attempts,
// without reading stdin. It returns false when stop arrived first.
func (r *outputRunner) connect(stop <-chan struct{}) bool {
	backoff := r.minBackoff
	for {
		err := r.output.Connect()
		if err == nil {
			return true
		}
		r.log.Errorf("Connecting the output failed, retrying in %s: %v", backoff, err)
		select {
		case <-time.After(backoff):
		case <-stop:
			return false
		}
		backoff = min(2*backoff, r.maxBackoff)
	}
}

// read parses stdin and hands the metrics to run one at a time. While run
// is busy writing, read blocks and so stops reading stdin.
func (r *outputRunner) read(stdin io.Reader, metrics chan<- telegraf.Metric, done <-chan struct{}) {
	defer close(metrics)
	mr := newMetricReader(stdin, r.log, nil)
	for {
		m, err := mr.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return
			}
			select {
			case <-done: // the run loop is gone: nothing to report
			default:
				r.log.Errorf("Reading standard input failed: %v", err)
			}
			return
		}
		select {
		case metrics <- m:
		case <-done:
			return
		}
	}
}

// writeRetrying writes batch until it succeeds; a retry writes only what
// the failed Write left unsettled. When stop arrives first it returns
// stopped with what is left of the batch (rest), and pending is the result
// of a Write of rest still running (nil when none is).
func (r *outputRunner) writeRetrying(batch []telegraf.Metric, stop <-chan struct{}) (rest []telegraf.Metric, pending <-chan error, stopped bool) {
	backoff := r.minBackoff
	for attempt := 1; ; attempt++ {
		result := r.writeAsync(batch)
		var err error
		select {
		case err = <-result:
		case <-stop:
			return batch, result, true
		}
		if err == nil {
			if attempt > 1 {
				r.log.Infof("Wrote the rest of the batch (%d metrics) at attempt %d", len(batch), attempt)
			}
			return nil, nil, false
		}
		batch = unsettled(batch, err)
		r.log.Errorf("Writing metrics failed (attempt %d), retrying the %d not acknowledged in %s; standard input is not read meanwhile, so Telegraf buffers new metrics: %v",
			attempt, len(batch), backoff, err)
		select {
		case <-time.After(backoff):
		case <-stop:
			return batch, nil, true
		}
		backoff = min(2*backoff, r.maxBackoff)
	}
}

// writeAsync runs Write in its own goroutine, so that a Write that blocks
// cannot hold the process past its shutdown deadline. Writes never overlap:
// the caller waits for the result before the next one.
func (r *outputRunner) writeAsync(batch []telegraf.Metric) <-chan error {
	result := make(chan error, 1)
	go func() { result <- r.output.Write(batch) }()
	return result
}

// shutdown writes what is left of batch and closes the output, all before
// start+shutdownTimeout.
func (r *outputRunner) shutdown(start time.Time, batch []telegraf.Metric) error {
	return r.shutdownPending(start, batch, nil)
}

// shutdownPending is shutdown when a Write of batch may still be running:
// pending is its result.
func (r *outputRunner) shutdownPending(start time.Time, batch []telegraf.Metric, pending <-chan error) error {
	deadline := start.Add(r.shutdownTimeout)
	writeDeadline := deadline.Add(-r.closeReserve)
	written, writing := true, false
	if len(batch) > 0 {
		written, writing, batch = r.finalWrite(batch, pending, writeDeadline)
	}
	if writing {
		// Close must not run concurrently with Write; the process exits
		// without it, which closes the connection all the same.
		r.log.Error("Not closing the output: its last Write is still running")
	} else {
		closed := make(chan error, 1)
		go func() { closed <- r.output.Close() }()
		select {
		case err := <-closed:
			if err != nil {
				r.log.Errorf("Closing the output failed: %v", err)
			}
		case <-time.After(time.Until(deadline)):
			r.log.Errorf("Closing the output did not finish within %s of the stop; exiting anyway", r.shutdownTimeout)
		}
	}
	if !written {
		return fmt.Errorf("%d %w by the output before the %s shutdown deadline; they are lost", len(batch), errUnacknowledged, r.shutdownTimeout)
	}
	return nil
}

// finalWrite writes batch, retrying until writeDeadline. pending, when not
// nil, is the result of a Write of batch already running, which is waited
// for first. It reports whether the batch was written, whether a Write is
// still running at the deadline, and what is left of the batch (a retry
// writes only what a failed Write left unsettled).
func (r *outputRunner) finalWrite(batch []telegraf.Metric, pending <-chan error, writeDeadline time.Time) (written, writing bool, rest []telegraf.Metric) {
	backoff := r.minBackoff
	deadline := time.NewTimer(time.Until(writeDeadline))
	defer deadline.Stop()
	for attempt := 1; ; attempt++ {
		result := pending
		pending = nil
		if result == nil {
			result = r.writeAsync(batch)
		}
		var err error
		select {
		case err = <-result:
		case <-deadline.C:
			select {
			case err = <-result: // finished just in time
			default:
				r.log.Errorf("Writing the last %d metrics did not finish before the shutdown deadline", len(batch))
				return false, true, batch
			}
		}
		if err == nil {
			return true, false, nil
		}
		batch = unsettled(batch, err)
		// Retry while the next attempt would have at least minBackoff to
		// run before the deadline.
		remaining := time.Until(writeDeadline)
		if remaining < 2*r.minBackoff {
			r.log.Errorf("Writing the last %d metrics failed (attempt %d), no time left to retry: %v", len(batch), attempt, err)
			return false, false, batch
		}
		wait := min(backoff, remaining-r.minBackoff)
		r.log.Errorf("Writing the last %d metrics failed (attempt %d), retrying in %s: %v", len(batch), attempt, wait.Round(time.Millisecond), err)
		time.Sleep(wait)
		backoff = min(2*backoff, r.maxBackoff)
	}
}
