package emulator

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"runtime/debug"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

const memoryChildEnv = "OMNICORE_TELEMETRY_MEMORY_CHILD"

// TestTelemetryMemory reads every stored message through GET /v1/telemetry,
// page by page, and checks that the process's peak memory grows by less than
// the payload stored: the API never holds every payload twice (issue 14: 2,000
// messages of 200 KB took the emulator to 6 GB). It runs in a child process,
// whose peak RSS is its own.
func TestTelemetryMemory(t *testing.T) {
	if os.Getenv(memoryChildEnv) != "" {
		readAllTelemetry(t)
		return
	}
	if testing.Short() {
		t.Skip("stores 200 MB in a child process")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestTelemetryMemory$", "-test.v")
	cmd.Env = append(os.Environ(), memoryChildEnv+"=1")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	m := regexp.MustCompile(`stored (\d+) MB, peak RSS grew (\d+) MB`).FindSubmatch(out)
	require.NotNil(t, m, "%s", out)
	stored, _ := strconv.Atoi(string(m[1]))
	grew, _ := strconv.Atoi(string(m[2]))
	t.Logf("stored %d MB of payload; reading it all grew the peak RSS by %d MB", stored, grew)
	require.Less(t, grew, stored, "reading the telemetry held every payload twice")
}

func readAllTelemetry(t *testing.T) {
	// A tight GC target, so that the peak measures what the API holds rather
	// than how much garbage the collector lets pile up.
	debug.SetGCPercent(25)
	s, err := Start(WithTCPAddr(""), WithTLSAddr(""))
	require.NoError(t, err)
	defer s.Close()
	const n, size = 1000, 200 << 10
	s.mu.Lock()
	for i := range n {
		payload := bytes.Repeat([]byte{'a' + byte(i%26)}, size)
		s.recvTotal++
		s.storeLocked(Message{Index: i, Time: time.Now(), Payload: payload})
	}
	s.mu.Unlock()
	runtime.GC()
	before := peakRSS(t)

	api := httptest.NewServer(s.AdminHandler())
	defer api.Close()
	head := regexp.MustCompile(`^\{"next":(\d+),"more":(true|false)`)
	since := 0
	for {
		resp, err := http.Get(fmt.Sprintf("%s/v1/telemetry?since=%d", api.URL, since))
		require.NoError(t, err)
		br := bufio.NewReader(resp.Body)
		peek, _ := br.Peek(64)
		m := head.FindSubmatch(peek)
		_, err = io.Copy(io.Discard, br) // the client keeps nothing
		resp.Body.Close()
		require.NoError(t, err)
		require.NotNil(t, m, "%q", peek)
		since, _ = strconv.Atoi(string(m[1]))
		if string(m[2]) != "true" {
			break
		}
	}
	require.Equal(t, n, since)
	fmt.Printf("stored %d MB, peak RSS grew %d MB\n", n*size>>20, (peakRSS(t)-before)>>20)
}

func peakRSS(t *testing.T) int64 {
	var ru syscall.Rusage
	require.NoError(t, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return ru.Maxrss << 10 // KiB on Linux
}
