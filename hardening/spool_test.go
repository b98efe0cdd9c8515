package hardening

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf/plugins/parsers/influx"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/e2e"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
)

// The store-and-forward suite: the output's spool through a real Telegraf,
// with the bridge away while Telegraf is stopped, killed, or the spool is
// full or damaged. Every metric is counted: sent (generated), received
// (distinct, acknowledged by the bridge), duplicated, lost.

// agentWith is the [agent] table of these tests with extra lines.
func agentWith(extra ...string) string {
	return `[agent]
  interval = "1s"
  flush_interval = "100ms"
  metric_batch_size = 1000
  omit_hostname = true
  debug = true
` + strings.Join(extra, "\n") + "\n"
}

// spoolRun is one Telegraf life in a spool test: the generator writes
// spec, the output runs with the plugin file.
func (w *world) spoolTelegraf(agent string, spec GenSpec, pluginFile string, group bool) {
	w.t.Helper()
	path := w.write(fmt.Sprintf("telegraf-%d.conf", time.Now().UnixNano()), agent+w.generatorInput(spec)+outputBlock(pluginFile))
	start := e2e.StartTelegraf
	if group {
		start = e2e.StartTelegrafGroup
	}
	tg, err := start(telegrafBin, path, w.env, nil)
	require.NoError(w.t, err)
	w.tg = tg
	w.t.Cleanup(func() {
		tg.Kill()
		if w.t.Failed() {
			w.t.Logf("Telegraf log (without buffer and batch lines):\n%s", tail(quiet(tg.Log()), 200))
		}
	})
}

// generated waits until the generator of spec recorded every metric.
func (w *world) generated(path string, spec GenSpec) {
	w.t.Helper()
	w.waitFor(time.Minute+time.Duration(float64(spec.Count)/spec.Rate*float64(time.Second)), "the generator's last metric", func() bool {
		gen, err := ReadRecord(path)
		return err == nil && len(gen) >= spec.Count
	})
}

// spoolDir is the output's spool directory under the test's state directory.
func (w *world) spoolDir() string {
	w.t.Helper()
	dirs, err := filepath.Glob(filepath.Join(w.state, "spool", "edge-gw-*"))
	require.NoError(w.t, err)
	require.Len(w.t, dirs, 1, "one spool for the one gateway output")
	return dirs[0]
}

// spooled returns the generator metric numbers in each segment file of the
// spool (up to any damage), by segment path.
func spooled(t *testing.T, dir string) map[string][]int64 {
	t.Helper()
	segs, err := filepath.Glob(filepath.Join(dir, "*.seg"))
	require.NoError(t, err)
	out := map[string][]int64{}
	for _, seg := range segs {
		recs, err := spool.SegmentRecords(seg)
		require.NoError(t, err)
		for _, r := range recs {
			out[seg] = append(out[seg], metricNumbers(t, r)...)
		}
	}
	return out
}

func metricNumbers(t *testing.T, lp []byte) []int64 {
	t.Helper()
	p := &influx.Parser{}
	require.NoError(t, p.Init())
	ms, err := p.Parse(lp)
	require.NoError(t, err)
	var out []int64
	for _, m := range ms {
		if v, ok := m.GetField("n"); ok {
			out = append(out, v.(int64))
		}
	}
	return out
}

// outage runs the scenario the issue measured: the bridge goes away
// mid-stream, Telegraf (buffer_strategy = "disk") is stopped with stopFn and
// started again, then the bridge comes back. It returns the metrics lost
// and how long the stop took.
func outage(t *testing.T, stop func(w *world) time.Duration) (w *world, lost []int64, stopTook time.Duration, fig Figures) {
	w = newWorld(t)
	devices := deviceNames("dev", 5)
	gw := w.gateway(devices...)
	plugin := w.write("omnicore-output.conf", gw.OutputFile())
	agent := agentWith("  metric_buffer_limit = 100000", `  buffer_strategy = "disk"`, "  buffer_directory = "+e2e.Quote(filepath.Join(w.dir, "buffer")))

	first := GenSpec{Count: 600, Rate: 200, Devices: devices, Pad: 64, Record: filepath.Join(w.dir, "record-1.txt")}
	w.spoolTelegraf(agent, first, plugin, true)
	w.waitEmulator(time.Minute, "100 messages accepted", func() bool { return w.srv.Stats().MessagesAccepted >= 100 })
	w.srv.Stop() // the bridge goes away mid-stream
	w.generated(first.Record, first)
	// Every metric is past Telegraf (written into the output's pipe): what
	// is lost from here on is the output's.
	w.waitFor(time.Minute, "every metric written to the output", func() bool { return ParseLog(w.tg.Log()).Acked >= first.Count })
	stopTook = stop(w)

	second := GenSpec{First: first.Count, Count: 400, Rate: 200, Devices: devices, Pad: 64, Record: filepath.Join(w.dir, "record-2.txt")}
	w.spoolTelegraf(agent, second, plugin, false)
	w.waitFor(time.Minute, "the restarted output", func() bool { return w.outputChild() != 0 })
	time.Sleep(time.Second) // the fault: the bridge is still away after the restart
	require.NoError(t, w.srv.Restart())

	total := first.Count + second.Count
	start := time.Now()
	w.waitFor(2*time.Minute, "every metric, or a quiet minute", func() bool {
		return w.tally.Unique() >= total || time.Since(start) > time.Minute
	})
	w.stop()
	lost = w.tally.Missing(total)
	fig = Figures{In: total, Received: w.tally.Unique(), Duplicates: w.tally.Duplicates(), Lost: len(lost), Duration: time.Since(start)}
	require.Zero(t, w.tally.Others())
	return w, lost, stopTook, fig
}

// TestSpoolTelegrafRestartedDuringOutage: bridge down, Telegraf stopped with
// SIGTERM (what systemctl restart does) and started again, bridge up: nothing
// lost, and the stop does not hang.
func TestSpoolTelegrafRestartedDuringOutage(t *testing.T) {
	w, lost, took, fig := outage(t, func(w *world) time.Duration {
		took, err := w.tg.Stop(20 * time.Second)
		require.NoError(t, err, "Telegraf stopped in %s", took)
		return took
	})
	t.Logf("SIGTERM and restart during an outage: sent %d, received %d, duplicated %d, lost %d; Telegraf's stop took %s",
		fig.In, fig.Received, fig.Duplicates, fig.Lost, took.Round(time.Millisecond))
	require.Empty(t, lost, "metrics lost")
	// The output exits within 1 s of stdin EOF; the rest is Telegraf's own
	// shutdown. Generous for a loaded machine; the figure is logged above.
	require.Less(t, took, 5*time.Second, "Telegraf's stop waited for the output")
	require.Contains(t, w.tg.Log(), "Replaying", "the restarted output replays its spool")
}

// TestSpoolTelegrafGroupKilledDuringOutage: the same with SIGKILL of
// Telegraf's whole process group (a power cut, minus the page cache): every
// metric that reached the spool is delivered; what was lost was in the pipe
// or read but not yet appended. The worst loss over the runs is reported.
func TestSpoolTelegrafGroupKilledDuringOutage(t *testing.T) {
	runs := scale(2, 20)
	worst := 0
	var losses []int
	for i := range runs {
		var inSpool map[int64]bool
		w, lost, _, fig := outage(t, func(w *world) time.Duration {
			require.NoError(t, w.tg.KillGroup())
			w.waitFor(10*time.Second, "the output child's death", func() bool { return w.outputChild() == 0 })
			inSpool = map[int64]bool{}
			for _, ns := range spooled(t, w.spoolDir()) {
				for _, n := range ns {
					inSpool[n] = true
				}
			}
			return 0
		})
		for _, n := range lost {
			require.False(t, inSpool[n], "metric %d was in the spool after the kill and was lost", n)
			require.Less(t, n, int64(600), "metric %d, generated after the restart, was lost", n)
		}
		require.LessOrEqual(t, len(lost), maxHeldByProcess, "more lost than the pipe and one read can hold")
		losses = append(losses, len(lost))
		worst = max(worst, len(lost))
		t.Logf("run %d/%d: sent %d, received %d, duplicated %d, lost %d (%d were in the spool at the kill)",
			i+1, runs, fig.In, fig.Received, fig.Duplicates, fig.Lost, len(inSpool))
		_ = w
	}
	t.Logf("SIGKILL of Telegraf's process group during an outage, %d runs: lost per run %v, worst %d (bound: the pipe and one read, %d)", runs, losses, worst, maxHeldByProcess)
}

// TestSpoolLargeOutage: a long outage with Telegraf's default buffer
// (metric_buffer_limit 10,000): the output reads everything into its spool,
// so Telegraf's buffer never overflows; after the bridge returns every metric
// arrives. The drain rate is reported.
func TestSpoolLargeOutage(t *testing.T) {
	count := scale(20000, 1000000)
	rate := scale(5000.0, 10000.0)
	w := newWorld(t)
	devices := deviceNames("dev", 10)
	gw := w.gateway(devices...)
	plugin := w.write("omnicore-output.conf", gw.OutputFile())
	spec := GenSpec{Count: count, Rate: rate, Devices: devices, Record: filepath.Join(w.dir, "record.txt")}
	w.srv.Stop() // the bridge is away from the start
	genStart := time.Now()
	w.spoolTelegraf(agentWith(), spec, plugin, false)
	w.generated(spec.Record, spec)
	// Everything reaches the spool (Telegraf keeps nothing back). On a
	// loaded machine Telegraf itself may lag the generator: generous.
	w.waitFor(2*time.Minute+time.Duration(count/1000)*time.Second, "every metric written to the output", func() bool {
		return ParseLog(w.tg.Log()).Acked >= count
	})
	t.Logf("%d metrics generated and written to the output in %s", count, time.Since(genStart).Round(time.Millisecond))
	require.NoError(t, w.srv.Restart())
	start := time.Now()
	w.waitEmulator(30*time.Minute, "every metric accepted", func() bool { return w.srv.Stats().MessagesAccepted >= count })
	took := time.Since(start)
	w.waitFor(time.Minute, "every metric tallied", func() bool { return w.tally.Unique() >= count })
	w.stop()
	logf := ParseLog(w.tg.Log())
	require.False(t, logf.Overflow, "Telegraf's buffer overflowed")
	require.Empty(t, w.tally.Missing(count), "metrics lost")
	t.Logf("outage of %d metrics with Telegraf's default buffer: sent %d, received %d, duplicated %d, lost 0; drained in %s after the bridge returned, %.0f metrics/s",
		count, count, w.tally.Unique(), w.tally.Duplicates(), took.Round(time.Millisecond), float64(count)/took.Seconds())
}

// TestSpoolFullBackpressure: a small spool_max_size fills during an outage:
// the output stops reading (W! once), the backlog waits in Telegraf's
// buffer, and nothing is lost when the bridge returns.
func TestSpoolFullBackpressure(t *testing.T) {
	w := newWorld(t)
	devices := deviceNames("dev", 5)
	gw := w.gateway(devices...)
	plugin := w.write("omnicore-output.conf", gw.OutputFile(`spool_max_size = "64KiB"`))
	spec := GenSpec{Count: 3000, Rate: 1000, Devices: devices, Pad: 64, Record: filepath.Join(w.dir, "record.txt")}
	w.srv.Stop()
	w.spoolTelegraf(agentWith("  metric_buffer_limit = 100000"), spec, plugin, false)
	w.waitFor(time.Minute, "the spool-full warning", func() bool {
		return strings.Contains(w.tg.Log(), "W! [outputs.omnicore] The spool is full")
	})
	w.generated(spec.Record, spec)
	require.NoError(t, w.srv.Restart())
	w.waitFor(2*time.Minute, "every metric", func() bool { return w.tally.Unique() >= spec.Count })
	w.stop()
	log := w.tg.Log()
	require.Equal(t, 1, strings.Count(log, "W! [outputs.omnicore] The spool is full"), "the warning is logged once")
	require.False(t, ParseLog(log).Overflow)
	require.Empty(t, w.tally.Missing(spec.Count))
	t.Logf("spool full (64KiB): sent %d, received %d, duplicated %d, lost 0", spec.Count, w.tally.Unique(), w.tally.Duplicates())
}

// stoppedSpool is a spool left by an output stopped during an outage, for
// the damage tests.
type stoppedSpool struct {
	w       *world
	spec    GenSpec // what was spooled
	devices []string
	plugin  string
	dir     string
	before  map[string][]int64 // metric numbers by segment path
	segs    []string           // segments holding metrics, sorted
}

// spoolThenStop spools 3,000 metrics with the bridge away into a spool of
// 1 MiB (segments of 128 KiB, about 600 metrics each) and stops Telegraf.
func spoolThenStop(t *testing.T) stoppedSpool {
	w := newWorld(t)
	devices := deviceNames("dev", 5)
	gw := w.gateway(devices...)
	plugin := w.write("omnicore-output.conf", gw.OutputFile(`spool_max_size = "1MiB"`))
	spec := GenSpec{Count: 3000, Rate: 1000, Devices: devices, Pad: 64, Record: filepath.Join(w.dir, "record.txt")}
	w.srv.Stop()
	w.spoolTelegraf(agentWith("  metric_buffer_limit = 100000"), spec, plugin, false)
	w.generated(spec.Record, spec)
	w.waitFor(time.Minute, "every metric written to the output", func() bool { return ParseLog(w.tg.Log()).Acked >= spec.Count })
	w.stop()

	dir := w.spoolDir()
	before := spooled(t, dir)
	var segs []string
	for seg, ns := range before {
		if len(ns) > 0 {
			segs = append(segs, seg)
		}
	}
	sort.Strings(segs)
	require.GreaterOrEqual(t, len(segs), 3, "several segments")
	return stoppedSpool{w: w, spec: spec, devices: devices, plugin: plugin, dir: dir, before: before, segs: segs}
}

// TestSpoolDamagedFiles: the spool of a stopped output is damaged (a torn
// last record, a byte flipped in a middle segment, a zero-length segment);
// the next start repairs it with W!/E! lines and delivers everything that
// was not damaged: the records after the flipped byte too, whose CRCs show
// them intact.
func TestSpoolDamagedFiles(t *testing.T) {
	d := spoolThenStop(t)
	w, spec, devices, plugin, dir, before, segs := d.w, d.spec, d.devices, d.plugin, d.dir, d.before, d.segs
	// A byte flipped in the middle of the second segment, the last one
	// torn, and a zero-length segment after it (a crash right after a
	// rotation).
	mid := segs[1]
	b, err := os.ReadFile(mid)
	require.NoError(t, err)
	b[len(b)/2] ^= 0x40
	require.NoError(t, os.WriteFile(mid, b, 0o600))
	last := segs[len(segs)-1]
	fi, err := os.Stat(last)
	require.NoError(t, err)
	require.NoError(t, os.Truncate(last, fi.Size()-7))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "00000000000000099999.seg"), nil, 0o600))

	// What is not damaged: every record of the damaged files whose CRC
	// holds (before and after the damage), and the other segments whole.
	after := spooled(t, dir)
	expected := map[int64]bool{}
	damaged := map[int64]bool{}
	for seg, ns := range before {
		for _, n := range ns {
			damaged[n] = true
		}
		for _, n := range after[seg] {
			expected[n] = true
			delete(damaged, n)
		}
	}
	require.NotEmpty(t, damaged)

	require.NoError(t, w.srv.Restart())
	w.spoolTelegraf(agentWith("  metric_buffer_limit = 100000"), GenSpec{Count: 1, First: spec.Count, Rate: 1, Devices: devices, Pad: 64}, plugin, false)
	w.waitFor(2*time.Minute, "every undamaged metric", func() bool {
		for n := range expected {
			if !w.tally.Has(n) {
				return false
			}
		}
		return w.tally.Has(int64(spec.Count))
	})
	w.stop()
	log := w.tg.Log()
	require.Contains(t, log, "is damaged", "the E! line of the damaged segment")
	require.Contains(t, log, "E! [outputs.omnicore] Spool segment")
	require.Zero(t, ParseLog(log).Restarts, "the output did not crash")
	lost := w.tally.Missing(spec.Count)
	for _, n := range lost {
		require.True(t, damaged[n], "metric %d was not in a damaged part and was lost", n)
	}
	require.LessOrEqual(t, len(damaged), 2, "a flipped byte damages one record, a cut one more")
	t.Logf("damaged spool: sent %d, %d in damaged records, received %d, duplicated %d, lost %d (all in the damaged records)",
		spec.Count, len(damaged), w.tally.Unique(), w.tally.Duplicates(), len(lost))

	// And the repaired spool opens cleanly.
	s, err := spool.Open(context.Background(), spool.Options{Dir: dir, Log: &testutil.CaptureLogger{}})
	require.NoError(t, err)
	require.NoError(t, s.Close())
}

// TestSpoolLossesReported: what a damaged spool loses is said, with its
// count. A middle segment emptied (a filesystem crash) is reported at W!
// with an estimate of the metrics it held, where it used to be an I! line;
// one bit flipped in a record's length field in the last segment costs that
// record only, with an E! counting it, where the valid records after it
// used to be truncated away as a torn tail and later set aside unreplayed.
// The metrics missing are exactly those.
func TestSpoolLossesReported(t *testing.T) {
	d := spoolThenStop(t)
	w, spec, devices, plugin, before, segs := d.w, d.spec, d.devices, d.plugin, d.before, d.segs
	damaged := map[int64]bool{}

	// The second segment emptied.
	require.NoError(t, os.Truncate(segs[1], 0))
	for _, n := range before[segs[1]] {
		damaged[n] = true
	}
	emptied := len(before[segs[1]])

	// One bit of the length of the last segment's 11th record flipped (+1 MiB).
	last := segs[len(segs)-1]
	recs, err := spool.SegmentRecords(last)
	require.NoError(t, err)
	require.Greater(t, len(recs), 20)
	off := 8 // the segment header, then records of a 16-byte header and the payload (execd/spool/format.go)
	for _, r := range recs[:10] {
		off += 16 + len(r)
	}
	b, err := os.ReadFile(last)
	require.NoError(t, err)
	b[off+2] ^= 0x10
	require.NoError(t, os.WriteFile(last, b, 0o600))
	for _, n := range metricNumbers(t, recs[10]) {
		damaged[n] = true
	}
	setAside := 1 // the record with the bad length

	require.NoError(t, w.srv.Restart())
	w.spoolTelegraf(agentWith("  metric_buffer_limit = 100000"), GenSpec{Count: 1, First: spec.Count, Rate: 1, Devices: devices, Pad: 64}, plugin, false)
	w.waitFor(2*time.Minute, "every undamaged metric", func() bool {
		for n := range spec.Count {
			if !damaged[int64(n)] && !w.tally.Has(int64(n)) {
				return false
			}
		}
		return w.tally.Has(int64(spec.Count))
	})
	w.stop()
	log := w.tg.Log()
	require.Zero(t, ParseLog(log).Restarts, "the output did not crash")

	estimate := regexp.MustCompile(`W! \[outputs\.omnicore\] Spool segment \S+ was empty though later segments exist: its metrics were lost, about (\d+)`).FindStringSubmatch(log)
	require.NotNil(t, estimate, "the W! line of the emptied segment")
	exact := regexp.MustCompile(`E! \[outputs\.omnicore\] Spool segment \S+ is damaged .* keeping its 10 records before the damage and \d+ intact ones after it; at least (\d+) metrics are lost`).FindStringSubmatch(log)
	require.NotNil(t, exact, "the E! line of the bad length field")
	reportedEmpty, err := strconv.Atoi(estimate[1])
	require.NoError(t, err)
	reportedAside, err := strconv.Atoi(exact[1])
	require.NoError(t, err)
	require.Equal(t, setAside, reportedAside, "the record with the bad length is counted")
	require.InEpsilon(t, emptied, reportedEmpty, 0.05, "the emptied segment's metrics, estimated")
	_, err = os.Stat(last + ".corrupt")
	require.NoError(t, err, "the damaged segment is set aside whole, not deleted")

	lost := w.tally.Missing(spec.Count)
	require.Len(t, lost, emptied+setAside, "the metrics missing are those of the damage, no more")
	for _, n := range lost {
		require.True(t, damaged[n], "metric %d was not in a damaged part and was lost", n)
	}
	t.Logf("spool damage: sent %d, received %d, duplicated %d, lost %d: %d in an emptied middle segment (reported about %d at W!), %d with a bad length field (reported %d at E!)",
		spec.Count, w.tally.Unique(), w.tally.Duplicates(), len(lost), emptied, reportedEmpty, setAside, reportedAside)
}
