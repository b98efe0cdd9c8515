package main

import (
	"bufio"
	"io"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf/testutil"
)

// relayGathers gathers on every tick until the first line of stdin, then on
// lines only; stdin's EOF ends it.
func TestRelayGathers(t *testing.T) {
	stdinR, stdinW := io.Pipe()
	outR, outW := io.Pipe()
	tick := make(chan time.Time)
	log := &testutil.CaptureLogger{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		relayGathers(stdinR, outW, tick, log)
	}()
	out := bufio.NewReader(outR)
	gather := func(what string) {
		t.Helper()
		b, err := out.ReadByte()
		require.NoError(t, err, what)
		require.Equal(t, byte('\n'), b, what)
	}

	for range 3 {
		tick <- time.Now()
		gather("a tick before any signal")
	}
	for range 2 {
		_, err := io.WriteString(stdinW, "\n")
		require.NoError(t, err)
		gather("a line")
	}
	var said int
	for _, m := range log.Messages() {
		if m.Text == `Gathering statistics on Telegraf's signal (signal = "STDIN"); -poll_interval is not used` {
			said++
		}
	}
	require.Equal(t, 1, said)
	// The relay waits in its select; a tick it still listened to would be
	// taken.
	for range 1000 {
		select {
		case tick <- time.Now():
			t.Fatal("a tick was taken after the first signal")
		default:
			runtime.Gosched()
		}
	}
	require.NoError(t, stdinW.Close())
	<-done
	_, err := out.ReadByte()
	require.ErrorIs(t, err, io.EOF, "EOF on stdin closes the shim's input")
}
