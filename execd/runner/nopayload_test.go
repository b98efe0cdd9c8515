package runner

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestSkippedLinesLogNoPayload: a stdin line that is not line protocol is
// skipped with an error that gives its size and never its bytes (the influx
// parser's own error quotes the line).
func TestSkippedLinesLogNoPayload(t *testing.T) {
	const secret = "S3cr3t-Wifi-Key-0042"
	for _, qt := range queues {
		t.Run(qt.name, func(t *testing.T) {
			out := newTestOutput()
			h := start(t, out, spoolDir(t, qt.spool), 1000, time.Hour, nil)
			h.write(t, line("m", 1)+"wifi psk="+secret+"\n"+"wifi,psk="+secret+" value= 1\n"+line("m", 4))
			require.NoError(t, h.stdin.Close())
			require.NoError(t, h.wait(t, 10*time.Second))
			require.Len(t, flatten(out.getWritten()), 2)
			require.Len(t, h.log.Errors(), 2, "errors: %v", h.log.Errors())
			require.Contains(t, h.log.Errors()[0], "Skipping an input line of 29 bytes that is not valid line protocol")
			require.Contains(t, h.log.Errors()[1], "Skipping an input line of 38 bytes that is not valid line protocol")
			for _, e := range h.log.Messages() {
				require.NotContains(t, e.Text, secret[:8], "payload bytes in a log line")
			}
		})
	}
}
