package runner

import (
	"bytes"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
)

// FuzzOutputStdin feeds the runner what outputs.execd could write to its
// stdin, with arbitrary bytes between good lines: the runner never panics or
// stops early, and it loses no good line, before or after the bad bytes
// (lines are split at newlines, as Telegraf's influx serializer writes them:
// newlines inside values escaped, so a stray quote cannot swallow the lines
// after it).
func FuzzOutputStdin(f *testing.F) {
	for _, s := range []string{
		"",
		"bad line",
		"m v=1i 1 extra",
		"m,t=\xff v=1i 1",
		"\x00\x01\x02",
		"m,device_id=a/b v=1i 1",
		"m,t=a\\",
		"m v=\"a\nb\" 1",
		"m v=\"unterminated",
		"m v=1i 1\r",
		"# comment",
		"m " + strings.Repeat("f", 70000) + "=1i 1",
		"m v=" + strings.Repeat("9", 400) + " 1",
		"m v=1i 99999999999999999999",
		"m,,=, v=1i",
		"=\n=\n=",
		"\n\n\n",
		"m v=1i 1\nm v=2i 2",
	} {
		f.Add([]byte(s), uint8(1))
		f.Add([]byte(s), uint8(3))
	}
	good := []string{
		"zz_good,device_id=dev-1 seq=1i 1000000001",
		"zz_good,device_id=dev-2 seq=2i 1000000002",
		`zz_good,device_id=dev-3 seq=3i,note="quoted \"fine\"" 1000000003`,
	}
	f.Fuzz(func(t *testing.T, junk []byte, batchSize uint8) {
		var in bytes.Buffer
		in.WriteString(good[0] + "\n")
		in.Write(junk)
		in.WriteString("\n" + good[1] + "\n" + good[2] + "\n")

		out := &fuzzOutput{}
		r := New(Config{Output: out, Log: fuzzLogger{}, BatchSize: int(batchSize%8) + 1, BatchTimeout: time.Hour})
		r.minBackoff = time.Millisecond
		r.maxBackoff = time.Millisecond
		input := in.String()
		result := make(chan error, 1)
		go func() { result <- r.Run(&in, nil) }()
		select {
		case err := <-result:
			if err != nil {
				t.Fatalf("run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("the run loop hangs on %q", input)
		}
		if !out.closed {
			t.Fatal("the output was not closed at EOF")
		}
		want := good
		got := out.lines()
		i := 0
		for _, l := range got {
			if i < len(want) && l == want[i] {
				i++
			}
		}
		if i < len(want) {
			t.Fatalf("good line %q lost; the output got %q", want[i], got)
		}
	})
}

// fuzzOutput records every metric written.
type fuzzOutput struct {
	mu      sync.Mutex
	written []telegraf.Metric
	closed  bool
}

func (*fuzzOutput) SampleConfig() string { return "" }
func (*fuzzOutput) Connect() error       { return nil }

func (o *fuzzOutput) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.closed = true
	return nil
}

func (o *fuzzOutput) Write(metrics []telegraf.Metric) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.written = append(o.written, metrics...)
	return nil
}

// lines renders the zz_good metrics the way the good lines are written.
func (o *fuzzOutput) lines() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []string
	for _, m := range o.written {
		if m.Name() != "zz_good" {
			continue
		}
		dev, _ := m.GetTag("device_id")
		seq, _ := m.GetField("seq")
		line := "zz_good,device_id=" + dev + " seq=" + anyItoa(seq) + "i"
		if note, ok := m.GetField("note"); ok {
			line += `,note="` + strings.ReplaceAll(note.(string), `"`, `\"`) + `"`
		}
		out = append(out, line+" "+itoa(m.Time().UnixNano()))
	}
	return out
}

func anyItoa(v any) string {
	if n, ok := v.(int64); ok {
		return strconv.FormatInt(n, 10)
	}
	return "?"
}

// fuzzLogger discards everything: the run loop logs every bad line.
type fuzzLogger struct{}

func (fuzzLogger) Level() telegraf.LogLevel         { return telegraf.Error }
func (fuzzLogger) AddAttribute(string, interface{}) {}
func (fuzzLogger) Errorf(string, ...interface{})    {}
func (fuzzLogger) Error(...interface{})             {}
func (fuzzLogger) Warnf(string, ...interface{})     {}
func (fuzzLogger) Warn(...interface{})              {}
func (fuzzLogger) Infof(string, ...interface{})     {}
func (fuzzLogger) Info(...interface{})              {}
func (fuzzLogger) Debugf(string, ...interface{})    {}
func (fuzzLogger) Debug(...interface{})             {}
func (fuzzLogger) Tracef(string, ...interface{})    {}
func (fuzzLogger) Trace(...interface{})             {}
