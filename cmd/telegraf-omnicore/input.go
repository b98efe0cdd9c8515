package main

import (
	"os"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/plugins/common/shim"
)

// runInput runs an initialised input through Telegraf's shim: the shim
// writes the metrics to stdout as line protocol (acknowledging tracking
// metrics once written), calls Gather every pollInterval (0 disables it),
// and stops on stdin EOF, SIGINT or SIGTERM by calling Stop and flushing
// stdout.
func runInput(input telegraf.Input, log telegraf.Logger, pollInterval time.Duration) error {
	s := shim.New()
	// Setting the field instead of calling AddInput keeps the logger and
	// the Init already done by main: AddInput would replace the plugin's
	// logger with the shim's unnamed one and call Init again.
	s.Input = &shimmedInput{input: input, log: log, stopTimeout: 4500 * time.Millisecond, exit: os.Exit}
	return s.Run(pollInterval)
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
