package main

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/require"
)

func TestMetricKeys(t *testing.T) {
	tests := []struct {
		name    string
		payload string
		keys    []int64
		bad     int
	}{
		{name: "line protocol", payload: "sensor a=1 10\nsensor a=2 20\n", keys: []int64{10, 20}},
		{name: "line protocol without the last newline", payload: "sensor a=1 10\nsensor a=2 20", keys: []int64{10, 20}},
		{name: "a line without timestamp", payload: "sensor a=1 10\nsensor\n", keys: []int64{10}, bad: 1},
		{name: "json metric", payload: `{"fields":{"a":1},"name":"sensor","tags":{"device_id":"d"},"timestamp":1700000000}`,
			keys: []int64{1700000000}},
		{name: "json batch", payload: `{"metrics":[{"fields":{"a":1},"name":"s","timestamp":1},{"fields":{"a":2},"name":"s","timestamp":2}]}` + "\n",
			keys: []int64{1, 2}},
		{name: "json metric without timestamp", payload: `{"fields":{"a":1},"name":"sensor"}`, bad: 1},
		{name: "json batch with one without timestamp", payload: `{"metrics":[{"name":"s","timestamp":5},{"name":"s"}]}`,
			keys: []int64{5}, bad: 1},
		{name: "broken json", payload: `{"metrics":[`, bad: 1},
		{name: "empty", payload: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, bad := metricKeys([]byte(tt.payload))
			require.Equal(t, tt.keys, keys)
			require.Equal(t, tt.bad, bad)
		})
	}
}

func TestReceiverCountsJSONAndMessages(t *testing.T) {
	r := newReceiver()
	r.observe([]byte(`{"metrics":[{"name":"s","timestamp":1},{"name":"s","timestamp":2}]}`))
	r.observe([]byte(`{"name":"s","timestamp":2}`))
	r.observe([]byte(`{"name":"s"}`))
	require.Equal(t, int64(3), r.messages())
	require.Equal(t, tally{sent: 3, received: 2, missing: 1, duplicates: 1, unexpected: 1}, r.count([]int64{1, 2, 3}))
	r.reset(false)
	require.Zero(t, r.messages())
}

func TestStatCPUTicks(t *testing.T) {
	// proc(5): utime, stime, cutime and cstime are fields 14 to 17.
	fields := func(name string, cpu ...string) string {
		f := []string{"1234", name, "S"}
		for i := 4; i <= 13; i++ {
			f = append(f, "0")
		}
		f = append(f, cpu...)
		for i := 18; i <= 52; i++ {
			f = append(f, "7")
		}
		return strings.Join(f, " ")
	}
	tests := []struct {
		name    string
		stat    string
		want    int64
		wantErr string
	}{
		{name: "plain", stat: fields("(telegraf)", "100", "20", "3", "4"), want: 127},
		{name: "a name with spaces and parentheses", stat: fields("(a) b (c))", "1", "2", "3", "4"), want: 10},
		{name: "no name", stat: "1234 telegraf S 0", wantErr: "no command name"},
		{name: "cut short", stat: "1234 (telegraf) S 0 0 0", wantErr: "fields after the command name"},
		{name: "not a number", stat: fields("(x)", "1", "x", "3", "4"), wantErr: "CPU time"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := statCPUTicks([]byte(tt.stat + "\n"))
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.want, got)
		})
	}
}

// TestTreeCPUCountsChildren runs a shell that burns CPU in a child it
// waited for and in one still running: the tree's CPU counts both.
func TestTreeCPUCountsChildren(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc on this system")
	}
	// Each busy loop spins until it used 300 ms of CPU (SECONDS has a
	// resolution of a second, so the loop counts iterations instead and
	// the test reads what it used).
	cmd := exec.Command("sh", "-c", `
busy() { i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; }
( busy ) ; echo waited
busy &
echo started
wait`)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	buf := make([]byte, 64)
	var seen string
	for !strings.Contains(seen, "started") {
		n, err := out.Read(buf)
		require.NoError(t, err)
		seen += string(buf[:n])
	}
	first, err := treeCPU(cmd.Process.Pid)
	require.NoError(t, err)
	// The waited-for child's CPU is in the shell's cutime: it alone is
	// more than a few ticks.
	require.GreaterOrEqual(t, first, 20*time.Millisecond, "the waited-for child is counted")
	require.NoError(t, cmd.Wait())
	_, err = treeCPU(cmd.Process.Pid)
	require.Error(t, err, "a process that is gone has no tree")
	total := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	require.GreaterOrEqual(t, total, first, "the tree never counts more than the OS did at the end")
}

func TestWireAccounting(t *testing.T) {
	start := time.Unix(1_700_000_000, 0)
	ms := wireMetrics(3, 2, start)
	require.Equal(t, []int64{1_700_000_000, 1_700_000_001, 1_700_000_002}, wireKeys(ms, "json"))
	require.Equal(t, []int64{1_700_000_000_000_000_000, 1_700_000_001_000_000_000, 1_700_000_002_000_000_000}, wireKeys(ms, "influx"))

	r := wireResult{up: 900, down: 100, tally: tally{sent: 10, received: 10}}
	require.InDelta(t, 100.0, r.perMetric(), 1e-9)
	require.Zero(t, wireResult{up: 5}.perMetric(), "nothing received: no figure")

	for in, want := range map[int64]string{999: "999 B", 10 << 10: "10.0 KiB", 3 << 20: "3.0 MiB"} {
		require.Equal(t, want, formatBytes(in))
	}
}

func TestWireRowSaysBytes(t *testing.T) {
	r := row{unit: "B/metric", lowerIsBetter: true, ours: []float64{120}, peer: []float64{100}, slowerWhy: "topics"}
	_, _, _, note := r.cells()
	require.Contains(t, note, "ours is MORE bytes on the wire than the peer: topics")
}

func TestUserRowsRouteRuns(t *testing.T) {
	u := newUserRows(1000, 10, "", false)
	u.add(routeMQTT, 1000, userResult{wall: 2 * time.Second, cpu: 4 * time.Millisecond})
	u.add(routeExecd, 1000, userResult{wall: time.Second, cpu: 2 * time.Millisecond, others: 6 * time.Millisecond})
	u.fail(routeBuiltin, os.ErrClosed)
	u.cores = 2
	u.add(routeDiscard, 1000, userResult{wall: 100 * time.Millisecond, cpu: time.Millisecond})

	require.Equal(t, []float64{1000}, u.execd.ours, "metrics/s from Telegraf's start")
	require.Equal(t, []float64{500}, u.execd.peer)
	require.Equal(t, []float64{2}, u.cpuExecd.ours, "µs of CPU per metric")
	require.Equal(t, []float64{4}, u.cpuExecd.peer)
	require.Equal(t, []float64{500}, u.builtin.peer, "outputs.mqtt is every row's peer")
	require.Empty(t, u.builtin.ours)
	require.Equal(t, 1, u.builtin.leftOut)
	require.Equal(t, []float64{1000}, u.builtinVsExecd.peer, "execd is the peer of the built-in route")
	require.Equal(t, 1, u.builtinVsExecd.leftOut)
	require.Equal(t, 1, u.cpuBuiltin.leftOut)
	require.Zero(t, u.execd.leftOut, "a failed built-in run does not touch the execd rows")
	require.Equal(t, []float64{10000}, u.ceiling.ours)
	require.Contains(t, u.summary(routeExecd, 1000), "wall 1.00 s, CPU of the tree 0.00 s, 2.0 µs/metric, the broker and the subscriber 6.0 µs/metric, all three together 0% of the machine's 2 cores")
	u.add(routeExecd, 1000, userResult{wall: time.Second, cpu: 500 * time.Millisecond, others: 1100 * time.Millisecond})
	u.add(routeExecd, 1000, userResult{wall: time.Second, cpu: 500 * time.Millisecond, others: 1100 * time.Millisecond})
	require.Contains(t, u.summary(routeExecd, 1000), "all three together 80% of the machine's 2 cores (at 100%, that CPU per metric allows 1,250 metrics/s)", "1.6 s of CPU in 1 s on 2 cores, the median of three runs")
	require.NotContains(t, u.summary(routeDiscard, 1000), "broker", "the ceiling has no broker")
}

func TestMosquittoDropsSinceOffset(t *testing.T) {
	f, err := os.Create(t.TempDir() + "/mosquitto.log")
	require.NoError(t, err)
	defer f.Close()
	m := &mosquitto{log: f}
	_, err = f.WriteString("1700000000: Outgoing messages are being dropped for client old.\n")
	require.NoError(t, err)
	offset := m.logSize()
	require.Zero(t, m.mosquittoDrops(offset), "drops before the offset belong to an earlier run")
	_, err = f.WriteString("1700000001: New client connected from 127.0.0.1\n" +
		"1700000002: Outgoing messages are being dropped for client sub.\n" +
		"1700000003: Outgoing messages are being dropped for client sub.\n")
	require.NoError(t, err)
	require.Equal(t, 2, m.mosquittoDrops(offset))
	require.Equal(t, 3, m.mosquittoDrops(0))
	require.Zero(t, m.mosquittoDrops(1<<30), "an offset past the end counts nothing")
}

// TestUserSubscriberCountsEveryMessage runs benchmark 9's subscriber against
// a real mosquitto with its defaults: the probe is forgotten, and every
// metric published afterwards is counted once, a duplicate as one.
func TestUserSubscriberCountsEveryMessage(t *testing.T) {
	bin := findMosquitto("")
	if bin == "" {
		t.Skip("no mosquitto (apt-get install -y mosquitto)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	m, err := startMosquittoDefaults(ctx, bin, dir, false)
	require.NoError(t, err)
	defer m.stop()
	r := newReceiver()
	sub, err := startUserSubscriber(ctx, m.url, dir, r)
	require.NoError(t, err)
	defer sub.stop()
	require.Zero(t, r.unique(), "the probe is not counted")

	c := mqtt.NewClient(mqtt.NewClientOptions().AddBroker(m.url).SetClientID("user-subscriber-test").SetProtocolVersion(4))
	tok := c.Connect()
	require.True(t, tok.WaitTimeout(15*time.Second))
	require.NoError(t, tok.Error())
	defer c.Disconnect(250)
	for _, p := range []struct{ topic, payload string }{
		{"/" + registryID + "/dev-00000/events", "sensor a=1 10\n"},
		{"/" + registryID + "/dev-00001/events", "sensor a=1 20\nsensor a=2 30\n"},
		{"/" + registryID + "/" + gatewayID + "/events/dev-00001", "sensor a=1 40"},
		{"/" + registryID + "/dev-00000/events", "sensor a=1 10\n"}, // a duplicate
		{"/" + registryID + "/dev-00000/state", "sensor a=1 50\n"},  // not an events topic
		{"/" + registryID + "/dev-00002/events", "sensor a=1 60\n"}, // the last: in order, so the others are in
	} {
		tok := c.Publish(p.topic, 1, false, p.payload)
		require.True(t, tok.WaitTimeout(15*time.Second))
		require.NoError(t, tok.Error())
	}
	r.waitFor(ctx, 5, 10*time.Second)
	require.Equal(t, tally{sent: 5, received: 5, duplicates: 1}, r.count([]int64{10, 20, 30, 40, 60}))
}
