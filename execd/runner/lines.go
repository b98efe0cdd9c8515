package runner

import (
	"bufio"
	"errors"
	"io"
)

// MaxLine is the longest input line kept, newline excluded: four times the
// bridge's largest payload (256 KB of telemetry), so that every metric the
// bridge could take passes, while one runaway line costs at most this much
// memory. A longer line is discarded while it is read (never buffered whole),
// counted and logged with its size.
const MaxLine = 1 << 20

// readBuffer is the read buffer in front of the line splitter.
const readBuffer = 64 << 10

// lineReader splits standard input into lines, as outputs.execd writes them
// with Telegraf's influx serializer: one metric per line, newlines inside
// values escaped. A hand-written splitter because bufio.Scanner stops for
// good at a line over its limit, while a line over MaxLine must be skipped
// and the stream go on.
type lineReader struct {
	r    *bufio.Reader
	max  int
	buf  []byte
	idle func() // called when all input read so far was handed out
	// tooLong is called with the size of a line discarded for its length.
	tooLong func(size int64)
}

func newLineReader(r io.Reader, max int, idle func(), tooLong func(int64)) *lineReader {
	return &lineReader{r: bufio.NewReaderSize(r, readBuffer), max: max, idle: idle, tooLong: tooLong}
}

// Next returns the next non-empty line without its newline; the slice is
// valid until the next call. It returns io.EOF at the end of the input (a
// last line without a newline is returned first), or the read error.
func (lr *lineReader) Next() ([]byte, error) {
	for {
		if lr.idle != nil && lr.r.Buffered() == 0 {
			lr.idle()
		}
		// The common case: the whole line is in the read buffer; it is
		// handed out from there, without a copy.
		if chunk, err := lr.r.ReadSlice('\n'); err == nil {
			if line := trimEOL(chunk); len(line) > 0 && len(line) <= lr.max {
				return line, nil
			} else if len(line) > lr.max {
				if lr.tooLong != nil {
					lr.tooLong(int64(len(chunk)))
				}
			}
			continue
		} else if !errors.Is(err, bufio.ErrBufferFull) && (!errors.Is(err, io.EOF) || len(chunk) == 0) {
			return nil, err
		} else {
			lr.buf = append(lr.buf[:0], chunk...)
			if errors.Is(err, io.EOF) {
				if line := trimEOL(lr.buf); len(line) > 0 && len(line) <= lr.max {
					return line, nil
				} else if len(line) > lr.max && lr.tooLong != nil {
					lr.tooLong(int64(len(lr.buf)))
				}
				continue
			}
		}
		size := int64(len(lr.buf)) // bytes of the line so far, kept or not
		for {
			chunk, err := lr.r.ReadSlice('\n')
			size += int64(len(chunk))
			if size <= int64(lr.max)+1 { // +1: the newline
				lr.buf = append(lr.buf, chunk...)
			} else if lr.buf != nil {
				lr.buf = lr.buf[:0] // over the limit: drop what was kept
			}
			if errors.Is(err, bufio.ErrBufferFull) {
				continue
			}
			if err != nil && (!errors.Is(err, io.EOF) || size == 0) {
				return nil, err
			}
			break // a newline, or the last line at EOF
		}
		line := trimEOL(lr.buf)
		if size > int64(len(lr.buf)) || len(line) > lr.max {
			if lr.tooLong != nil {
				lr.tooLong(size)
			}
			continue
		}
		if len(line) == 0 {
			continue
		}
		return line, nil
	}
}

func trimEOL(b []byte) []byte {
	if n := len(b); n > 0 && b[n-1] == '\n' {
		b = b[:n-1]
	}
	if n := len(b); n > 0 && b[n-1] == '\r' {
		b = b[:n-1]
	}
	return b
}
