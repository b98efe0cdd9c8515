// Package hardening is the fault, hostile-input and security suite of
// telegraf-omnicore: its tests run a real Telegraf (built by
// scripts/build-telegraf.sh) with telegraf-omnicore under outputs.execd and
// inputs.execd against the bridge emulator, inject faults (bridge restarts,
// kicked connections, delayed and withheld PUBACKs, token expiry, refused
// attaches, the state rate limit, a slow link that is cut, SIGKILL of the
// execd child), feed it hostile metrics and broken plugin files, and count
// every metric from the generator to the bridge's PUBACK. docs/reliability.md
// states the guarantees it proves and the figures of a run.
//
// This file is the harness: the numbered metric generator that Telegraf runs
// under inputs.execd, the tally of what reached the bridge, the reading of
// Telegraf's log, and the figures table.
package hardening

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/influxdata/telegraf/plugins/parsers/influx"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
)

// EnvGenerator names the generator's spec file. A test binary whose TestMain
// finds it set runs RunGenerator instead of the tests: that is how Telegraf's
// inputs.execd runs the generator.
const EnvGenerator = "HARDENING_GENERATOR_SPEC"

// Measurements the generator writes.
const (
	MeasurementEvent = "seq"
	MeasurementState = "devstate"
)

// GenSpec is what the generator writes.
type GenSpec struct {
	// Count metrics numbered First..First+Count-1 (field n), at Rate per
	// second, for Devices in turn (metric n is for Devices[n % len(Devices)]).
	First   int      `json:"first"`
	Count   int      `json:"count"`
	Rate    float64  `json:"rate"`
	Devices []string `json:"devices"`
	// StateEvery makes every StateEvery-th metric a MeasurementState metric
	// (0: none).
	StateEvery int `json:"state_every"`
	// Pad adds a string field of Pad bytes, for realistic payload sizes.
	Pad int `json:"pad"`
	// Lines, when set, are written once instead of the numbered stream.
	Lines []string `json:"lines"`
	// Record is a file that gets "n generated_unix_nanos" for every metric.
	Record string `json:"record"`
}

// WriteGenSpec writes spec to path for EnvGenerator.
func WriteGenSpec(path string, spec GenSpec) error {
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// RunGenerator runs the generator of the spec file path: it writes line
// protocol to stdout at the spec's rate, then waits for stdin to close
// (inputs.execd closes it when Telegraf stops) so that execd does not
// restart it and generate again.
func RunGenerator(path string, stdin io.Reader, stdout io.Writer) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var spec GenSpec
	if err := json.Unmarshal(b, &spec); err != nil {
		return err
	}
	out := bufio.NewWriter(stdout)
	if spec.Lines != nil {
		for _, l := range spec.Lines {
			if _, err := out.WriteString(l + "\n"); err != nil {
				return err
			}
		}
		if err := out.Flush(); err != nil {
			return err
		}
	} else if err := generate(spec, out); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, stdin)
	return nil
}

func generate(spec GenSpec, out *bufio.Writer) error {
	if spec.Count <= 0 || spec.Rate <= 0 || len(spec.Devices) == 0 {
		return errors.New("generator: count, rate and devices are required")
	}
	var record *bufio.Writer
	if spec.Record != "" {
		f, err := os.Create(spec.Record)
		if err != nil {
			return err
		}
		defer f.Close()
		record = bufio.NewWriter(f)
		defer record.Flush()
	}
	pad := strings.Repeat("x", spec.Pad)
	const tick = 10 * time.Millisecond
	start := time.Now()
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	n := spec.First
	for n < spec.First+spec.Count {
		due := spec.First + min(spec.Count, int(time.Since(start).Seconds()*spec.Rate)+1)
		for ; n < due; n++ {
			name := MeasurementEvent
			if spec.StateEvery > 0 && n%spec.StateEvery == spec.StateEvery-1 {
				name = MeasurementState
			}
			now := time.Now().UnixNano()
			fmt.Fprintf(out, "%s,device_id=%s n=%di,g=%di", name, spec.Devices[n%len(spec.Devices)], n, now)
			if pad != "" {
				fmt.Fprintf(out, ",pad=%q", pad)
			}
			out.WriteByte('\n')
			if record != nil {
				fmt.Fprintf(record, "%d %d\n", n, now)
			}
		}
		if err := out.Flush(); err != nil {
			return err
		}
		if record != nil {
			if err := record.Flush(); err != nil {
				return err
			}
		}
		<-ticker.C
	}
	return nil
}

// ReadRecord reads a generator's record: the generation time of each metric.
func ReadRecord(path string) (map[int64]time.Time, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	gen := make(map[int64]time.Time)
	s := bufio.NewScanner(f)
	for s.Scan() {
		var n, ns int64
		if _, err := fmt.Sscanf(s.Text(), "%d %d", &n, &ns); err != nil {
			return nil, fmt.Errorf("record line %q: %w", s.Text(), err)
		}
		gen[n] = time.Unix(0, ns)
	}
	return gen, s.Err()
}

// Tally counts the generator's metrics the bridge accepted, from the
// emulator's receive hook (emulator.WithOnReceive).
type Tally struct {
	mu     sync.Mutex
	seen   map[int64]int    // n -> times accepted
	device map[int64]string // n -> device of the topic
	kind   map[int64]string // n -> measurement
	topics map[string]int
	other  int // accepted messages that are not the generator's
}

// NewTally returns an empty tally.
func NewTally() *Tally {
	return &Tally{seen: map[int64]int{}, device: map[int64]string{}, kind: map[int64]string{}, topics: map[string]int{}}
}

// OnReceive records one accepted message; it is the emulator hook.
func (t *Tally) OnReceive(m emulator.Message) {
	p := influx.NewStreamParser(strings.NewReader(string(m.Payload)))
	t.mu.Lock()
	defer t.mu.Unlock()
	t.topics[m.Topic]++
	found := false
	for {
		metric, err := p.Next()
		if err != nil {
			break
		}
		v, ok := metric.GetField("n")
		n, isInt := v.(int64)
		if !ok || !isInt || (metric.Name() != MeasurementEvent && metric.Name() != MeasurementState) {
			continue
		}
		found = true
		t.seen[n]++
		t.device[n] = m.Device
		t.kind[n] = metric.Name()
	}
	if !found {
		t.other++
	}
}

// Unique is the number of distinct generator metrics accepted.
func (t *Tally) Unique() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.seen)
}

// Has reports whether metric n was accepted.
func (t *Tally) Has(n int64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.seen[n] > 0
}

// Duplicates is the number of acceptances beyond the first of each metric.
func (t *Tally) Duplicates() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	d := 0
	for _, c := range t.seen {
		d += c - 1
	}
	return d
}

// Missing lists the metrics of 0..count-1 never accepted.
func (t *Tally) Missing(count int) []int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []int64
	for n := range int64(count) {
		if t.seen[n] == 0 {
			out = append(out, n)
		}
	}
	return out
}

// Device is the device metric n was accepted for ("" if never).
func (t *Tally) Device(n int64) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.device[n]
}

// Topics returns how many messages each topic got.
func (t *Tally) Topics() map[string]int {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]int, len(t.topics))
	for k, v := range t.topics {
		out[k] = v
	}
	return out
}

// Others is the number of accepted messages that were not the generator's.
func (t *Tally) Others() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.other
}

// LogFigures is what Telegraf's log says about the output's metrics.
type LogFigures struct {
	// Acked is the number of metrics outputs.execd wrote into the pipe of
	// telegraf-omnicore ("Wrote batch of N metrics"): the metrics Telegraf
	// considers delivered and removed from its buffer.
	Acked int
	// Dropped are the metrics telegraf-omnicore counted as given up on, by
	// reason, from its debug "Write of ..." lines; under state_coalesced
	// the states replaced by a newer one (not a loss, but accounted for
	// here): within a Write, and kept by the gateway for their turn.
	Dropped map[string]int
	// Overflow is set when Telegraf dropped metrics from a full buffer.
	Overflow bool
	// Unacknowledged is what telegraf-omnicore reported as not acknowledged
	// at shutdown.
	Unacknowledged int
	// Restarts counts outputs.execd restarting its child.
	Restarts int
}

// DroppedTotal sums Dropped.
func (f LogFigures) DroppedTotal() int {
	n := 0
	for _, v := range f.Dropped {
		n += v
	}
	return n
}

var (
	wroteBatch     = regexp.MustCompile(`\[outputs\.execd::omnicore\] Wrote batch of (\d+) metrics`)
	writeOf        = regexp.MustCompile(`\[outputs\.omnicore\] Write of \d+ metrics: .*, dropped (.+), in \S+$`)
	coalescedWrite = regexp.MustCompile(`\[outputs\.omnicore\] Write of \d+ metrics: .*, (\d+) states coalesced, dropped`)
	coalescedKept  = regexp.MustCompile(`State of device "[^"]*" replaced by a newer one before its turn`)
	overflow       = regexp.MustCompile(`\[outputs\.execd::omnicore\] Metric buffer overflow`)
	unacknowledged = regexp.MustCompile(`(\d+) metrics not acknowledged`)
	restarting     = regexp.MustCompile(`\[outputs\.execd::omnicore\] Restarting in`)
)

// ParseLog reads the figures out of a Telegraf log. The output must run with
// -log_level debug and Telegraf with debug = true.
func ParseLog(log string) LogFigures {
	f := LogFigures{Dropped: map[string]int{}}
	for _, l := range strings.Split(log, "\n") {
		if m := wroteBatch.FindStringSubmatch(l); m != nil {
			n, _ := strconv.Atoi(m[1])
			f.Acked += n
		}
		if m := writeOf.FindStringSubmatch(l); m != nil && m[1] != "none" {
			for _, kv := range strings.Fields(m[1]) {
				k, v, ok := strings.Cut(kv, "=")
				if n, err := strconv.Atoi(v); ok && err == nil {
					f.Dropped[k] += n
				}
			}
		}
		if m := coalescedWrite.FindStringSubmatch(l); m != nil {
			n, _ := strconv.Atoi(m[1])
			f.Dropped["state_coalesced"] += n
		}
		if coalescedKept.MatchString(l) {
			f.Dropped["state_coalesced"]++
		}
		if overflow.MatchString(l) {
			f.Overflow = true
		}
		if m := unacknowledged.FindStringSubmatch(l); m != nil {
			n, _ := strconv.Atoi(m[1])
			f.Unacknowledged += n
		}
		if restarting.MatchString(l) {
			f.Restarts++
		}
	}
	return f
}

// Figures are one scenario's counts.
type Figures struct {
	Scenario   string
	Faults     string // the faults survived
	In         int    // metrics generated (and parsed by Telegraf)
	Acked      int    // metrics outputs.execd wrote into the pipe
	Received   int    // distinct metrics the bridge accepted (PUBACK)
	Duplicates int    // acceptances beyond the first
	Dropped    int    // counted and logged as given up by telegraf-omnicore
	Lost       int    // In - Received - Dropped
	Duration   time.Duration
}

// Table renders figures as an aligned text table, sorted by scenario.
func Table(figs []Figures) string {
	sorted := append([]Figures(nil), figs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Scenario < sorted[j].Scenario })
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "scenario\tin\tacked\treceived\tduplicates\tdropped\tlost\ttime\t faults survived")
	for _, f := range sorted {
		fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t %s\n", f.Scenario, f.In, f.Acked, f.Received, f.Duplicates, f.Dropped, f.Lost, f.Duration.Round(100*time.Millisecond), f.Faults)
	}
	_ = w.Flush()
	return b.String()
}

// Markdown renders figures as a Markdown table, sorted by scenario.
func Markdown(figs []Figures) string {
	sorted := append([]Figures(nil), figs...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Scenario < sorted[j].Scenario })
	var b strings.Builder
	b.WriteString("| scenario | faults survived | in | acked | received | duplicates | dropped | lost | time |\n")
	b.WriteString("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	for _, f := range sorted {
		fmt.Fprintf(&b, "| %s | %s | %d | %d | %d | %d | %d | %d | %s |\n", f.Scenario, f.Faults, f.In, f.Acked, f.Received, f.Duplicates, f.Dropped, f.Lost, f.Duration.Round(100*time.Millisecond))
	}
	return b.String()
}
