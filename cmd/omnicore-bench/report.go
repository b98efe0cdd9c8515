package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// row is one line of the table: a figure of ours and of its peer, each
// measured in every run, reported as medians.
type row struct {
	id        string // "1", "1b", ... (the benchmark of issue 7)
	name      string
	unit      string // "metrics/s", "attaches/s", "ms", "MiB", "B/device"
	oursLabel string
	peerLabel string
	ours      []float64
	peer      []float64
	// lowerIsBetter marks figures like latency and memory.
	lowerIsBetter bool
	// neutral rows compare two figures of ours (e.g. memory at two sizes)
	// where neither is "better"; no faster/slower verdict is printed.
	neutral bool
	note    string
	// slowerWhy explains why ours is behind the peer, when it is.
	slowerWhy string
	skipped   string // why the row was not measured
	problems  []string
	// leftOut counts the runs (of ours and of the peer) that had a
	// problem and are not in the medians.
	leftOut int
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (r *row) addProblem(format string, args ...any) {
	p := fmt.Sprintf(format, args...)
	if !slices.Contains(r.problems, p) {
		r.problems = append(r.problems, p)
	}
}

// ratio is ours/peer of the medians.
func (r *row) ratio() float64 {
	o, p := median(r.ours), median(r.peer)
	if p == 0 || math.IsNaN(o) || math.IsNaN(p) {
		return math.NaN()
	}
	return o / p
}

// behind says whether ours is worse than the peer by more than noise (10%).
func (r *row) behind() bool {
	q := r.ratio()
	if r.neutral || math.IsNaN(q) {
		return false
	}
	if r.lowerIsBetter {
		return q > 1.1
	}
	return q < 0.9
}

func formatValue(v float64, unit string) string {
	if math.IsNaN(v) {
		return "n/a"
	}
	var s string
	switch {
	case v >= 100:
		s = groupThousands(int64(math.Round(v)))
	case v >= 10:
		s = strconv.FormatFloat(v, 'f', 1, 64)
	case v >= 1:
		s = strconv.FormatFloat(v, 'f', 2, 64)
	default:
		s = strconv.FormatFloat(v, 'f', 3, 64)
	}
	return s + " " + unit
}

func groupThousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

func (r *row) cells() (ours, peer, ratio, note string) {
	if r.skipped != "" {
		return "skipped", "skipped", "", r.skipped
	}
	ours = formatValue(median(r.ours), r.unit)
	if r.oursLabel != "" {
		ours = r.oursLabel + ": " + ours
	}
	peer = formatValue(median(r.peer), r.unit)
	if r.peerLabel != "" {
		peer = r.peerLabel + ": " + peer
	}
	if q := r.ratio(); !math.IsNaN(q) {
		ratio = fmt.Sprintf("%.2fx", q)
	} else {
		ratio = "n/a"
	}
	var notes []string
	if r.note != "" {
		notes = append(notes, r.note)
	}
	if r.behind() {
		why := r.slowerWhy
		if why == "" {
			why = "see the method section"
		}
		word := "SLOWER than"
		switch {
		case r.lowerIsBetter && r.unit == "B/metric":
			word = "MORE bytes on the wire than"
		case r.lowerIsBetter && (r.unit == "MiB" || strings.HasPrefix(r.unit, "B")):
			word = "MORE memory than"
		}
		notes = append(notes, fmt.Sprintf("ours is %s the peer: %s", word, why))
	}
	if len(r.problems) > 0 {
		notes = append(notes, "PROBLEM: "+strings.Join(r.problems, "; "))
	}
	if r.leftOut > 0 {
		notes = append(notes, fmt.Sprintf("%d run(s) with a problem left out of the medians", r.leftOut))
	}
	if n := len(r.ours); n > 1 {
		notes = append(notes, fmt.Sprintf("median of %d runs (ours %s, peer %s)", n, spread(r.ours), spread(r.peer)))
	}
	return ours, peer, ratio, strings.Join(notes, "; ")
}

// spread is "min-max" of the runs.
func spread(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	lo, hi := slices.Min(v), slices.Max(v)
	f := func(x float64) string {
		switch {
		case x >= 100:
			return groupThousands(int64(math.Round(x)))
		case x >= 10:
			return strconv.FormatFloat(x, 'f', 1, 64)
		case x >= 1:
			return strconv.FormatFloat(x, 'f', 2, 64)
		default:
			return strconv.FormatFloat(x, 'f', 3, 64)
		}
	}
	return f(lo) + "-" + f(hi)
}

// header is what every run prints first: the machine and the settings.
type header struct {
	started   time.Time
	cores     int
	gomaxproc int
	goVersion string
	cpuModel  string
	loadStart string
	loadEnd   string
	mode      string
	runs      int
	telegraf  string
	mosquitto string
	elapsed   time.Duration
}

func (h header) lines() []string {
	return []string{
		fmt.Sprintf("date: %s", h.started.UTC().Format(time.RFC3339)),
		fmt.Sprintf("machine: %d cores (GOMAXPROCS %d), %s", h.cores, h.gomaxproc, h.cpuModel),
		fmt.Sprintf("go: %s", h.goVersion),
		fmt.Sprintf("load average at start: %s; at end: %s", h.loadStart, h.loadEnd),
		fmt.Sprintf("mode: %s, %d run(s) per figure, medians reported", h.mode, h.runs),
		fmt.Sprintf("telegraf: %s", h.telegraf),
		fmt.Sprintf("mosquitto: %s", h.mosquitto),
		fmt.Sprintf("wall time: %s", h.elapsed.Round(time.Second)),
	}
}

// printTable writes the rows as a Markdown table.
func printTable(w io.Writer, rows []*row) {
	fmt.Fprintln(w, "| # | benchmark | ours | peer | ratio | note |")
	fmt.Fprintln(w, "| --- | --- | --- | --- | --- | --- |")
	for _, r := range rows {
		o, p, q, n := r.cells()
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s |\n", r.id, esc(r.name), esc(o), esc(p), q, esc(n))
	}
}

func esc(s string) string { return strings.ReplaceAll(s, "|", "\\|") }
