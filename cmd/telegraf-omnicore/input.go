package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/plugins/common/shim"
)

// runInput runs an initialised input through Telegraf's shim: the shim
// writes the metrics to stdout as line protocol (acknowledging tracking
// metrics once written), calls Gather for every line on stdin, and stops on
// stdin EOF, SIGINT or SIGTERM by calling Stop and flushing stdout.
//
// The shim reads a pipe that relayGathers fills from stdin: with
// signal = "STDIN" on [[inputs.execd]], Telegraf writes a line at every
// interval, so Telegraf's clock drives the gathers; until the first such
// line, a gather is triggered every pollInterval (0: never), the fallback
// for signal = "none".
func runInput(input telegraf.Input, log telegraf.Logger, pollInterval time.Duration, stdin io.Reader) error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("creating the gather pipe: %w", err)
	}
	defer r.Close()
	// shim.New reads its input from os.Stdin; this process has no other
	// use for it.
	os.Stdin = r
	var tick <-chan time.Time
	if pollInterval > 0 {
		t := time.NewTicker(pollInterval)
		defer t.Stop()
		tick = t.C
	}
	go relayGathers(stdin, w, tick, log)
	s := shim.New()
	// Setting the field instead of calling AddInput keeps the logger and
	// the Init already done by main: AddInput would replace the plugin's
	// logger with the shim's unnamed one and call Init again.
	s.Input = &shimmedInput{input: input, log: log, stopTimeout: 4500 * time.Millisecond, exit: os.Exit}
	return s.Run(shim.PollIntervalDisabled)
}

// relayGathers writes a line to w for every line of stdin and, until the
// first one, for every tick (nil: never); it closes w at stdin's EOF, which
// stops the shim.
func relayGathers(stdin io.Reader, w io.WriteCloser, tick <-chan time.Time, log telegraf.Logger) {
	defer w.Close()
	lines := make(chan struct{})
	go func() {
		defer close(lines)
		br := bufio.NewReader(stdin)
		for {
			_, err := br.ReadSlice('\n')
			if err == bufio.ErrBufferFull {
				continue // a long line is one signal: read on to its end
			}
			if err != nil {
				return
			}
			lines <- struct{}{}
		}
	}()
	signalled := false
	for {
		select {
		case _, ok := <-lines:
			if !ok {
				return
			}
			if !signalled {
				signalled = true
				tick = nil
				log.Debug("Gathering statistics on Telegraf's signal (signal = \"STDIN\"); -poll_interval is not used")
			}
		case <-tick:
		}
		if _, err := w.Write([]byte("\n")); err != nil {
			return
		}
	}
}

// shimmedInput adapts the plugin for the shim: Gather errors are logged with
// an "E! " prefix (the shim prints them raw, which execd shows as
// `stderr: "..."`), and Stop is bounded so that the process exits within
// execd's 5 s grace period even if the bridge does not answer.
type shimmedInput struct {
	input       telegraf.Input
	log         telegraf.Logger
	stopTimeout time.Duration
	// exit ends the process when Stop does not return in time: the shim
	// would otherwise close the metric channel under the plugin's feet.
	exit func(code int)
}

func (*shimmedInput) SampleConfig() string { return "" }

func (s *shimmedInput) Gather(acc telegraf.Accumulator) error {
	if err := s.input.Gather(acc); err != nil {
		s.log.Errorf("Gather failed: %v", err)
	}
	return nil
}

func (s *shimmedInput) Start(acc telegraf.Accumulator) error {
	if si, ok := s.input.(telegraf.ServiceInput); ok {
		return si.Start(acc)
	}
	return nil
}

func (s *shimmedInput) Stop() {
	si, ok := s.input.(telegraf.ServiceInput)
	if !ok {
		return
	}
	done := make(chan struct{})
	go func() {
		si.Stop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(s.stopTimeout):
		s.log.Errorf("Stopping the input did not finish within %s; exiting anyway", s.stopTimeout)
		s.exit(1)
	}
}
