package hardening

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/e2e"
)

// The edge's margins of the execd output (issue 21 items 2 and 4, issue 23
// item 2): a stop of Telegraf under back-pressure, telegraf --once, and an
// edited plugin file, through a real Telegraf, counting every metric.

// hostTable is the plugin file's [telegraf_omnicore] table with lines.
func hostTable(lines ...string) string {
	return "\n[telegraf_omnicore]\n" + strings.Join(lines, "\n") + "\n"
}

var lostLine = regexp.MustCompile(`Stopping outputs\.omnicore: (\d+) metrics not acknowledged by the bridge are lost`)

// reportedLost sums the metrics the output processes reported lost at E!.
func reportedLost(log string) int {
	n := 0
	for _, m := range lostLine.FindAllStringSubmatch(log, -1) {
		k, _ := strconv.Atoi(m[1])
		n += k
	}
	return n
}

// TestStopWithFullSpoolAndBridgeDown: the spool full (64 KiB) and the bridge
// down, Telegraf is stopped with SIGTERM: its last flush writes its buffer
// into the output's pipe, which the output reads (into memory), so the stop
// completes within 10 s instead of hanging; what memory held and the full
// spool could not keep is reported at E! with its count; after a restart
// with the bridge up, every metric not reported lost arrives. Also with two
// [[outputs.execd]] blocks using one plugin file (one spool: the second
// process reads into memory while the first holds the spool's lock).
func TestStopWithFullSpoolAndBridgeDown(t *testing.T) {
	for _, outputs := range []int{1, 2} {
		t.Run(strconv.Itoa(outputs)+" outputs", func(t *testing.T) {
			w := newWorld(t)
			devices := deviceNames("dev", 5)
			gw := w.gateway(devices...)
			plugin := w.write("omnicore-output.conf", gw.OutputFile()+hostTable(`  spool_max_size = "64KiB"`))
			spec := GenSpec{Count: 5000, Rate: 2000, Devices: devices, Pad: 64, Record: filepath.Join(w.dir, "record.txt")}
			w.srv.Stop()
			blocks := strings.Repeat(outputBlock(plugin), outputs)
			if outputs == 2 {
				blocks = outputBlock(plugin) + strings.Replace(outputBlock(plugin), `alias = "omnicore"`, `alias = "omnicore2"`, 1)
			}
			path := w.write("telegraf.conf", agentWith("  metric_buffer_limit = 100000")+w.generatorInput(spec)+blocks)
			tg, err := e2e.StartTelegraf(telegrafBin, path, w.env, nil)
			require.NoError(t, err)
			w.tg = tg
			t.Cleanup(func() {
				tg.Kill()
				if t.Failed() {
					t.Logf("Telegraf log:\n%s", tail(quiet(tg.Log()), 200))
				}
			})
			w.waitFor(time.Minute, "the spool-full warning", func() bool { return strings.Contains(tg.Log(), "The spool is full") })
			w.generated(spec.Record, spec)

			took, err := tg.Stop(30 * time.Second)
			require.NoError(t, err, "Telegraf stopped in %s", took)
			require.Less(t, took, 10*time.Second, "Telegraf's stop with the spool full and the bridge down")
			lost := reportedLost(tg.Log())

			// Restart with the bridge up: the spool is replayed.
			require.NoError(t, w.srv.Restart())
			next := GenSpec{First: spec.Count, Count: 1, Rate: 10, Devices: devices, Record: filepath.Join(w.dir, "record-2.txt")}
			w.spoolTelegraf(agentWith("  metric_buffer_limit = 100000"), next, plugin, false)
			w.waitFor(time.Minute, "the replay", func() bool { return w.tally.Has(int64(spec.Count)) && w.tally.Unique() >= spec.Count+1-lost })
			w.stop()
			missing := w.tally.Missing(spec.Count)
			t.Logf("%d output(s), spool full, bridge down, SIGTERM: stop took %s; sent %d, received %d, duplicated %d, lost %d (reported lost at E!: %d)",
				outputs, took.Round(time.Millisecond), spec.Count, w.tally.Unique()-1, w.tally.Duplicates(), len(missing), lost)
			require.LessOrEqual(t, len(missing), lost, "every metric lost was reported")
		})
	}
}

// runOnce runs telegraf --once with config and returns its log, exit error
// and run time.
func (w *world) runOnce(config string, wait time.Duration) (string, error, time.Duration) {
	w.t.Helper()
	path := w.write("telegraf-once.conf", config)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, telegrafBin, "--once", "--test-wait", strconv.Itoa(int(wait.Seconds())), "--config", path)
	cmd.Env = append(os.Environ(), w.env...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	return string(out), err, time.Since(start)
}

// TestOnceDelivers: telegraf --once hands the output 10,000 metrics and
// closes its stdin; the output publishes them while the bridge acknowledges
// before it exits. With the bridge down it exits at once, keeping them in
// the spool for the next start.
func TestOnceDelivers(t *testing.T) {
	const count = 10000
	const wait = 3 * time.Second // --test-wait: the generator's run

	// once runs telegraf --once with count metrics, the bridge down or not.
	once := func(t *testing.T, bridgeDown bool) (w *world, devices []string, plugin, log string, err error, took time.Duration) {
		w = newWorld(t)
		devices = deviceNames("dev", 10)
		gw := w.gateway(devices...)
		plugin = w.write("omnicore-output.conf", gw.OutputFile())
		spec := GenSpec{Count: count, Rate: 20000, Devices: devices, Record: filepath.Join(w.dir, "record.txt")}
		if bridgeDown {
			w.srv.Stop()
		}
		// One flush, at the end: Telegraf writes the 10,000 metrics into
		// the pipe just before it closes it, as a cron job's --once does.
		agent := strings.NewReplacer(`flush_interval = "100ms"`, `flush_interval = "1h"`,
			"metric_batch_size = 1000", "metric_batch_size = 20000").Replace(agentWith("  metric_buffer_limit = 100000"))
		log, err, took = w.runOnce(agent+w.generatorInput(spec)+outputBlock(plugin), wait)
		return w, devices, plugin, log, err, took
	}

	t.Run("bridge up", func(t *testing.T) {
		w, _, _, log, err, took := once(t, false)
		// Telegraf's exit status also counts the generator's read error
		// at its stop (inputs.execd, "file already closed"): not checked.
		t.Logf("telegraf --once: %v", err)
		require.NotContains(t, log, "output plugins unable to send", "%s", tail(quiet(log), 50))
		require.NotContains(t, log, "are lost")
		w.waitFor(10*time.Second, "the tally", func() bool { return w.tally.Unique() >= count })
		t.Logf("--once, bridge up: sent %d, received %d, duplicated %d, lost %d, in %s",
			count, w.tally.Unique(), w.tally.Duplicates(), len(w.tally.Missing(count)), took.Round(time.Millisecond))
		require.Empty(t, w.tally.Missing(count))
	})

	t.Run("bridge down", func(t *testing.T) {
		w, devices, plugin, log, _, took := once(t, true)
		t.Logf("--once, bridge down: exited in %s", took.Round(time.Millisecond))
		require.Less(t, took, wait+5*time.Second, "--test-wait, then a prompt exit:\n%s", tail(quiet(log), 50))
		require.Zero(t, w.tally.Unique())

		require.NoError(t, w.srv.Restart())
		next := GenSpec{First: count, Count: 1, Rate: 10, Devices: devices, Record: filepath.Join(w.dir, "record-2.txt")}
		w.spoolTelegraf(agentWith("  metric_buffer_limit = 100000"), next, plugin, false)
		w.waitFor(time.Minute, "every metric", func() bool { return w.tally.Unique() >= count+1 })
		w.stop()
		t.Logf("--once with the bridge down, then a start: sent %d, received %d, duplicated %d, lost %d",
			count, w.tally.Unique()-1, w.tally.Duplicates(), len(w.tally.Missing(count)))
		require.Empty(t, w.tally.Missing(count))
	})
}

// TestSpoolSurvivesServersEdit: 2,000 metrics spooled during an outage; the
// plugin file's servers is edited (127.0.0.1 to localhost, the same bridge);
// after the restart every metric arrives: the spool is the gateway's, not
// the connection's.
func TestSpoolSurvivesServersEdit(t *testing.T) {
	w := newWorld(t)
	devices := deviceNames("dev", 5)
	gw := w.gateway(devices...)
	plugin := w.write("omnicore-output.conf", gw.OutputFile())
	spec := GenSpec{Count: 2000, Rate: 2000, Devices: devices, Record: filepath.Join(w.dir, "record.txt")}
	w.srv.Stop()
	w.spoolTelegraf(agentWith(), spec, plugin, false)
	w.generated(spec.Record, spec)
	w.waitFor(time.Minute, "every metric written to the output", func() bool { return ParseLog(w.tg.Log()).Acked >= spec.Count })
	w.stop()

	edited := gw
	edited.Servers = []string{strings.Replace(gw.Servers[0], "127.0.0.1", "localhost", 1)}
	require.NotEqual(t, gw.Servers, edited.Servers)
	w.write("omnicore-output.conf", edited.OutputFile())
	require.NoError(t, w.srv.Restart())
	next := GenSpec{First: spec.Count, Count: 1, Rate: 10, Devices: devices, Record: filepath.Join(w.dir, "record-2.txt")}
	w.spoolTelegraf(agentWith(), next, plugin, false)
	w.waitFor(time.Minute, "every metric", func() bool { return w.tally.Unique() >= spec.Count+1 })
	w.stop()
	t.Logf("servers edited during an outage: sent %d, received %d, duplicated %d, lost %d",
		spec.Count, w.tally.Unique()-1, w.tally.Duplicates(), len(w.tally.Missing(spec.Count)))
	require.Empty(t, w.tally.Missing(spec.Count))
	require.Contains(t, w.tg.Log(), "Replaying 2000 metrics")
}

// mountTmpfs mounts a tmpfs of size on dir (created 0700), skipping the test
// when it cannot (not root, no mount); unmounted at the end.
func mountTmpfs(t *testing.T, dir, size string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	require.NoError(t, os.MkdirAll(dir, 0o700))
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
}

// TestSmallOrReadOnlyStateDisk: the state directory (the spool) on a 256 KiB
// tmpfs under the default spool_max_size of 1 GiB, or on a read-only one,
// with the bridge up; the output goes on from memory, and every metric
// arrives; no restart of the output. The small disk does not fail: the
// spool caps itself to what the disk has free (one W!) and is full (one
// W!), no E!. The read-only one cannot hold a new spool: one E! for its
// opening, none for a failure of the disk after.
func TestSmallOrReadOnlyStateDisk(t *testing.T) {
	for _, readOnly := range []bool{false, true} {
		name := "256KiB disk"
		if readOnly {
			name = "read-only disk"
		}
		t.Run(name, func(t *testing.T) {
			w := newWorld(t)
			mountTmpfs(t, w.state, "256k")
			if readOnly {
				out, err := exec.Command("mount", "-o", "remount,ro", w.state).CombinedOutput()
				require.NoError(t, err, "%s", out)
			}
			devices := deviceNames("dev", 5)
			gw := w.gateway(devices...)
			plugin := w.write("omnicore-output.conf", gw.OutputFile())
			spec := GenSpec{Count: 10000, Rate: 2000, Devices: devices, Pad: 64, Record: filepath.Join(w.dir, "record.txt")}
			w.spoolTelegraf(agentWith("  metric_buffer_limit = 100000"), spec, plugin, false)
			w.waitFor(2*time.Minute, "every metric", func() bool { return w.tally.Unique() >= spec.Count })
			w.stop()
			log := w.tg.Log()
			t.Logf("%s: sent %d, received %d, duplicated %d, lost %d; restarts of the output %d",
				name, spec.Count, w.tally.Unique(), w.tally.Duplicates(), len(w.tally.Missing(spec.Count)), ParseLog(log).Restarts)
			require.Empty(t, w.tally.Missing(spec.Count))
			require.Zero(t, ParseLog(log).Restarts, "no crash loop")
			require.Zero(t, strings.Count(log, "E! [outputs.omnicore] The spool's disk failed"), "the disk never failed")
			if readOnly {
				require.Equal(t, 1, strings.Count(log, "E! [outputs.omnicore] Opening the spool "), "one E! for the disk")
			} else {
				require.Equal(t, 1, strings.Count(log, "W! [outputs.omnicore] spool_max_size is 1073741824 bytes but the spool's filesystem has only"), "one W! for the cap")
				require.Equal(t, 1, strings.Count(log, "W! [outputs.omnicore] The spool is full"), "one W! for the overflow into memory")
				require.Zero(t, strings.Count(log, "E! [outputs.omnicore] Opening the spool "))
			}
		})
	}
}
