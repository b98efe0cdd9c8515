package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/share"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// childFlag makes the binary run one measurement in a process of its own
// (benchmark 4), so that the figures are the plugin's alone.
const childFlag = "-child-mode"

// memSample is one reading of the child's memory.
type memSample struct {
	RSS  int64  `json:"rss"`  // VmRSS, bytes
	Heap uint64 `json:"heap"` // Go heap in use (HeapAlloc), bytes
}

// childResult is what a child prints on stdout as JSON.
type childResult struct {
	Base     memSample   `json:"base"`     // connected, nothing attached
	Attached memSample   `json:"attached"` // after attaching
	Devices  int         `json:"devices"`
	Cycles   []memSample `json:"cycles"` // long run: after every Write (heap not collected)
	First    memSample   `json:"first"`  // long run: after the first Write, collected
	Last     memSample   `json:"last"`   // long run: after the last Write, collected
	Error    string      `json:"error,omitempty"`
}

// readRSS is VmRSS of this process from /proc/self/status.
func readRSS() int64 { return readRSSOf("self") }

// readRSSOf is VmRSS of /proc/<pid>, -1 when it cannot be read (the
// process exited).
func readRSSOf(pid string) int64 {
	f, err := os.Open("/proc/" + pid + "/status")
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			fields := strings.Fields(v)
			if len(fields) >= 1 {
				kb, err := strconv.ParseInt(fields[0], 10, 64)
				if err == nil {
					return kb * 1024
				}
			}
		}
	}
	return -1
}

// sample reads the memory; collected first runs the GC and returns freed
// pages to the OS, so that RSS and heap are the live memory.
func sample(collected bool) memSample {
	if collected {
		runtime.GC()
		debug.FreeOSMemory()
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memSample{RSS: readRSS(), Heap: ms.HeapAlloc}
}

// runChild is the child process: it measures one thing and prints a
// childResult.
func runChild(args []string) int {
	fs := flag.NewFlagSet("child", flag.ContinueOnError)
	mode := fs.String("mode", "", "attach or longrun")
	server := fs.String("server", "", "")
	key := fs.String("key", "", "")
	sub := fs.String("subscription", "", "")
	devices := fs.Int("devices", 0, "")
	cycles := fs.Int("cycles", 0, "")
	client := fs.String("client", "ours", "ours or mqtt")
	timeout := fs.Duration("timeout", 5*time.Minute, "")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	signer, err := omnicore.LoadSigner(*key, keyAlg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	id := identity{subscription: *sub, key: *key, signer: signer}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var res childResult
	switch *mode {
	case "attach":
		res, err = childAttach(ctx, *server, id, *devices)
	case "longrun":
		res, err = childLongRun(ctx, *server, id, *client, *devices, *cycles)
	default:
		err = fmt.Errorf("unknown mode %q", *mode)
	}
	if err != nil {
		res.Error = err.Error()
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return 1
	}
	return 0
}

// childAttach measures a session with nothing attached, then with n devices.
func childAttach(ctx context.Context, server string, id identity, n int) (childResult, error) {
	res := childResult{Devices: n}
	s, err := startSession(ctx, server, id, nil)
	if err != nil {
		return res, err
	}
	defer closeSession(s)
	res.Base = sample(true)
	if failed := gateway.AttachAll(ctx, s, deviceIDs(n), 0); len(failed) > 0 {
		return res, fmt.Errorf("%d attaches failed", len(failed))
	}
	if got := s.Stats().Attached; got != n {
		return res, fmt.Errorf("%d of %d devices attached", got, n)
	}
	res.Attached = sample(true)
	return res, nil
}

// childLongRun writes cycles batches of one metric per device, as Telegraf
// flushing every 10 s would, and samples the memory after every Write.
func childLongRun(ctx context.Context, server string, id identity, client string, devices, cycles int) (childResult, error) {
	res := childResult{Devices: devices}
	var out telegraf.Output
	switch client {
	case "ours":
		o, err := newOurOutput(server, id, nil)
		if err != nil {
			return res, err
		}
		out = o
	case "mqtt":
		// The child talks to the emulator: outputs.mqtt publishes to the
		// gateway's own subfolders, as in benchmark 1.
		m, err := newMQTTOutput(server, id, mqttTopic(broker{isEmu: true}))
		if err != nil {
			return res, err
		}
		out = m
	default:
		return res, fmt.Errorf("unknown client %q", client)
	}
	if err := out.Connect(); err != nil {
		return res, err
	}
	defer out.Close()
	res.Base = sample(true)
	t := time.Unix(1_700_000_000, 0)
	for c := 0; c < cycles; c++ {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		// Fresh metrics every cycle, like an input plugin's.
		ms := genMetrics(devices, devices, t.Add(time.Duration(c)*10*time.Second))
		if err := out.Write(ms); err != nil {
			return res, fmt.Errorf("write %d: %w", c+1, err)
		}
		res.Cycles = append(res.Cycles, sample(false))
		switch c {
		case 0:
			res.First = sample(true)
		case cycles - 1:
			res.Last = sample(true)
		}
	}
	return res, nil
}

// child runs this binary in child mode and decodes its result.
func (b *bench) child(ctx context.Context, args ...string) (childResult, error) {
	exe, err := os.Executable()
	if err != nil {
		return childResult{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	full := append([]string{childFlag, "-key", b.id.key, "-subscription", b.id.subscription}, args...)
	cmd := exec.CommandContext(ctx, exe, full...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Env = append(os.Environ(), share.EnvSharing+"=off")
	err = cmd.Run()
	var res childResult
	if jerr := json.Unmarshal(stdout.Bytes(), &res); jerr != nil {
		return res, fmt.Errorf("child %v: %w (%v; stderr: %s)", args, jerr, err, strings.TrimSpace(stderr.String()))
	}
	if res.Error != "" {
		return res, errors.New(res.Error)
	}
	return res, err
}

const mib = 1 << 20

// benchMemory is benchmark 4.
func (b *bench) benchMemory(ctx context.Context) error {
	most := b.sz.longDevices
	for _, n := range b.sz.memDevices {
		most = max(most, n)
	}
	emu, err := startEmulator(b.pub, most)
	if err != nil {
		return err
	}
	defer emu.Close()

	// Per attached device, at each size.
	type perDevice struct {
		n         int
		rss, heap []float64 // bytes per device, per run
		rssTotal  []float64 // MiB with n attached
		heapTotal []float64 // MiB with n attached
		base      []float64 // MiB with none attached
	}
	var pds []*perDevice
	for _, n := range b.sz.memDevices {
		pds = append(pds, &perDevice{n: n})
	}
	var problems []string
	for run := 0; run < b.opts.runs; run++ {
		for _, pd := range pds {
			progress("  run %d/%d: memory with %d attached devices", run+1, b.opts.runs, pd.n)
			res, err := b.child(ctx, "-mode", "attach", "-server", emu.URL, "-devices", strconv.Itoa(pd.n))
			if err != nil {
				problems = append(problems, fmt.Sprintf("%d devices: %v", pd.n, err))
				continue
			}
			pd.rss = append(pd.rss, float64(res.Attached.RSS-res.Base.RSS)/float64(pd.n))
			pd.heap = append(pd.heap, (float64(res.Attached.Heap)-float64(res.Base.Heap))/float64(pd.n))
			pd.rssTotal = append(pd.rssTotal, float64(res.Attached.RSS)/mib)
			pd.heapTotal = append(pd.heapTotal, float64(res.Attached.Heap)/mib)
			pd.base = append(pd.base, float64(res.Base.RSS)/mib)
			progress("    RSS %.1f MiB -> %.1f MiB, %.0f B/device RSS, %.0f B/device heap",
				float64(res.Base.RSS)/mib, float64(res.Attached.RSS)/mib, pd.rss[len(pd.rss)-1], pd.heap[len(pd.heap)-1])
		}
	}
	if len(pds) >= 2 {
		small, big := pds[0], pds[len(pds)-1]
		slope := func(small, big []float64) float64 {
			return (median(big) - median(small)) * mib / float64(pds[len(pds)-1].n-pds[0].n)
		}
		note := fmt.Sprintf("separate process running only the session, RSS (VmRSS) and Go heap after GC, minus the same process connected with no device; flat when the ratio is at most 1 (fixed costs spread over more devices); marginal cost from %s to %s devices %s RSS, %s heap; RSS with %s devices %.1f MiB, with none %.1f MiB",
			groupThousands(int64(small.n)), groupThousands(int64(big.n)),
			formatValue(slope(small.rssTotal, big.rssTotal), "B/device"), formatValue(slope(small.heapTotal, big.heapTotal), "B/device"),
			groupThousands(int64(big.n)), median(big.rssTotal), median(big.base))
		r := &row{id: "4", name: "RSS per attached device", unit: "B/device",
			oursLabel: groupThousands(int64(big.n)) + " devices", peerLabel: groupThousands(int64(small.n)) + " devices",
			ours: big.rss, peer: small.rss, neutral: true, note: note}
		h := &row{id: "4", name: "Go heap per attached device", unit: "B/device",
			oursLabel: groupThousands(int64(big.n)) + " devices", peerLabel: groupThousands(int64(small.n)) + " devices",
			ours: big.heap, peer: small.heap, neutral: true, note: "same processes; live heap after GC"}
		for _, p := range problems {
			r.addProblem("%s", p)
			h.addProblem("%s", p)
		}
		b.rows = append(b.rows, r, h)
	}

	// Long run: ours and outputs.mqtt, the same Writes.
	type longRun struct {
		first, last, firstHeap, lastHeap, peak []float64
	}
	runs := map[string]*longRun{"ours": {}, "mqtt": {}}
	for run := 0; run < b.opts.runs; run++ {
		for i, client := range []string{"ours", "mqtt"} {
			if run%2 == 1 {
				client = []string{"mqtt", "ours"}[i]
			}
			progress("  run %d/%d: long run, %s, %d Writes of %d metrics", run+1, b.opts.runs, client, b.sz.longCycles, b.sz.longDevices)
			res, err := b.child(ctx, "-mode", "longrun", "-client", client, "-server", emu.URL,
				"-devices", strconv.Itoa(b.sz.longDevices), "-cycles", strconv.Itoa(b.sz.longCycles))
			if err != nil {
				problems = append(problems, fmt.Sprintf("long run %s: %v", client, err))
				continue
			}
			lr := runs[client]
			lr.first = append(lr.first, float64(res.First.RSS)/mib)
			lr.last = append(lr.last, float64(res.Last.RSS)/mib)
			lr.firstHeap = append(lr.firstHeap, float64(res.First.Heap)/mib)
			lr.lastHeap = append(lr.lastHeap, float64(res.Last.Heap)/mib)
			peak := int64(0)
			for _, c := range res.Cycles {
				peak = max(peak, c.RSS)
			}
			lr.peak = append(lr.peak, float64(peak)/mib)
			progress("    RSS first %.1f MiB, last %.1f MiB, peak %.1f MiB; live heap first %.2f MiB, last %.2f MiB",
				float64(res.First.RSS)/mib, float64(res.Last.RSS)/mib, float64(peak)/mib, float64(res.First.Heap)/mib, float64(res.Last.Heap)/mib)
		}
	}
	ours, peer := runs["ours"], runs["mqtt"]
	what := fmt.Sprintf("%d Writes of %s metrics (1 per device; 10 minutes at a 10 s flush, compressed)", b.sz.longCycles, groupThousands(int64(b.sz.longDevices)))
	growth := &row{id: "4", name: "RSS over a long run, " + what, unit: "MiB",
		oursLabel: "after the last Write", peerLabel: "after the first",
		ours: ours.last, peer: ours.first, lowerIsBetter: true,
		note: fmt.Sprintf("outputs.omnicore in a separate process, measured after GC; no growth when the ratio is near 1; live heap first %.2f MiB, last %.2f MiB; peak RSS between Writes %.1f MiB",
			median(ours.firstHeap), median(ours.lastHeap), median(ours.peak)),
		slowerWhy: "RSS grew between the first and the last Write: compare the live heap in this note (a growing live heap would be a leak)"}
	vsMQTT := &row{id: "4", name: "RSS after the long run, vs outputs.mqtt", unit: "MiB",
		oursLabel: "outputs.omnicore", peerLabel: "outputs.mqtt",
		ours: ours.last, peer: peer.last, lowerIsBetter: true,
		note: fmt.Sprintf("same Writes, same emulator, each in its own process after GC; outputs.mqtt live heap %.2f MiB, ours %.2f MiB",
			median(peer.lastHeap), median(ours.lastHeap)),
		slowerWhy: "ours keeps per-device session state (attachment, pacing), the in-flight window and the cross-process sharing server, which outputs.mqtt does not have"}
	for _, p := range problems {
		growth.addProblem("%s", p)
		vsMQTT.addProblem("%s", p)
	}
	b.rows = append(b.rows, growth, vsMQTT)
	return nil
}

// treeRSS is the sum of VmRSS of pid and every descendant (Telegraf and the
// plugin processes it runs).
func treeRSS(pid int) int64 {
	var total int64
	for _, p := range treePIDs(pid) {
		if rss := readRSSOf(p); rss > 0 {
			total += rss
		}
	}
	return total
}
