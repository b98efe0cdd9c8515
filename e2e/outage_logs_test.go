package e2e

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// outageLength is the bridge outage of TestOutageLogs: long enough for a
// "still down" warning to be due (once a minute) on each route.
const outageLength = 60 * time.Second

// A 60 s bridge outage, with the output and the input of one gateway and
// Telegraf at its default log level, is told in at most 3 E! and W! lines of
// our plugins on each route (begins, lasts, with where the backlog waits);
// a healthy start is one line at the default level; nothing is lost. Built
// in, Telegraf's agent adds `E! [agent] Error writing to outputs.omnicore:
// <our error>` once per flush interval, which no plugin can silence: our
// error there is one short sentence naming the outage and Telegraf's buffer.
// Under execd nothing is logged per flush. The two routes run at once, so
// the outage costs its length once.
func TestOutageLogs(t *testing.T) {
	for _, r := range routes {
		t.Run(r.name, func(t *testing.T) {
			t.Parallel()
			testOutageLogs(t, r)
		})
	}
}

func testOutageLogs(t *testing.T, r route) {
	const devices = 3
	s := newSetup(t)
	ids := generatorDevices(devices)
	gw := s.gatewayFor("plant", "edge-gw", ids...)
	// TLS, as in production (plain TCP draws a warning at start).
	gw.Servers = []string{s.srv.TLSURL}
	ca, err := s.srv.WriteCAFile(s.dir)
	require.NoError(t, err)
	gw.TLSCA = ca
	done := filepath.Join(s.dir, "generated")
	// Telegraf's default log level (info): no debug = true.
	agent := strings.Replace(Agent(time.Second, time.Second), "  debug = true\n", "", 1)
	// Ten metrics a second (a little less: sh forks a sleep for each) for
	// longer than the outage.
	total := int((outageLength + 5*time.Second) / (100 * time.Millisecond))
	tg := s.startBin(r.bin(), agent+
		pacedGenerator(total, devices, 100*time.Millisecond, done)+
		s.output(r, gw)+
		s.input(r, gw, ids))

	s.waitEmulator(60*time.Second, "the first metrics", func() bool { return len(countSeq(t, s.srv.Received()).seen) >= 20 })
	// Telegraf logs the lines of its execd children from its own goroutines:
	// wait for the start line rather than for the emulator alone.
	require.Eventually(t, func() bool { return len(startLines(tg.Log())) > 0 }, 30*time.Second, 20*time.Millisecond,
		"no line says the gateway connected")
	start := ourLines(tg.Log())
	t.Logf("%s: the healthy start at the default level:\n%s", r.name, strings.Join(start, "\n"))
	require.Len(t, start, 1, "a healthy start is one line")
	require.Regexp(t, `^I! \[(inputs|outputs)\.omnicore\] Connected to the bridge as "[^"]+"; 3 devices attached$`, start[0])

	s.srv.Stop()
	stopped := time.Now()
	mark := len(tg.Log())
	// The outage's length is what is under test: this wait is the fault.
	time.Sleep(outageLength)
	require.NoError(t, s.srv.Restart())
	s.waitFileExists(2*outageLength, done)
	s.waitEmulator(90*time.Second, "every metric after the outage", func() bool {
		return len(countSeq(t, s.srv.Received()).missing(total)) == 0
	})
	c := countSeq(t, s.srv.Received())
	t.Logf("%s: %s outage; sent %d, received %d unique, %d duplicates, 0 lost",
		r.name, outageLength, total, len(c.seen), c.duplicates)
	// The line that says the outage ended comes once the bridge acknowledges.
	require.Eventually(t, func() bool {
		return strings.Contains(tg.Log()[mark:], "after ")
	}, 30*time.Second, 20*time.Millisecond)
	elapsed := time.Since(stopped)
	_, err = tg.Stop(10 * time.Second)
	require.NoError(t, err)

	outage := tg.Log()[mark:]
	ours := ourLines(outage)
	var alarms []string
	for _, l := range ours {
		if level(l) == "E" || level(l) == "W" {
			alarms = append(alarms, l)
		}
	}
	agentLines := flushErrors(outage)
	t.Logf("%s: %s from the outage to the replay; our lines:\n%s\nTelegraf's agent: %d error lines, the first: %s; %d lines %q",
		r.name, elapsed.Round(time.Second), strings.Join(ours, "\n"), len(agentLines), first(agentLines),
		strings.Count(outage, flushSlow), flushSlow)
	require.NotEmpty(t, alarms, "the outage is not told at all")
	require.LessOrEqual(t, len(alarms), 3, "E! and W! lines of our plugins in a %s outage:\n%s", outageLength, strings.Join(alarms, "\n"))
	require.Equal(t, "E", level(alarms[0]), "an outage begins with an E!: %s", alarms[0])

	// Each line that speaks of the backlog names the one place it waits.
	where, elsewhere := "Telegraf's buffer", "spool"
	if !r.builtin {
		where, elsewhere = "spool", "Telegraf's buffer"
	}
	for _, l := range ours {
		require.NotContains(t, l, elsewhere, "the backlog of the %s route is not there", r.name)
	}
	require.Contains(t, alarms[0], where, "the first line says where the backlog waits")

	if !r.builtin {
		// outputs.execd only writes to the pipe, which the spool always
		// reads: nothing is logged per flush.
		require.Empty(t, agentLines, "under execd nothing is logged per flush")
		require.NotContains(t, outage, "did not complete within its flush interval")
		return
	}
	// Built in: one line per flush interval, by Telegraf's agent.
	require.NotEmpty(t, agentLines)
	for _, l := range agentLines {
		msg := l[strings.Index(l, "outputs.omnicore: ")+len("outputs.omnicore: "):]
		require.Contains(t, msg, "Telegraf's buffer", l)
		require.NotContains(t, msg, "; ", "one short sentence: %s", l)
		require.Less(t, len(msg), 160, "one short sentence: %s", l)
	}
}

var (
	// ourPrefix matches a line of our plugins: built in, Telegraf's own
	// "X! [outputs.omnicore] ..."; under execd the child's line inside
	// "E! [outputs.execd::omnicore] stderr: X! [outputs.omnicore] ..." (the
	// inner level is the real one) or, mapped by inputs.execd, "X!
	// [inputs.execd::omnicore] [inputs.omnicore] ...", or the output child's
	// stdout, "I! [outputs.execd::omnicore] X! [outputs.omnicore] ...".
	ourPrefix = regexp.MustCompile(`^\S+ ([EWIDT])! (?:\[(?:inputs|outputs)\.execd::omnicore\] (?:stderr: )?(?:([EWIDT])! )?)?\[(?:inputs|outputs)\.omnicore\]`)
	// ourBare matches a line of the execd binary without a plugin name,
	// under outputs.execd: "E! [outputs.execd::omnicore] stderr: W! ..." or
	// "I! [outputs.execd::omnicore] I! Stopped outputs.omnicore".
	ourBare = regexp.MustCompile(`^\S+ [EI]! \[outputs\.execd::omnicore\] (?:stderr: )?([EWIDT])! (.*)$`)
	// flushSlow is Telegraf's agent reporting a Write longer than the flush
	// interval: built in, a Write waits up to 1 s while the gateway is down.
	flushSlow = `W! [agent] ["outputs.omnicore"] did not complete within its flush interval`
	// flushError is Telegraf's agent reporting a failed write.
	flushError = regexp.MustCompile(`^\S+ E! \[agent\] Error writing to outputs\.(?:omnicore|execd)`)
)

// ourLines are the lines of our plugins in log, each with the level it was
// logged at by the plugin in front ("W! [outputs.omnicore] ...").
func ourLines(log string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		m := ourPrefix.FindStringSubmatchIndex(l)
		if m == nil {
			if b := ourBare.FindStringSubmatch(l); b != nil {
				out = append(out, b[1]+"! "+b[2])
			}
			continue
		}
		lvl := l[m[2]:m[3]]
		if m[4] >= 0 {
			lvl = l[m[4]:m[5]]
		}
		out = append(out, fmt.Sprintf("%s! %s", lvl, l[m[1]-len(pluginName(l[:m[1]])):]))
	}
	return out
}

// pluginName is the last "[...]" of prefix.
func pluginName(prefix string) string {
	return prefix[strings.LastIndexByte(prefix, '['):]
}

func level(line string) string { return line[:1] }

// startLines are our lines that say the gateway connected.
func startLines(log string) []string {
	var out []string
	for _, l := range ourLines(log) {
		if strings.Contains(l, "Connected to the bridge") {
			out = append(out, l)
		}
	}
	return out
}

func flushErrors(log string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if flushError.MatchString(l) {
			out = append(out, l)
		}
	}
	return out
}

func first(lines []string) string {
	if len(lines) == 0 {
		return "(none)"
	}
	return lines[0]
}

// pacedGenerator is generator with one metric every `every`.
func pacedGenerator(n, devices int, every time.Duration, done string) string {
	return strings.Replace(generator(n, devices, done), "sleep 0.01", fmt.Sprintf("sleep %g", every.Seconds()), 1)
}
