package e2e

import (
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// route is one of the two ways to run the plugins (README, "Two ways to
// run"); the end-to-end scenarios run through both.
type route struct {
	name string
	// builtin: Telegraf with the plugins compiled in (make
	// telegraf-builtin); otherwise the stock Telegraf runs the execd binary.
	builtin bool
}

var routes = []route{{name: "execd"}, {name: "builtin", builtin: true}}

func (r route) bin() string {
	if r.builtin {
		return builtinBin
	}
	return telegrafBin
}

// stats is the name of the gateway statistics metric: the input's
// omnicore_gateway on both routes (built in, inputs.internal's
// internal_omnicore carries the same series).
func (r route) stats() string {
	return "omnicore_gateway"
}

// output is the telegraf.conf part that runs outputs.omnicore for gw with
// the extra plugin options. Neither route sends the plugins' own metrics
// back to the bridge.
func (s *setup) output(r route, gw Gateway, extra ...string) string {
	if r.builtin {
		// namedrop first: extra may end with sub-tables (gateways).
		return gw.OutputFile(append([]string{`namedrop = ["omnicore_*", "internal_*"]`}, extra...)...)
	}
	file := s.write("omnicore-output.conf", gw.OutputFile(extra...))
	return ExecdOutput(pluginBin, file, "-batch_timeout", "100ms")
}

// input is the telegraf.conf part that runs inputs.omnicore for gw and its
// statistics: inputs.internal inside Telegraf, the input's Gather driven by
// Telegraf's interval (signal = "STDIN") under execd.
func (s *setup) input(r route, gw Gateway, devices []string, extra ...string) string {
	if r.builtin {
		return gw.InputFile(devices, extra...) + "[[inputs.internal]]\n  collect_memstats = false\n"
	}
	file := s.write("omnicore-input.conf", gw.InputFile(devices, extra...))
	return strings.Replace(ExecdInput(pluginBin, file), `signal = "none"`, `signal = "STDIN"`, 1)
}

// generator is an inputs.execd that emits n numbered metrics (field n = 1..n)
// spread over devices dev-0..dev-{devices-1}, one every 10 ms, then touches
// done and idles until stdin closes (Telegraf stopping).
func generator(n, devices int, done string) string {
	script := fmt.Sprintf(`i=1; while [ $i -le %d ]; do echo "seq,device_id=dev-$((i %% %d)) n=${i}i"; i=$((i+1)); sleep 0.01; done; touch %q; exec cat >/dev/null`,
		n, devices, done)
	return fmt.Sprintf("[[inputs.execd]]\n  command = [\"sh\", \"-c\", %s]\n  signal = \"none\"\n  data_format = \"influx\"\n", Quote(script))
}

// make telegraf-builtin's binary lists both plugins; the stock one neither.
func TestBuiltinListsPlugins(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the Telegraf builds")
	}
	for _, tt := range []struct {
		bin  string
		want bool
	}{{builtinBin, true}, {telegrafBin, false}} {
		for _, flag := range []string{"--output-list", "--input-list"} {
			out, err := exec.Command(tt.bin, flag).CombinedOutput()
			require.NoError(t, err, "%s %s: %s", tt.bin, flag, out)
			listed := slices.Contains(strings.Fields(string(out)), "omnicore")
			require.Equal(t, tt.want, listed, "%s %s:\n%s", tt.bin, flag, out)
		}
	}
}
