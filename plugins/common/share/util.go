package share

import (
	"context"
	"math/rand/v2"
	"time"

	"github.com/influxdata/telegraf"
)

// jitter spreads d over [d/2, d) so that processes do not retry in step.
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2)
}

// sleepCtx waits d; false when ctx ended first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

type discardLogger struct{}

func (discardLogger) Level() telegraf.LogLevel         { return telegraf.Error }
func (discardLogger) AddAttribute(string, interface{}) {}
func (discardLogger) Errorf(string, ...interface{})    {}
func (discardLogger) Error(...interface{})             {}
func (discardLogger) Warnf(string, ...interface{})     {}
func (discardLogger) Warn(...interface{})              {}
func (discardLogger) Infof(string, ...interface{})     {}
func (discardLogger) Info(...interface{})              {}
func (discardLogger) Debugf(string, ...interface{})    {}
func (discardLogger) Debug(...interface{})             {}
func (discardLogger) Tracef(string, ...interface{})    {}
func (discardLogger) Trace(...interface{})             {}
