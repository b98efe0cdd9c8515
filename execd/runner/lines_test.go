package runner

import (
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestLineReader(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		max     int
		want    []string
		tooLong []int64
	}{
		{name: "lines", in: "a\nbb\nccc\n", max: 10, want: []string{"a", "bb", "ccc"}},
		{name: "last line without newline", in: "a\nbb", max: 10, want: []string{"a", "bb"}},
		{name: "empty lines skipped", in: "\n\na\n\n", max: 10, want: []string{"a"}},
		{name: "CRLF", in: "a\r\nb\r\n", max: 10, want: []string{"a", "b"}},
		{name: "exactly the limit", in: "12345\nx\n", max: 5, want: []string{"12345", "x"}},
		{name: "one over the limit", in: "123456\nx\n", max: 5, want: []string{"x"}, tooLong: []int64{7}},
		{name: "over the limit at EOF", in: "x\n123456", max: 5, want: []string{"x"}, tooLong: []int64{6}},
		{name: "longer than the read buffer", in: "a\n" + strings.Repeat("y", 3*readBuffer) + "\nb\n", max: 4 * readBuffer,
			want: []string{"a", strings.Repeat("y", 3*readBuffer), "b"}},
		{name: "far over the limit and the buffer", in: strings.Repeat("z", 5*readBuffer) + "\nb\n", max: readBuffer,
			want: []string{"b"}, tooLong: []int64{5*readBuffer + 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var tooLong []int64
			lr := newLineReader(strings.NewReader(tt.in), tt.max, nil, func(n int64) { tooLong = append(tooLong, n) })
			var got []string
			for {
				l, err := lr.Next()
				if errors.Is(err, io.EOF) {
					break
				}
				require.NoError(t, err)
				got = append(got, string(l))
			}
			require.Equal(t, tt.want, got)
			require.Equal(t, tt.tooLong, tooLong)
		})
	}
}

// hugeLine streams a line of n bytes, then a newline and rest, without
// holding the line in memory.
type hugeLine struct {
	n    int64
	rest *strings.Reader
}

func (h *hugeLine) Read(p []byte) (int, error) {
	if h.n > 0 {
		k := min(int64(len(p)), h.n)
		for i := range p[:k] {
			p[i] = 'x'
		}
		h.n -= k
		if h.n == 0 && k < int64(len(p)) {
			p[k] = '\n'
			return int(k) + 1, nil
		}
		return int(k), nil
	}
	if h.rest.Len() == 0 {
		return 0, io.EOF
	}
	if h.n == 0 {
		h.n = -1
		p[0] = '\n'
		return 1, nil
	}
	return h.rest.Read(p)
}

// A 300 MB line is discarded while it is read: the runner allocates about
// MaxLine for it, not 300 MB, logs W! with its size, and goes on.
func TestHugeLineIsDiscardedWhileRead(t *testing.T) {
	out := newTestOutput()
	h := start(t, out, "", 10, 10*time.Millisecond, nil)
	const size = 300 << 20
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := io.Copy(h.stdin, &hugeLine{n: size, rest: strings.NewReader(line("m", 1))})
	require.NoError(t, err)
	waitWritten(t, out, 1)
	runtime.ReadMemStats(&after)
	allocated := after.TotalAlloc - before.TotalAlloc
	t.Logf("allocated %d MiB while reading a %d MiB line", allocated>>20, size>>20)
	require.Less(t, allocated, uint64(32<<20), "the line is not buffered")
	require.Equal(t, 1, h.count('W', "Dropping an input line of 314572801 bytes: longer than the limit of 1048576 bytes"), "%v", h.texts())
	require.Equal(t, metricsFor("m", 1, 1)[0].Name(), flatten(out.getWritten())[0].Name())
}
