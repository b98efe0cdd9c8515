package hardening

import (
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/e2e"
	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/latencyproxy"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// scenario is one fault run: the generator writes count numbered metrics at
// rate through a real Telegraf into telegraf-omnicore under outputs.execd,
// inject applies the faults mid-stream, and the run is over once every
// metric was accepted by the bridge or counted as dropped by the output.
type scenario struct {
	name       string
	count      int
	rate       float64
	devices    []string // the generator's devices; bound to the gateway unless in unbound
	unbound    []string // devices the gateway may not attach
	stateEvery int
	output     []string // extra lines of the plugin table
	opts       []emulator.Option
	setup      func(w *world, gw *e2e.Gateway)
	inject     func(w *world, r *run) string                         // returns the faults survived
	live       func(t *testing.T, w *world, r *run)                  // before Telegraf stops
	check      func(t *testing.T, w *world, r *run, logf LogFigures) // after
	// killed allows the loss of metrics generated before a SIGKILL of the
	// output (run.kills), at most what one process can hold, and no other.
	killed bool
}

// run is the state of one scenario's run that inject shares with the checks.
type run struct {
	sc     *scenario
	record string
	// kills are the times the SIGKILLed output child was seen dead.
	kills []time.Time
}

// scale returns quick, or soakValue under -soak.
func scale[T any](quick, soakValue T) T {
	if *soak {
		return soakValue
	}
	return quick
}

// progress waits until the bridge accepted at least frac of the stream.
func (w *world) progress(r *run, frac float64) {
	w.t.Helper()
	want := int(float64(r.sc.count) * frac)
	w.waitEmulator(2*time.Minute, fmt.Sprintf("%d messages accepted", want), func() bool {
		return w.srv.Stats().MessagesAccepted >= want
	})
}

// reconnected waits until the gateway has an open connection other than old.
func (w *world) reconnected(old int) int {
	w.t.Helper()
	var id int
	w.waitEmulator(time.Minute, "a new gateway connection", func() bool {
		id = w.openConnection()
		return id != 0 && id != old
	})
	return id
}

func TestFaults(t *testing.T) {
	n := scale(2000, 20000)
	down := scale(3*time.Second, 10*time.Second)
	kicks := scale(5, 30)
	cuts := scale(3, 20)
	scenarios := []*scenario{
		{
			name: "bridge restart",
			inject: func(w *world, r *run) string {
				restarts := scale(1, 3)
				for i := range restarts {
					w.progress(r, float64(i+1)/float64(restarts+2))
					w.srv.Stop()
					time.Sleep(down) // the fault: the bridge is away for this long
					require.NoError(w.t, w.srv.Restart())
				}
				return fmt.Sprintf("bridge stopped %d× for %s, restarted", restarts, down)
			},
			live: func(t *testing.T, w *world, r *run) {
				require.Positive(t, w.connectionsClosed()[emulator.ReasonServerStop])
				require.ElementsMatch(t, r.sc.devices, w.srv.Attachments("plant", "edge-gw"), "every device re-attached")
			},
		},
		{
			name: "connections kicked",
			// A reconnect re-attaches the devices used since the previous
			// connect, the others on their next message: the stream must
			// outlast the kicks (under load, 5 reconnects can outlast
			// 2,000 metrics at 250/s) for every device to be attached at
			// the end.
			count: 3 * n,
			inject: func(w *world, r *run) string {
				for i := range kicks {
					w.progress(r, float64(i+1)/float64(kicks+2))
					old := w.reconnected(0)
					w.srv.KickAll()
					w.reconnected(old)
				}
				return fmt.Sprintf("%d kicks, each after the reconnect of the previous", kicks)
			},
			live: func(t *testing.T, w *world, r *run) {
				require.GreaterOrEqual(t, w.connectionsClosed()[emulator.ReasonKicked], kicks)
				require.ElementsMatch(t, r.sc.devices, w.srv.Attachments("plant", "edge-gw"), "every device re-attached")
			},
		},
		{
			name: "pubacks delayed and withheld",
			// The gateway resends an unacknowledged message after timeout,
			// inside the Write: write_timeout must leave room for that, or
			// every Write ends before a resend. The execd output keeps up
			// to 4 Writes in flight, so a withheld PUBACK holds up its own
			// batch, not the pipe: 500 withheld took 18 s, 50 took 8 s
			// (with one Write in flight, 50 could take minutes: each 2 s
			// timeout consumed one or two). The quick run withholds 100,
			// the soak 500.
			output: []string{`timeout = "2s"`, `write_timeout = "30s"`},
			inject: func(w *world, r *run) string {
				w.progress(r, 0.2)
				w.srv.SetPubackDelay(200 * time.Millisecond)
				w.progress(r, 0.4)
				w.srv.WithholdPubacks(scale(100, 500))
				w.waitFor(scale(2*time.Minute, 30*time.Minute), "the PUBACKs withheld", func() bool { return w.srv.Stats().Withheld >= scale(100, 500) })
				w.progress(r, 0.7)
				w.srv.SetPubackDelay(0)
				return fmt.Sprintf("PUBACKs delayed 200 ms for half the stream, %d withheld (messages dropped unacknowledged)", w.srv.Stats().Withheld)
			},
			check: func(t *testing.T, w *world, r *run, logf LogFigures) {
				require.Equal(t, scale(100, 500), w.srv.Stats().Withheld)
			},
		},
		{
			name:  "token renewals",
			count: scale(2100, 12000),
			rate:  100,
			// The bridge closes a connection at the token's exp (no skew):
			// only a renewal ahead of it keeps the stream whole.
			output: []string{`token_lifetime = "10s"`},
			opts:   []emulator.Option{emulator.WithRules(func(r *emulator.Rules) { r.ClockSkew = 0 })},
			inject: func(w *world, r *run) string {
				renewals := scale(2, 10)
				w.waitEmulator(3*time.Minute, fmt.Sprintf("%d token renewals", renewals), func() bool {
					return w.connectionsClosed()[emulator.ReasonClientDisconnect] >= renewals
				})
				closed := w.connectionsClosed()
				faults := fmt.Sprintf("%d token renewals (10 s tokens, the bridge enforcing exp)", closed[emulator.ReasonClientDisconnect])
				if n := closed[emulator.ReasonTokenExpired]; n > 0 {
					// A renewal can come too late by up to a second: see
					// TestSecuritySessionKnowsWhenItsTokenExpires (gateway).
					faults += fmt.Sprintf(", %d connections closed by the bridge at exp", n)
				}
				return faults
			},
		},
		attachRefused(true),
		attachRefused(false),
		{
			name:       "state rate limit",
			devices:    deviceNames("dev", 4),
			rate:       200,
			stateEvery: 5, // 40 states/s: 10 per second per device, the bridge takes 1
			output:     []string{`state_metrics = ["devstate"]`},
			inject: func(w *world, r *run) string {
				return "state at 10/s per device against the bridge's 1/s"
			},
			check: func(t *testing.T, w *world, r *run, logf LogFigures) {
				st := w.srv.Stats()
				require.Zero(t, st.DroppedStateRate, "the bridge dropped state for going too fast")
				require.Zero(t, st.BridgeDetaches, "the bridge detached a device for going too fast")
				for _, e := range w.srv.ErrorsSent() {
					require.NotEqual(t, omnicore.ErrorDetachedByError, e.Error.ErrorType)
				}
				// Every state was accepted or coalesced into a later one.
				states := r.sc.count / r.sc.stateEvery
				require.Equal(t, states, st.StateAccepted+logf.Dropped["state_coalesced"], "states accepted + coalesced")
				require.Equal(t, logf.DroppedTotal(), logf.Dropped["state_coalesced"], "only coalesced states dropped")
				require.Positive(t, st.StateAccepted)
				last := map[string]time.Time{}
				for _, m := range w.srv.Received() {
					if m.Kind != omnicore.KindState {
						continue
					}
					if prev, ok := last[m.Device]; ok {
						require.GreaterOrEqual(t, m.Time.Sub(prev), omnicore.StateInterval, "state of %s", m.Device)
					}
					last[m.Device] = m.Time
				}
			},
		},
		{
			name: "slow link cut",
			setup: func(w *world, gw *e2e.Gateway) {
				p, err := latencyproxy.New(strings.TrimPrefix(w.srv.URL, "tcp://"), 50*time.Millisecond)
				require.NoError(w.t, err)
				w.t.Cleanup(func() { p.Close() })
				gw.Servers = []string{"tcp://" + p.Addr()}
				w.proxy = p
			},
			inject: func(w *world, r *run) string {
				for i := range cuts {
					w.progress(r, float64(i+1)/float64(cuts+2))
					old := w.reconnected(0)
					w.proxy.CutAll()
					w.reconnected(old)
				}
				return fmt.Sprintf("100 ms round trip, link cut %d×", cuts)
			},
			live: func(t *testing.T, w *world, r *run) {
				// The bridge sees a cut as a lost connection or a failed write.
				closed := w.connectionsClosed()
				require.GreaterOrEqual(t, closed[emulator.ReasonConnectionLost]+closed[emulator.ReasonWriteFailed], cuts, "closed connections: %v", closed)
			},
		},
		{
			name: "output killed (SIGKILL) with spool",
			inject: func(w *world, r *run) string {
				kills := scale(1, 5)
				for i := range kills {
					w.progress(r, float64(i+1)/float64(kills+2))
					// With the bridge away the output spools what it reads.
					w.srv.Stop()
					time.Sleep(time.Second) // the fault: metrics arrive while the bridge is away
					pid := w.outputChild()
					require.NotZero(w.t, pid, "no telegraf-omnicore output child")
					require.NoError(w.t, syscall.Kill(pid, syscall.SIGKILL))
					w.waitFor(10*time.Second, "the killed child's death", func() bool { return !e2e.Alive(pid) })
					r.kills = append(r.kills, time.Now())
					require.NoError(w.t, w.srv.Restart())
					w.waitFor(30*time.Second, "outputs.execd restarting the child", func() bool {
						c := w.outputChild()
						return c != 0 && c != pid
					})
				}
				return fmt.Sprintf("output child killed %d× with SIGKILL 1 s into a bridge outage, restarted by outputs.execd after 1 s; it replays its spool", kills)
			},
			killed: true,
			check: func(t *testing.T, w *world, r *run, logf LogFigures) {
				require.GreaterOrEqual(t, logf.Restarts, scale(1, 5))
				require.Contains(t, w.tg.Log(), "Replaying", "the restarted child replays its spool")
			},
		},
		{
			name:   "output killed (SIGKILL) without spool",
			output: []string{"spool = false"},
			inject: func(w *world, r *run) string {
				kills := scale(1, 5)
				for i := range kills {
					w.progress(r, float64(i+1)/float64(kills+2))
					// With the bridge away the output holds in memory what
					// it reads (spool = false): a kill takes it all, so
					// the kill comes as soon as the outage is logged.
					w.srv.Stop()
					failed := strings.Count(w.tg.Log(), "failed:")
					w.waitFor(time.Minute, "the output's outage logged", func() bool {
						return strings.Count(w.tg.Log(), "failed:") > failed
					})
					pid := w.outputChild()
					require.NotZero(w.t, pid, "no telegraf-omnicore output child")
					require.NoError(w.t, syscall.Kill(pid, syscall.SIGKILL))
					w.waitFor(10*time.Second, "the killed child's death", func() bool { return !e2e.Alive(pid) })
					r.kills = append(r.kills, time.Now())
					require.NoError(w.t, w.srv.Restart())
					w.waitFor(30*time.Second, "outputs.execd restarting the child", func() bool {
						c := w.outputChild()
						return c != 0 && c != pid
					})
				}
				return fmt.Sprintf("output child killed %d× with SIGKILL as the bridge went away (what it read since is in memory), restarted by outputs.execd after 1 s", kills)
			},
			killed: true,
			check: func(t *testing.T, w *world, r *run, logf LogFigures) {
				require.GreaterOrEqual(t, logf.Restarts, scale(1, 5))
			},
		},
	}

	var (
		mu   sync.Mutex
		figs []Figures
	)
	t.Run("group", func(t *testing.T) {
		for _, sc := range scenarios {
			t.Run(sc.name, func(t *testing.T) {
				t.Parallel()
				if sc.count == 0 {
					sc.count = n
				}
				if sc.rate == 0 {
					sc.rate = 250
				}
				if sc.devices == nil {
					sc.devices = deviceNames("dev", 10)
				}
				fig := runScenario(t, sc)
				t.Logf("%s: in %d, acked %d, received %d, duplicates %d, dropped %d, lost %d in %s; %s",
					sc.name, fig.In, fig.Acked, fig.Received, fig.Duplicates, fig.Dropped, fig.Lost, fig.Duration.Round(time.Millisecond), fig.Faults)
				mu.Lock()
				figs = append(figs, fig)
				mu.Unlock()
			})
		}
	})
	if len(figs) > 0 {
		t.Logf("fault figures (acked: written by outputs.execd into the pipe; received: distinct metrics the bridge acknowledged; dropped: counted and logged by telegraf-omnicore):\n%s", Table(figs))
		if path := os.Getenv("OMNICORE_FIGURES"); path != "" {
			require.NoError(t, os.WriteFile(path, []byte(Markdown(figs)), 0o644))
		}
	}
}

// attachRefused is the scenario of devices the bridge refuses to attach,
// with or without a PUBACK for the refused attach.
func attachRefused(puback bool) *scenario {
	name := "attach refused with PUBACK"
	if !puback {
		name = "attach refused without PUBACK"
	}
	devices := append(deviceNames("dev", 8), "stranger", "ghost")
	return &scenario{
		name:    name,
		devices: devices,
		unbound: []string{"stranger", "ghost"},
		opts:    []emulator.Option{emulator.WithRules(func(r *emulator.Rules) { r.AttachFailurePuback = puback })},
		setup: func(w *world, gw *e2e.Gateway) {
			// stranger is registered but not bound; ghost is unknown.
			require.NoError(w.t, w.srv.AddDevice("plant", emulator.Device{ID: "stranger"}))
		},
		inject: func(w *world, r *run) string {
			w.waitEmulator(time.Minute, "both refusals", func() bool {
				refused := map[string]bool{}
				for _, e := range w.srv.ErrorsSent() {
					if e.Error.ErrorType == omnicore.ErrorAttachment {
						refused[e.Error.DeviceID] = true
					}
				}
				return refused["stranger"] && refused["ghost"]
			})
			return "2 of 10 devices refused at every attach"
		},
		check: func(t *testing.T, w *world, r *run, logf LogFigures) {
			refused := 0
			for i := range r.sc.count {
				if d := devices[i%len(devices)]; d == "stranger" || d == "ghost" {
					refused++
					require.False(t, w.tally.Has(int64(i)), "metric %d of refused device %s accepted", i, d)
				}
			}
			require.Equal(t, refused, logf.Dropped["attach_refused"], "every metric of a refused device counted as attach_refused")
			require.Equal(t, refused, logf.DroppedTotal())
		},
	}
}

var topicOK = regexp.MustCompile(`^/plant/([A-Za-z][A-Za-z0-9._~%-]*)/(events|state)$`)

// runScenario runs sc and returns its figures; it fails the test when a
// metric that Telegraf handed to the output was lost (unless sc allows the
// loss) or went anywhere but its own device's topic.
func runScenario(t *testing.T, sc *scenario) Figures {
	w := newWorld(t, sc.opts...)
	var bound []string
	for _, d := range sc.devices {
		if !contains(sc.unbound, d) {
			bound = append(bound, d)
		}
	}
	gw := w.gateway(bound...)
	r := &run{sc: sc, record: w.dir + "/record.txt"}
	if sc.setup != nil {
		sc.setup(w, &gw)
	}
	output := w.write("omnicore-output.conf", gw.OutputFile(sc.output...))
	spec := GenSpec{Count: sc.count, Rate: sc.rate, Devices: sc.devices, StateEvery: sc.stateEvery, Pad: 64, Record: r.record}
	start := time.Now()
	w.start(agent + w.generatorInput(spec) + outputBlock(output))

	faults := sc.inject(w, r)
	timeout := time.Duration(float64(sc.count)/sc.rate*float64(time.Second)) + 90*time.Second
	if sc.killed {
		// Some metrics may be gone: wait for the last one, then stop
		// Telegraf, which makes the output write everything it holds.
		w.waitFor(timeout, "the last metric", func() bool { return w.tally.Has(int64(sc.count - 1)) })
	} else {
		w.waitFor(timeout, "every metric accepted or counted as dropped", func() bool {
			return w.tally.Unique() >= sc.count || w.tally.Unique()+ParseLog(w.tg.Log()).DroppedTotal() >= sc.count
		})
	}
	elapsed := time.Since(start)
	if sc.live != nil {
		sc.live(t, w, r)
	}
	w.stop()

	logf := ParseLog(w.tg.Log())
	fig := Figures{
		Scenario:   sc.name,
		Faults:     faults,
		In:         sc.count,
		Acked:      logf.Acked,
		Received:   w.tally.Unique(),
		Duplicates: w.tally.Duplicates(),
		Dropped:    logf.DroppedTotal(),
		Duration:   elapsed,
	}
	fig.Lost = fig.In - fig.Received - fig.Dropped
	require.False(t, logf.Overflow, "Telegraf's buffer overflowed: the run is sized wrongly")
	require.Zero(t, logf.Unacknowledged, "the output reported metrics not acknowledged at shutdown")
	require.Zero(t, w.tally.Others(), "messages that are not the generator's")
	for topic := range w.tally.Topics() {
		require.Regexp(t, topicOK, topic)
	}
	for i := range int64(sc.count) {
		if d := w.tally.Device(i); d != "" {
			require.Equal(t, sc.devices[int(i)%len(sc.devices)], d, "metric %d arrived on another device's topic", i)
		}
	}

	missing := w.tally.Missing(sc.count)
	if !sc.killed {
		require.GreaterOrEqual(t, fig.Acked, fig.In, "Telegraf did not write every metric to the output")
		if fig.Dropped == 0 {
			require.Empty(t, missing, "acknowledged metrics lost")
		}
		require.Zero(t, fig.Lost, "metrics neither received nor counted as dropped: %v", head(missing, 20))
	} else {
		requireLossOnlyToKills(t, r, missing)
	}
	if sc.check != nil {
		sc.check(t, w, r, logf)
	}
	return fig
}

// maxHeldByProcess bounds what a SIGKILLed output takes with it: the metrics
// it read (one batch, -batch_size 1000) plus what fits in the pipe Telegraf
// writes into (64 KiB on Linux, lines of at least 100 bytes here). With the
// spool it holds far less: what it read but did not write to the spool yet
// (one 64 KiB read) and the pipe.
const maxHeldByProcess = 1000 + 64<<10/100

// requireLossOnlyToKills checks the metrics lost in a run with SIGKILLs:
// each was generated before a kill was confirmed (Telegraf keeps and retries
// whatever it writes after the child is dead), and no kill took more than
// one process can hold.
func requireLossOnlyToKills(t *testing.T, r *run, missing []int64) {
	t.Helper()
	require.NotEmpty(t, r.kills)
	gen, err := ReadRecord(r.record)
	require.NoError(t, err)
	require.Len(t, gen, r.sc.count)
	perKill := make([]int, len(r.kills))
	for _, n := range missing {
		k := sort.Search(len(r.kills), func(i int) bool { return gen[n].Before(r.kills[i]) })
		require.Less(t, k, len(r.kills), "metric %d, generated %s after the last kill was confirmed, was lost", n, gen[n].Sub(r.kills[len(r.kills)-1]))
		perKill[k]++
	}
	for i, lost := range perKill {
		require.LessOrEqual(t, lost, maxHeldByProcess, "kill %d took more metrics than one process holds", i+1)
	}
	t.Logf("metrics lost to each SIGKILL: %v (bound %d)", perKill, maxHeldByProcess)
}

func contains(list []string, s string) bool {
	for _, l := range list {
		if l == s {
			return true
		}
	}
	return false
}

func head(s []int64, n int) []int64 {
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s) > n {
		return s[:n]
	}
	return s
}
