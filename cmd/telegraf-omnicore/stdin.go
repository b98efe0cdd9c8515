package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/plugins/parsers/influx"
)

// stdinBuffer is the read buffer in front of the parser.
const stdinBuffer = 64 << 10

// largeLine is the line length after which the parser is replaced by a new
// one, at the next metric boundary: Telegraf's stream parser grows its
// buffer to the longest line it has seen and never shrinks it, so one 10 MB
// line would otherwise keep tens of MB for the life of the process.
const largeLine = 1 << 20

// metricReader reads metrics from line protocol on stdin with Telegraf's
// streaming influx parser (no line limit; strings may span lines). Lines
// that do not parse are logged with their number and skipped.
type metricReader struct {
	log    telegraf.Logger
	in     *lineFeeder
	parser *influx.StreamParser
	// consumed is the bytes the current parser consumed: the sum of its
	// positions after each Next, since each Next starts by discarding what
	// the previous one parsed.
	consumed int64
	// longest is the longest text one Next of the current parser consumed.
	longest int
	// lineBase is the number of lines read by earlier parsers.
	lineBase int
	// replaced counts parser replacements (tests).
	replaced int
}

// newMetricReader reads from r; idle, when not nil, is called whenever all
// the input read so far was parsed and the next read may block.
func newMetricReader(r io.Reader, log telegraf.Logger, idle func()) *metricReader {
	in := &lineFeeder{r: bufio.NewReaderSize(r, stdinBuffer), idle: idle}
	return &metricReader{log: log, in: in, parser: influx.NewStreamParser(in)}
}

// Next returns the next metric; io.EOF at the end of the input, or the read
// error.
func (mr *metricReader) Next() (telegraf.Metric, error) {
	for {
		m, err := mr.parser.Next()
		mr.consumed += int64(mr.parser.Position())
		mr.longest = max(mr.longest, mr.parser.Position())
		if err == nil {
			mr.maybeReplace()
			return m, nil
		}
		if errors.Is(err, influx.EOF) {
			return nil, io.EOF
		}
		var perr *influx.ParseError
		if errors.As(err, &perr) {
			// The line's text is not logged: it may hold anything.
			why, _, _ := strings.Cut(perr.Error(), fmt.Sprintf(" at %d:%d", perr.LineNumber, perr.Column))
			mr.log.Errorf("Skipping line %d of standard input, it is not valid line protocol: %s at column %d",
				mr.lineBase+perr.LineNumber, why, perr.Column)
			continue
		}
		return nil, err
	}
}

// maybeReplace starts a new parser after a large line, when the current one
// holds no read-ahead: the feeder hands out at most one line per read, so
// after a metric the parser has consumed everything it was given.
func (mr *metricReader) maybeReplace() {
	if mr.longest < largeLine || mr.consumed != mr.in.served {
		return
	}
	mr.lineBase += mr.parser.LineNumber() - 1
	mr.parser = influx.NewStreamParser(mr.in)
	mr.in.served, mr.consumed, mr.longest = 0, 0, 0
	mr.replaced++
}

// lineFeeder hands the parser at most one line (up to its newline) per
// Read, so that the parser never reads ahead past the metric it parses.
type lineFeeder struct {
	r      *bufio.Reader
	idle   func()
	served int64
}

func (f *lineFeeder) Read(p []byte) (int, error) {
	if f.idle != nil && f.r.Buffered() == 0 {
		f.idle()
	}
	if f.r.Buffered() == 0 {
		// Fill the buffer (this may block); then hand out one line of it.
		if _, err := f.r.Peek(1); err != nil {
			return 0, err
		}
	}
	b, err := f.r.Peek(min(len(p), f.r.Buffered()))
	if err != nil {
		return 0, err
	}
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	}
	n := copy(p, b)
	_, _ = f.r.Discard(n)
	f.served += int64(n)
	return n, nil
}
