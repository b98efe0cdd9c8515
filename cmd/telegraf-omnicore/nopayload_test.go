package main

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestSkippedLinesLogNoPayload: a stdin line that is not line protocol is
// skipped with an error that names the line number and never its bytes (the
// influx parser's own error quotes the line).
func TestSkippedLinesLogNoPayload(t *testing.T) {
	const secret = "S3cr3t-Wifi-Key-0042"
	out := newTestOutput()
	h := startRunner(t, out, 1000, time.Hour, nil)
	h.write(t, line("m", 1)+"wifi psk="+secret+"\n"+"wifi,psk="+secret+" value= 1\n"+line("m", 4))
	require.NoError(t, h.stdin.Close())
	require.NoError(t, h.wait(t, 10*time.Second))
	require.Len(t, flatten(out.getWritten()), 2)
	require.Len(t, h.log.Errors(), 2, "errors: %v", h.log.Errors())
	require.Contains(t, h.log.Errors()[0], "Skipping line 2 of standard input")
	require.Contains(t, h.log.Errors()[1], "Skipping line 3 of standard input")
	for _, e := range h.log.Messages() {
		require.NotContains(t, e.Text, secret[:8], "payload bytes in a log line")
	}
}
