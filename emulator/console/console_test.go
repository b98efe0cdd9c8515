package console_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/plugins/inputs"
	"github.com/influxdata/telegraf/plugins/outputs"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
	inomnicore "github.com/telegraf-omnicore/telegraf-omnicore/plugins/inputs/omnicore"
	outomnicore "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)

// eventTimeout bounds every wait for the page, the plugins or the emulator.
const eventTimeout = 30 * time.Second

// chromium finds Debian's chromium (or a Chrome); the browser tests skip,
// saying so, where there is none.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("no chromium on PATH: the console's browser tests need it (apt-get install chromium)")
	return ""
}

// browser starts headless chromium for one test. A JavaScript exception on
// the page fails the test.
func browser(t *testing.T) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)),
		chromedp.NoSandbox, // CI runs as root, where chromium's sandbox cannot start
		chromedp.WindowSize(1400, 1000),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	ctx, cancelTimeout := context.WithTimeout(ctx, 2*eventTimeout)
	t.Cleanup(func() { cancelTimeout(); cancel(); cancelAlloc() })
	var mu sync.Mutex
	var exceptions []string
	require.NoError(t, chromedp.Listen(ctx, func(ev any) {
		if e, ok := ev.(*runtime.EventExceptionThrown); ok {
			mu.Lock()
			d := e.ExceptionDetails
			msg := fmt.Sprintf("%s at %s:%d", d.Text, d.URL, d.LineNumber+1)
			if d.Exception != nil {
				msg += ": " + d.Exception.Description
			}
			exceptions = append(exceptions, msg)
			mu.Unlock()
		}
	}))
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		require.Empty(t, exceptions, "JavaScript exceptions on the page")
	})
	return ctx
}

// waitText waits, on DOM changes, until the element's text contains text.
func waitText(sel, text string) chromedp.Action[chromedp.Void] {
	return chromedp.Poll[chromedp.Void](
		fmt.Sprintf(`(document.querySelector(%q)?.textContent ?? "").includes(%q)`, sel, text),
		chromedp.WithPollingMutation(), chromedp.WithPollingTimeout(eventTimeout))
}

// waitMetric waits until acc holds a metric match accepts.
func waitMetric(t *testing.T, acc *testutil.Accumulator, what string, match func(telegraf.Metric) bool) {
	t.Helper()
	deadline := time.After(eventTimeout)
	for {
		n := int(acc.NMetrics())
		for _, m := range acc.GetTelegrafMetrics() {
			if match(m) {
				return
			}
		}
		more := make(chan struct{})
		go func() { acc.Wait(n + 1); close(more) }()
		select {
		case <-more:
		case <-deadline:
			t.Fatalf("timed out waiting for %s; metrics: %v", what, acc.GetTelegrafMetrics())
		}
	}
}

// TestConsoleInBrowser loads the console in headless chromium, sees a
// device's telemetry arrive from the real plugins' gateway session, sends a
// config from the page and sees inputs.omnicore's omnicore_config metric.
func TestConsoleInBrowser(t *testing.T) {
	ctx := browser(t)
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	key := srv.AddTestGateway(t, "plant", "plant-gw", omnicore.ES256, "boiler-1", "boiler-2")
	web := httptest.NewServer(srv.HTTPHandler())
	t.Cleanup(web.Close)

	// The real plugins, sharing one gateway session as in a Telegraf with
	// both built in.
	out := outputs.Outputs["omnicore"]().(*outomnicore.OmniCore)
	in := inputs.Inputs["omnicore"]().(*inomnicore.OmniCore)
	for _, o := range []*gateway.Options{&out.Options, &in.Options} {
		o.Servers = []string{srv.URL}
		o.SubscriptionID, o.RegistryID, o.GatewayID = srv.Subscription(), "plant", "plant-gw"
		o.PrivateKey, o.Algorithm = key, omnicore.ES256
		o.MaxReconnectInterval = config.Duration(time.Second)
	}
	out.Log = testutil.Logger{Name: "outputs.omnicore"}
	out.WriteTimeout = config.Duration(eventTimeout)
	in.Log = testutil.Logger{Name: "inputs.omnicore"}
	in.Devices = []string{"boiler-1", "boiler-2"}
	require.NoError(t, out.Init())
	require.NoError(t, in.Init())
	require.NoError(t, out.Connect())
	t.Cleanup(func() { require.NoError(t, out.Close()) })
	var acc testutil.Accumulator
	require.NoError(t, in.Start(&acc))
	t.Cleanup(in.Stop)

	require.NoError(t, chromedp.Do(ctx,
		chromedp.Navigate(web.URL+"/console/"),
		chromedp.WaitVisible(`#devices tr[data-device="boiler-1"]`),
		waitText(`#attachments`, "boiler-1"), // the input attached its devices
		chromedp.Click(`#devices tr[data-device="boiler-1"]`),
		chromedp.WaitVisible(`#device`),
	))

	require.NoError(t, out.Write([]telegraf.Metric{
		metric.New("boiler", map[string]string{"device_id": "boiler-1"}, map[string]any{"temp": 21.5}, time.Unix(1700000000, 0)),
		metric.New("boiler", map[string]string{"device_id": "boiler-2"}, map[string]any{"temp": 99.0}, time.Unix(1700000000, 0)),
	}))
	require.NoError(t, chromedp.Do(ctx, waitText(`#tail tbody`, "temp=21.5")))
	tail, err := chromedp.Run(ctx, chromedp.Text(`#tail tbody`))
	require.NoError(t, err)
	require.NotContains(t, tail, "temp=99", "another device's telemetry")

	require.NoError(t, chromedp.Do(ctx,
		chromedp.SetValue(`#config-payload`, `{"interval":"5s"}`),
		chromedp.Click(`#config-send`),
		waitText(`#config-result`, "version 1"),
		waitText(`#configs tbody`, `{"interval":"5s"}`),
	))
	waitMetric(t, &acc, "the config sent from the page", func(m telegraf.Metric) bool {
		d, _ := m.GetTag("device_id")
		p, _ := m.GetField("payload")
		return m.Name() == "omnicore_config" && d == "boiler-1" && p == `{"interval":"5s"}`
	})
	// The input acknowledged it (QoS 1): the page shows the ack.
	require.NoError(t, chromedp.Do(ctx, waitText(`#devices tr[data-device="boiler-1"]`, "v1 ✓")))

	shot, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	require.NoError(t, err)
	path := os.Getenv("CONSOLE_SCREENSHOT") // to look at it: CONSOLE_SCREENSHOT=/tmp/console.png
	if path == "" {
		path = filepath.Join(t.TempDir(), "console.png")
	}
	require.NoError(t, os.WriteFile(path, shot, 0o644))

	// The tail is bounded: of 250 more messages the page keeps the last
	// 200, newest first, read over several telemetry pages.
	burst := make([]telegraf.Metric, 250)
	for i := range burst {
		burst[i] = metric.New("boiler", map[string]string{"device_id": "boiler-1"}, map[string]any{"n": i}, time.Unix(1700000100+int64(i), 0))
	}
	require.NoError(t, out.Write(burst))
	wctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
	defer cancel()
	all, err := srv.WaitReceived(wctx, 2+len(burst))
	require.NoError(t, err)
	last := all[len(all)-1].Index // the plugin sends in parallel: the newest is whichever came last
	require.NoError(t, chromedp.Do(ctx, chromedp.Poll[chromedp.Void](
		fmt.Sprintf(`document.querySelector("#tail tbody tr:first-child td")?.textContent === "%d"`, last),
		chromedp.WithPollingMutation(), chromedp.WithPollingTimeout(eventTimeout))))
	rows, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll("#tail tbody tr").length`))
	require.NoError(t, err)
	require.Equal(t, 200, rows)

	// A command from the page reaches the gateway's own subscription.
	require.NoError(t, chromedp.Do(ctx,
		chromedp.Click(`#devices tr[data-device="plant-gw"]`),
		waitText(`#device-name`, "plant-gw"),
		chromedp.SetValue(`#command-payload`, "ping"),
		chromedp.Click(`#command-send`),
		waitText(`#command-result`, "delivered"),
	))
	waitMetric(t, &acc, "the command sent from the page", func(m telegraf.Metric) bool {
		d, _ := m.GetTag("device_id")
		p, _ := m.GetField("payload")
		return m.Name() == "omnicore_command" && d == "plant-gw" && p == "ping"
	})
}

// TestConsoleAsksForToken: with a token (required off loopback) the page
// loads without it, asks for it, and works once given; a wrong one is asked
// for again. The page's files hold no token.
func TestConsoleAsksForToken(t *testing.T) {
	ctx := browser(t)
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	require.NoError(t, srv.AddRegistry("plant"))
	const token = "0123456789abcdef-console"
	web := httptest.NewServer(srv.HTTPHandler(emulator.AdminToken(token)))
	t.Cleanup(web.Close)

	require.NoError(t, chromedp.Do(ctx,
		chromedp.Navigate(web.URL+"/"), // redirected to the console
		chromedp.WaitVisible(`#login`),
		chromedp.SetValue(`#token`, "wrong-token-0000000"),
		chromedp.Click(`#login button`),
		// The handler stores the token and hides the form in one go; the
		// form is back only after the API refused the token.
		chromedp.Poll[chromedp.Void](`sessionStorage.getItem("omnicore-emulator-token") === "wrong-token-0000000" && !document.getElementById("login").hidden && document.getElementById("app").hidden`,
			chromedp.WithPollingMutation(), chromedp.WithPollingTimeout(eventTimeout)),
		chromedp.SetValue(`#token`, token),
		chromedp.Click(`#login button`),
		chromedp.WaitVisible(`#registries li[data-registry="plant"]`),
	))
	html, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.documentElement.outerHTML`))
	require.NoError(t, err)
	require.NotContains(t, html, token)
}
