package main

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/metric"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/internal/statecheck"
)

// TestMain lets the test binary serve as the benchmark's child process
// (benchmark 4 re-executes os.Executable()).
func TestMain(m *testing.M) {
	if len(os.Args) > 2 && os.Args[1] == childFlag {
		os.Exit(runChild(os.Args[2:]))
	}
	os.Exit(statecheck.Run(m.Run))
}

func TestMedian(t *testing.T) {
	tests := []struct {
		name string
		in   []float64
		want float64
	}{
		{name: "one", in: []float64{3}, want: 3},
		{name: "odd", in: []float64{5, 1, 3}, want: 3},
		{name: "even", in: []float64{4, 1, 3, 2}, want: 2.5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := append([]float64(nil), tt.in...)
			require.InDelta(t, tt.want, median(tt.in), 1e-9)
			require.Equal(t, in, tt.in, "median must not reorder its input")
		})
	}
	require.True(t, math.IsNaN(median(nil)))
}

func TestPercentile(t *testing.T) {
	v := make([]float64, 100)
	for i := range v {
		v[i] = float64(100 - i) // 100 .. 1, unsorted on purpose
	}
	tests := []struct {
		p    float64
		want float64
	}{
		{p: 50, want: 50},
		{p: 99, want: 99},
		{p: 100, want: 100},
		{p: 1, want: 1},
	}
	for _, tt := range tests {
		require.InDelta(t, tt.want, percentile(v, tt.p), 1e-9, "p%v", tt.p)
	}
	require.True(t, math.IsNaN(percentile(nil, 50)))
}

func TestRowVerdict(t *testing.T) {
	tests := []struct {
		name       string
		r          row
		ratio      float64
		behind     bool
		noteSubstr string
	}{
		{name: "faster", r: row{unit: "metrics/s", ours: []float64{300}, peer: []float64{100}}, ratio: 3},
		{name: "within noise", r: row{unit: "metrics/s", ours: []float64{95}, peer: []float64{100}}, ratio: 0.95},
		{name: "slower", r: row{unit: "metrics/s", ours: []float64{50}, peer: []float64{100}, slowerWhy: "because"},
			ratio: 0.5, behind: true, noteSubstr: "ours is SLOWER than the peer: because"},
		{name: "lower latency is better", r: row{unit: "ms", lowerIsBetter: true, ours: []float64{1}, peer: []float64{2}}, ratio: 0.5},
		{name: "higher latency is behind", r: row{unit: "ms", lowerIsBetter: true, ours: []float64{3}, peer: []float64{2}, slowerWhy: "x"},
			ratio: 1.5, behind: true, noteSubstr: "SLOWER"},
		{name: "more memory", r: row{unit: "MiB", lowerIsBetter: true, ours: []float64{30}, peer: []float64{20}, slowerWhy: "state"},
			ratio: 1.5, behind: true, noteSubstr: "MORE memory than the peer: state"},
		{name: "neutral has no verdict", r: row{unit: "B/device", neutral: true, ours: []float64{30}, peer: []float64{10}}, ratio: 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.InDelta(t, tt.ratio, tt.r.ratio(), 1e-9)
			require.Equal(t, tt.behind, tt.r.behind())
			_, _, _, note := tt.r.cells()
			if tt.noteSubstr != "" {
				require.Contains(t, note, tt.noteSubstr)
			} else {
				require.NotContains(t, note, "ours is")
			}
		})
	}
}

func TestCells(t *testing.T) {
	r := row{unit: "metrics/s", oursLabel: "ours", peerLabel: "peer", ours: []float64{1500, 1000, 2000}, peer: []float64{500, 500, 500}}
	r.addProblem("lost %d", 3)
	r.addProblem("lost %d", 3) // reported once
	o, p, q, n := r.cells()
	require.Equal(t, "ours: 1,500 metrics/s", o)
	require.Equal(t, "peer: 500 metrics/s", p)
	require.Equal(t, "3.00x", q)
	require.Equal(t, "PROBLEM: lost 3; median of 3 runs (ours 1,000-2,000, peer 500-500)", n)

	skipped := row{skipped: "no mosquitto"}
	o, p, q, n = skipped.cells()
	require.Equal(t, []string{"skipped", "skipped", "", "no mosquitto"}, []string{o, p, q, n})
}

func TestFormatValue(t *testing.T) {
	tests := []struct {
		v    float64
		want string
	}{
		{v: 1234567.4, want: "1,234,567 x"},
		{v: 100, want: "100 x"},
		{v: 42.25, want: "42.2 x"},
		{v: 1.125, want: "1.12 x"},
		{v: 0.0344, want: "0.034 x"},
		{v: math.NaN(), want: "n/a"},
	}
	for _, tt := range tests {
		require.Equal(t, tt.want, formatValue(tt.v, "x"))
	}
}

func TestPrintTableEscapes(t *testing.T) {
	var b bytes.Buffer
	printTable(&b, []*row{{id: "1", name: "a | b", unit: "u", ours: []float64{2}, peer: []float64{1}}})
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	require.Len(t, lines, 3)
	require.Equal(t, "| 1 | a \\| b | 2.00 u | 1.00 u | 2.00x |  |", lines[2])
}

func TestParseOptions(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		runs    int
		quick   bool
		only    []string
		wantErr string
	}{
		{name: "defaults", runs: 3},
		{name: "quick runs once", args: []string{"-quick"}, runs: 1, quick: true},
		{name: "quick with runs", args: []string{"-quick", "-runs", "2"}, runs: 2, quick: true},
		{name: "only", args: []string{"-only", "1b, 3"}, runs: 3, only: []string{"1b", "3"}},
		{name: "the user's view and the wire", args: []string{"-only", "9,10"}, runs: 3, only: []string{"9", "10"}},
		{name: "unknown benchmark", args: []string{"-only", "11"}, wantErr: "unknown benchmark"},
		{name: "no runs", args: []string{"-runs", "0"}, wantErr: "at least 1"},
		{name: "stray argument", args: []string{"x"}, wantErr: "unexpected arguments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parseOptions(tt.args)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.runs, o.runs)
			require.Equal(t, tt.quick, o.quick)
			for _, id := range allBenchmarks {
				want := tt.only == nil
				for _, o := range tt.only {
					want = want || o == id
				}
				require.Equal(t, want, o.wants(id), "benchmark %s", id)
			}
		})
	}
}

func TestGenMetricsAndBatches(t *testing.T) {
	start := time.Unix(1_700_000_000, 0)
	ms := genMetrics(5, 2, start)
	want := []telegraf.Metric{
		metric.New("sensor", map[string]string{"device_id": "dev-00000"},
			map[string]any{"temperature": 20.0, "humidity": int64(40), "status": "ok"}, start),
		metric.New("sensor", map[string]string{"device_id": "dev-00001"},
			map[string]any{"temperature": 20.1, "humidity": int64(41), "status": "ok"}, start.Add(time.Millisecond)),
	}
	require.Len(t, ms, 5)
	for i, w := range want {
		require.Equal(t, w.Name(), ms[i].Name())
		require.Equal(t, w.Tags(), ms[i].Tags())
		require.Equal(t, w.Fields(), ms[i].Fields())
		require.Equal(t, w.Time(), ms[i].Time())
	}
	dev, _ := ms[4].GetTag("device_id")
	require.Equal(t, "dev-00000", dev)

	var sizes []int
	for _, b := range batches(ms, 2) {
		sizes = append(sizes, len(b))
	}
	require.Equal(t, []int{2, 2, 1}, sizes)
}

func TestReadRSS(t *testing.T) {
	if _, err := os.Stat("/proc/self/status"); err != nil {
		t.Skip("no /proc on this system")
	}
	require.Positive(t, readRSS())
}

// TestQuickRun runs the whole harness in -quick mode: every benchmark must
// produce its rows without a failed run. Figures are not checked.
func TestQuickRun(t *testing.T) {
	if testing.Short() {
		t.Skip("runs every benchmark (about a minute)")
	}
	opts, err := parseOptions([]string{"-quick", "-q", "-workdir", t.TempDir()})
	require.NoError(t, err)
	// The run itself takes under a minute; the bound leaves room for
	// scripts/build-telegraf.sh on a machine that has no Telegraf yet.
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	var out bytes.Buffer
	require.NoError(t, run(ctx, opts, &out))
	text := out.String()
	t.Log("\n" + text)
	require.Contains(t, text, "machine: ")
	require.Contains(t, text, "go: go1.")
	for _, id := range allBenchmarks {
		require.Contains(t, text, "\n| "+id+" | ", "no row for benchmark %s", id)
	}
	require.NotContains(t, text, "PROBLEM")
}

func TestReceiverCounts(t *testing.T) {
	lp := func(ts ...int64) []byte {
		var b bytes.Buffer
		for _, x := range ts {
			fmt.Fprintf(&b, "sensor temperature=1 %d\n", x)
		}
		return b.Bytes()
	}
	tests := []struct {
		name     string
		payloads [][]byte
		want     []int64
		tally    tally
	}{
		{name: "all once", payloads: [][]byte{lp(1), lp(2, 3)}, want: []int64{1, 2, 3},
			tally: tally{sent: 3, received: 3}},
		{name: "one lost", payloads: [][]byte{lp(1, 3)}, want: []int64{1, 2, 3},
			tally: tally{sent: 3, received: 2, missing: 1}},
		{name: "a duplicate hides a loss from a plain count", payloads: [][]byte{lp(1, 1), lp(3)}, want: []int64{1, 2, 3},
			tally: tally{sent: 3, received: 2, missing: 1, duplicates: 1}},
		{name: "unexpected and malformed", payloads: [][]byte{lp(1, 9), []byte("no-timestamp\n")}, want: []int64{1},
			tally: tally{sent: 1, received: 1, unexpected: 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newReceiver()
			r.observe(lp(42)) // from before the reset: forgotten
			r.reset(false)
			for _, p := range tt.payloads {
				r.observe(p)
			}
			got := r.count(tt.want)
			require.Equal(t, tt.tally, got)
			require.Equal(t, tt.tally.missing == 0 && tt.tally.duplicates == 0 && tt.tally.unexpected == 0, got.ok())
		})
	}
}

func TestLeftOutRunsAreReported(t *testing.T) {
	r := row{unit: "metrics/s", ours: []float64{2}, peer: []float64{1}, leftOut: 2}
	_, _, _, note := r.cells()
	require.Contains(t, note, "2 run(s) with a problem left out of the medians")
}

func TestOnlyExecdStopErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		log  string
		want bool
	}{
		{"Telegraf's execd stop race", "2026-11-25T20:40:46Z E! [agent] SleepContext finished with: context canceled\n" +
			"2026-11-25T20:40:46Z E! [inputs.execd] Error in plugin: read |0: file already closed\n" +
			"2026-11-25T20:40:46Z E! [inputs.execd] Error in plugin: error reading stderr: read |0: file already closed\n" +
			"2026-11-25T20:40:46Z E! [telegraf] Error running agent: input plugins recorded 2 errors\n", true},
		{"a plugin warning shown as an error", "2026-11-25T20:40:46Z E! [outputs.execd] stderr: W! [outputs.omnicore] Server is plain TCP\n", true},
		{"a plugin error", "2026-11-25T20:40:46Z E! [inputs.execd] stderr: E! [inputs.omnicore] Subscribing failed\n", false},
		{"another error", "2026-11-25T20:40:46Z E! [outputs.execd] Error writing to process: broken pipe\n", false},
		{"no errors", "2026-11-25T20:40:46Z I! [agent] Stopping running outputs\n", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, onlyExecdStopErrors(tc.log))
		})
	}
}
