package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
)

// tally counts the numbered metrics (field n) the bridge accepted.
type tally struct {
	seen       map[int64]int
	duplicates int
}

func countSeq(t *testing.T, msgs []emulator.Message) tally {
	t.Helper()
	c := tally{seen: make(map[int64]int)}
	for _, m := range msgs {
		for _, pm := range parseLines(t, m.Payload) {
			if pm.Name() != "seq" {
				continue
			}
			n, ok := pm.GetField("n")
			require.True(t, ok)
			c.seen[n.(int64)]++
			if c.seen[n.(int64)] > 1 {
				c.duplicates++
			}
		}
	}
	return c
}

// missing lists the numbers of 1..total the bridge has not accepted.
func (c tally) missing(total int) []int64 {
	var out []int64
	for n := int64(1); n <= int64(total); n++ {
		if c.seen[n] == 0 {
			out = append(out, n)
		}
	}
	return out
}

// waitFileExists waits, up to d, for path to exist.
func (s *setup) waitFileExists(d time.Duration, path string) {
	s.t.Helper()
	require.Eventually(s.t, func() bool {
		_, err := os.Stat(path)
		return err == nil
	}, d, 20*time.Millisecond, "%s was not created within %s", filepath.Base(path), d)
}

// A bridge outage in the middle of a stream loses nothing, on both routes:
// what the bridge did not acknowledge stays in Telegraf's buffer (built in)
// or in the execd binary's retried batch, and goes once the bridge is back.
func TestBridgeOutageNothingLost(t *testing.T) {
	for _, r := range routes {
		t.Run(r.name, func(t *testing.T) { testBridgeOutage(t, r) })
	}
}

func testBridgeOutage(t *testing.T, r route) {
	const total, devices = 300, 10
	s := newSetup(t)
	gw := s.gatewayFor("plant", "edge-gw", generatorDevices(devices)...)
	done := filepath.Join(s.dir, "generated")
	tg := s.startBin(r.bin(), Agent(time.Second, 200*time.Millisecond)+
		generator(total, devices, done)+
		s.output(r, gw))

	s.waitEmulator(60*time.Second, "the first metrics", func() bool { return len(s.srv.Received()) >= 20 })
	s.srv.Stop()
	t.Logf("bridge stopped after %d messages", len(s.srv.Received()))
	s.waitFileExists(60*time.Second, done)
	require.NoError(t, s.srv.Restart())
	s.waitEmulator(90*time.Second, "every metric after the outage", func() bool {
		return len(countSeq(t, s.srv.Received()).missing(total)) == 0
	})
	c := countSeq(t, s.srv.Received())
	t.Logf("%s: sent %d, received %d unique, %d duplicates, 0 lost", r.name, total, len(c.seen), c.duplicates)

	elapsed, err := tg.Stop(10 * time.Second)
	require.NoError(t, err)
	t.Logf("Telegraf stopped in %s", elapsed)
	require.Less(t, elapsed, 5*time.Second)
}

// Built in, with Telegraf's disk buffer: Telegraf stopped during an outage
// keeps what the bridge did not acknowledge on disk, and the next Telegraf
// delivers it. Telegraf stops in under 5 s with the bridge down and up.
func TestBuiltinDiskBufferRestartDuringOutage(t *testing.T) {
	const total, devices = 200, 5
	r := route{name: "builtin", builtin: true}
	s := newSetup(t)
	gw := s.gatewayFor("plant", "edge-gw", generatorDevices(devices)...)
	bufferDir := filepath.Join(s.dir, "buffer")
	require.NoError(t, os.Mkdir(bufferDir, 0o700))
	agent := Agent(time.Second, 200*time.Millisecond) +
		"  buffer_strategy = \"disk\"\n  buffer_directory = " + Quote(bufferDir) + "\n"
	output := s.output(r, gw)

	done := filepath.Join(s.dir, "generated")
	first := s.startBin(r.bin(), agent+generator(total, devices, done)+output)
	s.waitEmulator(60*time.Second, "the first metrics", func() bool { return len(s.srv.Received()) >= 20 })
	s.srv.Stop()
	before := countSeq(t, s.srv.Received())
	s.waitFileExists(60*time.Second, done)

	elapsed, err := first.Stop(10 * time.Second)
	require.NoError(t, err)
	t.Logf("Telegraf stopped in %s with the bridge down; %d of %d delivered before the outage", elapsed, len(before.seen), total)
	require.Less(t, elapsed, 5*time.Second)

	// The same output table (Telegraf keys the disk buffer by it), without
	// the generator: what the second Telegraf delivers came from the disk.
	second := s.startBin(r.bin(), agent+"[[inputs.internal]]\n  collect_memstats = false\n"+output)
	require.NoError(t, s.srv.Restart())
	s.waitEmulator(90*time.Second, "every metric from the disk buffer", func() bool {
		return len(countSeq(t, s.srv.Received()).missing(total)) == 0
	})
	c := countSeq(t, s.srv.Received())
	t.Logf("sent %d, received %d unique, %d duplicates, 0 lost", total, len(c.seen), c.duplicates)

	elapsed, err = second.Stop(10 * time.Second)
	require.NoError(t, err)
	t.Logf("Telegraf stopped in %s with the bridge up", elapsed)
	require.Less(t, elapsed, 5*time.Second)
}

// generatorDevices are the device IDs generator uses.
func generatorDevices(n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = "dev-" + strconv.Itoa(i)
	}
	return ids
}
