package ratelog

import (
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"
)

func TestOneLinePerKindPerInterval(t *testing.T) {
	log := &testutil.CaptureLogger{Name: "test"}
	l := New(log, 10*time.Second)
	now := time.Unix(1000, 0)
	l.now = func() time.Time { return now }

	for i := range 10000 {
		l.Warnf("refused", "device %d refused", i)
	}
	l.Errorf("other", "another kind")
	require.Equal(t, []string{"W! [test] device 0 refused"}, log.Warnings())
	require.Equal(t, []string{"E! [test] another kind"}, log.Errors())

	now = now.Add(9 * time.Second)
	l.Warnf("refused", "device %d refused", 10000)
	require.Len(t, log.Warnings(), 1, "still within the interval")

	now = now.Add(time.Second)
	l.Warnf("refused", "device %d refused", 10001)
	require.Equal(t, []string{
		"W! [test] device 0 refused",
		"W! [test] device 10001 refused (and 10000 more like it in the last 10s)",
	}, log.Warnings())
}
