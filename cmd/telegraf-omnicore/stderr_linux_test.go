//go:build linux

package main

import (
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestWaitStderrRead: with bytes still in the pipe the wait ends at its
// bound and says so; once the reader has read them it ends at once, and
// when the reader is gone too. A stderr that is not a pipe is never waited
// on.
func TestWaitStderrRead(t *testing.T) {
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	defer w.Close()

	_, err = w.WriteString("E! the error that made the child exit\n")
	require.NoError(t, err)
	require.False(t, waitStderrRead(w, 50*time.Millisecond), "the reader has not read the line")

	buf := make([]byte, 100)
	n, err := r.Read(buf)
	require.NoError(t, err)
	require.Equal(t, "E! the error that made the child exit\n", string(buf[:n]))
	start := time.Now()
	require.True(t, waitStderrRead(w, time.Hour), "the pipe is empty")
	require.Less(t, time.Since(start), time.Minute, "an empty pipe is not waited on")

	// A reader that went away (Telegraf killed) is not waited for.
	_, err = w.WriteString("E! a last line\n")
	require.NoError(t, err)
	require.NoError(t, r.Close())
	start = time.Now()
	require.False(t, waitStderrRead(w, time.Hour))
	require.Less(t, time.Since(start), time.Minute, "a pipe nobody reads is not waited on")

	f, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
	require.NoError(t, err)
	defer f.Close()
	_, err = io.WriteString(f, "E! to a file\n")
	require.NoError(t, err)
	require.True(t, waitStderrRead(f, time.Hour), "a file is not a pipe")
}
